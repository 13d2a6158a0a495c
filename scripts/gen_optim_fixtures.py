#!/usr/bin/env python3
"""Generate the optimizer fixtures in tests/fixtures/optim/ from torch.optim.

Each case runs torch.optim.AdamW or torch.optim.SGD with foreach=False (the
single-tensor path, _single_tensor_adam / _single_tensor_sgd), fused off, on
two parameters shaped like a LoRA layer with out = 4, in = 4, r = 2:
A [2, 4] in param group 0 at lr and B [4, 2] in param group 1 at lr * ratio
(LoRA+; ratio 1 elsewhere). Before each step the script assigns the step's
gradients, sets both groups' lr (lr_t and lr_t * ratio: a per-step schedule
where the manifest says "schedule"), and, where max_grad_norm > 0, calls
torch.nn.utils.clip_grad_norm_([A, B], max_grad_norm, foreach=False).
Float32 and float64 runs use the same inputs (float64 draws; the float32 run
rounds them).

Each AdamW case runs twice:
  sqrt=torch  torch as shipped. In the x86 wheel (built with MKL),
              exp_avg_sq.sqrt() is not correctly rounded: of 1000 values in
              [0.1, 1.1), 182 float32 and 9 float64 roots were 1 ulp off.
  sqrt=ieee   the same torch code with torch.Tensor.sqrt replaced by numpy's
              correctly rounded sqrt; every other operation is torch's own.
SGD has no sqrt, so it runs once (sqrt=-).

torch's CPU kernels round differently by CPU capability: with AVX2 or AVX-512
(what ATen picks on x86 CPUs with FMA) add(alpha), lerp_ and addcmul_ are one
fused multiply-add; ATEN_CPU_CAPABILITY=default rounds the product first. The
fixtures come from the AVX2 / AVX-512 kernels (the script refuses otherwise).

Generated with torch 2.15.0 (the PyPI wheel's CPU kernels, AVX-512) and numpy 2.4.

Usage (in a throwaway virtualenv, not in the repository):
    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python scripts/gen_optim_fixtures.py [outdir]

Format (little-endian, raw, no header); SFX is f32 or f64:
    init.SFX          16 values: A (2x4, row-major), then B (4x2, row-major)
    grads.SFX         STEPS x 16 gradients, same layout, step by step
    NAME.SFX          STEPS x 16 parameters after each step, same layout
    NAME.norm.SFX     STEPS clip_grad_norm_ totals (cases with clipping)
    NAME.lr.f64       STEPS base learning rates (cases with lr "schedule")
manifest.txt: one line per case (see its header); '#' lines are comments.
"""
import math
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "optim")

STEPS = 12
SHAPE_A, SHAPE_B = (2, 4), (4, 2)
N_A, N_B = 8, 8

# Gradient scale per step: clipping (max_grad_norm 1.0 / 2.0 against norms of
# about 4 * scale) is active on most steps and inactive on the 0.1 steps.
SCALES = [1.0, 0.5, 2.0, 0.1, 1.5, 0.8, 3.0, 0.1, 1.0, 0.6, 1.2, 0.9]


def warmup_cosine(base, steps, warmup):
    return [base * (t + 1) / warmup if t < warmup else
            base * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))) for t in range(steps)]


# name, optimizer, options; lr is a float or a list (a schedule).
CASES = [
    ("adamw_default", "adamw", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)),
    # beta1 0.3: lerp weight 0.7 takes lerp's other branch (end - (end - self) (1 - w)).
    ("adamw_betas", "adamw", dict(lr=2e-2, beta1=0.3, beta2=0.95, eps=1e-6, weight_decay=0.1)),
    ("adamw_clip", "adamw", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, max_grad_norm=1.0)),
    ("adamw_loraplus", "adamw", dict(lr=5e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, ratio=16.0)),
    ("adamw_schedule", "adamw", dict(lr=warmup_cosine(5e-3, STEPS, 3), beta1=0.9, beta2=0.99, eps=1e-8,
                                     weight_decay=0.05, max_grad_norm=2.0, ratio=16.0)),
    ("sgd_plain", "sgd", dict(lr=0.05)),
    ("sgd_momentum", "sgd", dict(lr=0.05, momentum=0.9)),
    ("sgd_nesterov", "sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)),
    ("sgd_clip", "sgd", dict(lr=warmup_cosine(0.1, STEPS, 2), momentum=0.5, weight_decay=0.05, max_grad_norm=1.0,
                             ratio=4.0)),
]

DTYPES = [(torch.float32, np.float32, "f32"), (torch.float64, np.float64, "f64")]


def ieee_sqrt(self):
    return torch.from_numpy(np.sqrt(self.detach().numpy()))


def check_ieee_sqrt():
    """numpy's sqrt must be correctly rounded for the sqrt=ieee runs: float32
    against sqrt in float64 rounded once (exact for float32), float64 by
    squaring the neighbours in exact integer arithmetic."""
    rng = np.random.default_rng(1)
    x32 = (rng.random(100000) * 10).astype(np.float32)
    assert np.array_equal(np.sqrt(x32), np.sqrt(x32.astype(np.float64)).astype(np.float32))
    from fractions import Fraction
    for x in rng.random(2000) * 10:
        r = np.sqrt(np.float64(x))
        fx = Fraction(float(x))
        err = abs(Fraction(float(r)) ** 2 - fx)
        for nb in (np.nextafter(r, 0.0), np.nextafter(r, np.inf)):
            assert err <= abs(Fraction(float(nb)) ** 2 - fx)


