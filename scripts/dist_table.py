#!/usr/bin/env python3
"""Computed (not measured) data-parallel communication per training step for
Llama-3-8B and Llama-3-70B, LoRA r = 16 on every linear layer of every block
vs full fine-tuning, at 8, 64, 256 and 1024 ranks, with the ring all-reduce
time model

    t = 2 (p - 1) / p * B / bandwidth + c * 2 (p - 1) * latency

B = the gradient payload per step (fp32), c = the number of all-reduce calls
(lora::dist::GradientReducer's 25 MiB buckets: c = ceil(B / 25 MiB)). Two
fabrics: 100 Gb/s InfiniBand (12.5 GB/s, 2 us per hop) and an NVLink-class
25 GB/s link (1 us per hop). Prints the markdown table of docs/distributed.md.
Plain python3, no third-party packages:  python3 scripts/dist_table.py
"""
import math

MODELS = {
    # layers, hidden d, k/v width, MLP width (gated), vocabulary (embedding and lm_head untied)
    "Llama-3-8B": dict(layers=32, d=4096, kv=1024, mlp=14336, vocab=128256),
    "Llama-3-70B": dict(layers=80, d=8192, kv=1024, mlp=28672, vocab=128256),
}
RANK = 16
BYTES = 4  # fp32 gradients
BUCKET = 25 << 20
RANKS = [8, 64, 256, 1024]
FABRICS = [("IB 100 Gb/s", 12.5e9, 2e-6), ("NVLink-class 25 GB/s", 25e9, 1e-6)]


def linear_shapes(m):
    """(in, out) of every adapted linear layer of one block."""
    d, kv, f = m["d"], m["kv"], m["mlp"]
    return [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down


def lora_params(m):
    return m["layers"] * sum(RANK * (i + o) for i, o in linear_shapes(m))


def full_params(m):
    block = sum(i * o for i, o in linear_shapes(m)) + 2 * m["d"]  # + two RMSNorm weights
    return m["layers"] * block + 2 * m["vocab"] * m["d"] + m["d"]  # + embedding, lm_head, final norm


def ring_time(payload, p, bandwidth, latency):
    calls = math.ceil(payload / BUCKET)
    return 2 * (p - 1) / p * payload / bandwidth + calls * 2 * (p - 1) * latency


def human_bytes(b):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def human_time(t):
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def main():
    print("COMPUTED from the formulas above, not measured.")
    print()
    print("| model | ranks p | LoRA payload | LoRA sent/rank | LoRA t (IB) | LoRA t (NVLink-class) "
          "| full FT payload | full sent/rank | full t (IB) | full t (NVLink-class) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        lb, fb = lora_params(m) * BYTES, full_params(m) * BYTES
        for p in RANKS:
            wire = 2 * (p - 1) / p
            lt = [ring_time(lb, p, bw, lat) for _, bw, lat in FABRICS]
            ft = [ring_time(fb, p, bw, lat) for _, bw, lat in FABRICS]
            print(f"| {name} | {p} | {human_bytes(lb)} ({lora_params(m) / 1e6:.1f} M) | {human_bytes(wire * lb)} "
                  f"| {human_time(lt[0])} | {human_time(lt[1])} | {human_bytes(fb)} ({full_params(m) / 1e9:.2f} B) "
                  f"| {human_bytes(wire * fb)} | {human_time(ft[0])} | {human_time(ft[1])} | {ft[0] / lt[0]:.0f}x |")
    print()
    for name, m in MODELS.items():
        lb = lora_params(m) * BYTES
        print(f"{name}: LoRA {math.ceil(lb / BUCKET)} all-reduce calls per step (25 MiB buckets), "
              f"full fine-tuning {math.ceil(full_params(m) * BYTES / BUCKET)}")


if __name__ == "__main__":
    main()
