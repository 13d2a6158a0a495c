#!/usr/bin/env python3
"""PEFT's side of bench/bench_dora.cpp: DoRA against LoRA with the real PEFT
(tested with peft 0.21, torch 2.15) on a one-layer model,
nn.Linear(dim, dim, bias=False) wrapped by get_peft_model(LoraConfig(r,
lora_alpha=2r, lora_dropout=0, use_dora=False/True)), r = 8 and 64, n = 16 and
256, fp32, torch.set_num_threads(threads). Both models share one W (as
bench_dora's layers view one copy); A, B ~ U(-0.01, 0.01) in both (PEFT's
default B = 0 would not change the cost), m = ||W + s B A|| per row.

Each repetition runs the LoRA call then the DoRA call back to back (as
bench_dora's time_pair does); each side keeps its best repetition, and
ratio = best DoRA / best LoRA.

  forward:        eval mode, torch.no_grad(), DoRA caching off (PEFT's
                  default): every DoRA call materialises B A through
                  DoraLinearLayer.get_lora_weight (lora_B(lora_A(eye(in)))),
                  then the row norms of W + s B A (get_weight_norm);
                  lora/variants.py DoraLinearVariant.forward ->
                  lora/dora.py DoraLinearLayer.forward. bench_dora's
                  BM_dora_forward (norm recomputed per call).
  forward_cached: the same inside peft.helpers.DoraCaching() (sets
                  peft.tuners.lora.dora.ENABLE_DORA_CACHING; eval mode only):
                  get_lora_weight and get_weight_norm return their cached
                  values after the warm-up call. bench_dora's
                  BM_dora_forward_cached.
  step_peft:      train mode: y = model(x) with x.requires_grad (dX is
                  computed, as in bench_dora), loss = (y * g).sum(),
                  backward, AdamW step on the trainable parameters (A, B; and
                  m for DoRA), zero_grad(set_to_none=True). PEFT always
                  detaches the norm (dora.py DoraLinearLayer.forward,
                  `weight_norm = weight_norm.detach()`), so this is
                  bench_dora's BM_dora_step_peft (which has no optimizer
                  step: AdamW on r (in + out) (+ out) values is < 1 % here).
  step_exact:     not measured: PEFT has no exact-norm-gradient mode.

Usage:
  compare_dora.py --threads 2 [--dim 4096] [--rounds 1] [--out peft.json]
      measures; JSON {"cases": {"forward/r:8/n:16": {"lora_ms", "dora_ms",
      "ratio"}, ...}, versions, threads, dim}; with --rounds k, k such objects
      as JSON lines (one per round).
  compare_dora.py --report DIR
      the table of bench/compare_dora.sh from DIR/env.txt, DIR/ours.*.json
      (bench_dora --benchmark_format=json) and DIR/peft.*.json. Standard
      library only: no torch needed.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import time

RANKS = (8, 64)
TOKENS = (16, 256)
CASES = [  # (key, row label)
    ("forward", "forward, norm recomputed"),
    ("forward_cached", "forward, norm cached (inference)"),
    ("step_peft", "training step, PEFT backward (norm detached)"),
    ("step_exact", "training step, exact norm gradient (no PEFT equivalent)"),
]


def best_pair(lora_fn, dora_fn, min_time=0.3, max_reps=20):
    """Best milliseconds of each of two calls timed back to back."""
    lora_fn()  # warm-up (allocator, thread pool, DoRA's cache when enabled)
    dora_fn()
    best_l, best_d, spent, reps = math.inf, math.inf, 0.0, 0
    while (spent < min_time or reps < 3) and reps < max_reps:
        t0 = time.perf_counter()
        lora_fn()
        t1 = time.perf_counter()
        dora_fn()
        t2 = time.perf_counter()
        best_l, best_d = min(best_l, t1 - t0), min(best_d, t2 - t1)
        spent, reps = spent + (t2 - t0), reps + 1
    return best_l * 1e3, best_d * 1e3


def measure(threads, dim):
    import peft
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.helpers import DoraCaching
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class OneLayer(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.proj = nn.Linear(dim, dim, bias=False)
            self.proj.weight = weight

        def forward(self, x):
            return self.proj(x)

    W = nn.Parameter((torch.rand(dim, dim) * 2 - 1) * 0.02, requires_grad=False)
    cases = {}

    def make(r, use_dora, A0, B0):
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"], use_dora=use_dora)
        model = get_peft_model(OneLayer(W), config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(A0)
            B.copy_(B0)
            if use_dora:
                s = layer.scaling["default"]
                layer.lora_magnitude_vector["default"].weight.copy_(torch.linalg.norm(W + s * (B @ A), dim=1))
        return model

    for r in RANKS:
        # The same A, B in both: at m = ||W + s B A|| DoRA's output is LoRA's.
        A0, B0 = (torch.rand(r, dim) * 2 - 1) * 0.01, (torch.rand(dim, r) * 2 - 1) * 0.01
        lora_model, dora_model = make(r, False, A0, B0), make(r, True, A0, B0)
        assert dora_model.base_model.model.proj.weight is lora_model.base_model.model.proj.weight
        for n in TOKENS:
            x = torch.rand(n, dim) * 2 - 1
            g = torch.rand(n, dim) * 2 - 1

            lora_model.eval()
            dora_model.eval()
            with torch.no_grad():
                cases[f"forward/r:{r}/n:{n}"] = best_pair(lambda: lora_model(x), lambda: dora_model(x))
                with DoraCaching():
                    cases[f"forward_cached/r:{r}/n:{n}"] = best_pair(lambda: lora_model(x), lambda: dora_model(x))

            lora_model.train()  # also clears DoRA's cache
            dora_model.train()
            xg = x.clone().requires_grad_()

            def stepper(model):
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

                def step():
                    opt.zero_grad(set_to_none=True)
                    xg.grad = None
                    (model(xg) * g).sum().backward()
                    opt.step()

                return step

            cases[f"step_peft/r:{r}/n:{n}"] = best_pair(stepper(lora_model), stepper(dora_model))
        del lora_model, dora_model

    return {
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "threads": torch.get_num_threads(),
        "dim": dim,
        "cases": {k: {"lora_ms": l, "dora_ms": d, "ratio": d / l} for k, (l, d) in cases.items()},
    }


# ---- report (standard library only) ----------------------------------------

UNIT_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def ours_rounds(path):
    """bench_dora JSON -> {case key: {lora_ms, dora_ms, ratio}}."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data.get("benchmarks", []):
        if b.get("run_type") == "aggregate" or "error_occurred" in b:
            continue
        m = re.match(r"BM_dora_(\w+)<(\d+)>/(\d+)", b["name"])
        if not m:
            continue
        out[f"{m[1]}/r:{m[2]}/n:{m[3]}"] = {
            "lora_ms": b["lora_ms"],
            "dora_ms": b["real_time"] * UNIT_MS[b["time_unit"]],
            "ratio": b["ratio"],
        }
    return out