def make_inputs():
    rng = np.random.default_rng(20240616)
    init = rng.standard_normal(N_A + N_B) * 0.5
    grads = np.stack([rng.standard_normal(N_A + N_B) * s for s in SCALES])
    return init, grads


def run_case(kind, opts, sqrt_mode, dtype, init, grads):
    ratio = opts.get("ratio", 1.0)
    lr = opts["lr"]
    lrs = lr if isinstance(lr, list) else [lr] * STEPS
    A = torch.tensor(init[:N_A].reshape(SHAPE_A), dtype=dtype, requires_grad=True)
    B = torch.tensor(init[N_A:].reshape(SHAPE_B), dtype=dtype, requires_grad=True)
    groups = [{"params": [A], "lr": lrs[0]}, {"params": [B], "lr": lrs[0] * ratio}]
    if kind == "adamw":
        opt = torch.optim.AdamW(groups, lr=lrs[0], betas=(opts["beta1"], opts["beta2"]), eps=opts["eps"],
                                weight_decay=opts["weight_decay"], foreach=False, fused=False)
    else:
        opt = torch.optim.SGD(groups, lr=lrs[0], momentum=opts.get("momentum", 0.0),
                              weight_decay=opts.get("weight_decay", 0.0), nesterov=opts.get("nesterov", False),
                              foreach=False, fused=False)
    params, norms = [], []
    original_sqrt = torch.Tensor.sqrt
    if sqrt_mode == "ieee":
        torch.Tensor.sqrt = ieee_sqrt
    try:
        for t in range(STEPS):
            opt.param_groups[0]["lr"] = lrs[t]
            opt.param_groups[1]["lr"] = lrs[t] * ratio
            A.grad = torch.tensor(grads[t, :N_A].reshape(SHAPE_A), dtype=dtype)
            B.grad = torch.tensor(grads[t, N_A:].reshape(SHAPE_B), dtype=dtype)
            if opts.get("max_grad_norm", 0.0) > 0:
                # The foreach default must agree (it does on CPU: a per-tensor fallback).
                with torch.no_grad():
                    check = torch.nn.utils.get_total_norm([A.grad, B.grad], foreach=None)
                total = torch.nn.utils.clip_grad_norm_([A, B], opts["max_grad_norm"], foreach=False)
                assert total.dtype == dtype and torch.equal(total, check)
                norms.append(total.item())
            opt.step()
            params.append(np.concatenate([A.detach().numpy().ravel(), B.detach().numpy().ravel()]))
    finally:
        torch.Tensor.sqrt = original_sqrt
    return np.stack(params), norms, lrs


def main():
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        sys.exit(f"CPU capability {capability}: the fixtures are the AVX2 / AVX-512 kernels' (see the docstring)")
    check_ieee_sqrt()
    os.makedirs(OUT, exist_ok=True)
    init, grads = make_inputs()
    for _, ndt, sfx in DTYPES:
        init.astype(ndt).tofile(os.path.join(OUT, f"init.{sfx}"))
        grads.astype(ndt).tofile(os.path.join(OUT, f"grads.{sfx}"))
    lines = [
        f"# torch.optim fixtures from torch {torch.__version__.split('+')[0]} (foreach=False, CPU capability "
        f"{capability}); see scripts/gen_optim_fixtures.py",
        f"# steps {STEPS}; A [2, 4] at lr, B [4, 2] at lr * lora_plus_ratio",
        "# name optimizer sqrt lr beta1 beta2 eps weight_decay momentum nesterov max_grad_norm lora_plus_ratio",
    ]
    for name, kind, opts in CASES:
        for sqrt_mode in (("torch", "ieee") if kind == "adamw" else ("-",)):
            case = name if sqrt_mode != "ieee" else name + "_ieee"
            for tdt, ndt, sfx in DTYPES:
                params, norms, lrs = run_case(kind, opts, sqrt_mode, tdt, init.astype(ndt).astype(np.float64),
                                              grads.astype(ndt).astype(np.float64))
                params.astype(ndt).tofile(os.path.join(OUT, f"{case}.{sfx}"))
                if norms:
                    np.array(norms, dtype=ndt).tofile(os.path.join(OUT, f"{case}.norm.{sfx}"))
            if isinstance(opts["lr"], list):
                np.array(lrs, dtype=np.float64).tofile(os.path.join(OUT, f"{case}.lr.f64"))
            lr_field = "schedule" if isinstance(opts["lr"], list) else repr(opts["lr"])
            fields = [case, kind, sqrt_mode, lr_field, repr(opts.get("beta1", 0.0)), repr(opts.get("beta2", 0.0)),
                      repr(opts.get("eps", 0.0)), repr(opts.get("weight_decay", 0.0)),
                      repr(opts.get("momentum", 0.0)), str(int(opts.get("nesterov", False))),
                      repr(opts.get("max_grad_norm", 0.0)), repr(opts.get("ratio", 1.0))]
            lines.append(" ".join(fields))
    with open(os.path.join(OUT, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