def peft_rounds(path):
    """compare_dora.py output (one JSON object per line) -> [cases], meta."""
    rounds, meta = [], {}
    with open(path) as f:
        for line in f:
            if line.strip():
                data = json.loads(line)
                rounds.append(data["cases"])
                meta = {k: v for k, v in data.items() if k != "cases"}
    return rounds, meta


def best_ratio(rounds, key):
    """The ratio of the round whose LoRA + DoRA time is lowest: noise on a
    shared machine only slows a pair down, and both halves come from one round."""
    runs = [c[key] for c in rounds if key in c]
    if not runs:
        return None
    return min(runs, key=lambda c: c["lora_ms"] + c["dora_ms"])["ratio"]


def report(out_dir):
    files = lambda pattern: sorted(glob.glob(os.path.join(out_dir, pattern)))
    ours = [ours_rounds(p) for p in files("ours.*.json")]
    peft, meta = [], {}
    for p in files("peft.*.json"):
        rounds, meta = peft_rounds(p)
        peft += rounds
    env_path = os.path.join(out_dir, "env.txt")
    env = open(env_path).read().strip() if os.path.exists(env_path) else ""
    lines = ["```", env]
    lines.append(f"rounds: ours {len(ours)}, PEFT {len(peft)}; PEFT: torch {meta.get('torch_version', '?')}, "
                 f"peft {meta.get('peft_version', '?')}, {meta.get('threads', '?')} threads, "
                 f"dim {meta.get('dim', '?')}")
    lines += ["```", ""]
    combos = [(r, n) for r in RANKS for n in TOKENS]
    lines.append("| DoRA / LoRA | " + " | ".join(f"r {r}, n {n}" for r, n in combos) + " |")
    lines.append("|---|" + "---:|" * len(combos))
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    for key, label in CASES:
        cells = []
        for r, n in combos:
            k = f"{key}/r:{r}/n:{n}"
            cells.append(f"ours {fmt(best_ratio(ours, k))} / PEFT {fmt(best_ratio(peft, k))}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=1, help="measurements in this process, one JSON line each")
    ap.add_argument("--out", help="JSON lines file (default: stdout)")
    ap.add_argument("--report", metavar="DIR", help="print the table of a compare_dora.sh run and exit")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return 0
    sink = open(args.out, "w") if args.out else sys.stdout
    for _ in range(args.rounds):
        sink.write(json.dumps(measure(args.threads, args.dim)) + "\n")
        sink.flush()
    if args.out:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
