#!/usr/bin/env python3
"""Summarise a bench_forward JSON run (--benchmark_format=json) as the ratio
tables docs/benchmarks.md quotes: unmerged / merged forward against the
1 + 1.5 F target (F = r (in + out) / (in out)), merge cost against the memory
limit, and static / dynamic rank. Standard library only.

Usage: bench/ratios.py run.json [--stream-gbs 40]
"""
import argparse
import json
import re
import sys


def load(path):
    with open(path) as f:
        data = json.load(f)
    # With --benchmark_repetitions, keep the fastest repetition of each case:
    # on a shared machine noise only ever adds time.
    times = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate":
            continue
        name = re.sub(r"/real_time$", "", b["run_name"] if "run_name" in b else b["name"])
        unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        ms = b["real_time"] * unit
        times[name] = min(ms, times.get(name, ms))
    return data.get("context", {}), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--stream-gbs", type=float, default=0.0,
                    help="measured read+write bandwidth, GB/s, for the merge limit")
    ap.add_argument("--peak-gflops", type=float, default=0.0,
                    help="measured peak SGEMM GFLOP/s, for the merge limit")
    args = ap.parse_args()
    ctx, t = load(args.json)
    d = args.dim
    print(f"host: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, "
          f"date {ctx.get('date', '?')}\n")

    print("| r | n | merged ms | unmerged ms | unmerged / merged | F | target 1 + 1.5 F | met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (1, 8, 64):
        for n in (1, 16, 256):
            m = t.get(f"BM_forward_merged/r:{r}/n:{n}")
            u = t.get(f"BM_forward_unmerged/r:{r}/n:{n}")
            if m is None or u is None:
                continue
            F = r * 2 * d / (d * d)
            target = 1 + 1.5 * F if n >= 16 else (1.15 if r <= 8 else None)
            ratio = u / m
            met = "-" if target is None else ("yes" if ratio <= target else "no")
            tgt = "-" if target is None else f"{target:.3f}"
            print(f"| {r} | {n} | {m:.3f} | {u:.3f} | {ratio:.3f} | {F:.5f} | {tgt} | {met} |")

    # Merge limit (DESIGN.md 6): max(bytes / stream bandwidth, flops / peak GEMM);
    # W is read and written once (8 d^2 bytes), the update is 2 r d^2 flops.
    print("\n| r | merge + unmerge ms | per op ms | limit ms | per op / limit |")
    print("|---|---|---|---|---|")
    for r in (1, 8, 64):
        mu = t.get(f"BM_merge_unmerge/r:{r}")
        if mu is None:
            continue
        limit = None
        if args.stream_gbs and args.peak_gflops:
            limit = max(8.0 * d * d / (args.stream_gbs * 1e9), 2.0 * r * d * d / (args.peak_gflops * 1e9)) * 1e3
        lim = f"{limit:.3f}" if limit else "-"
        ratio = f"{(mu / 2) / limit:.2f}" if limit else "-"
        print(f"| {r} | {mu:.3f} | {mu / 2:.3f} | {lim} | {ratio} |")

    print("\n| r | n | static ms | dynamic ms | static / dynamic |")
    print("|---|---|---|---|---|")
    for r in (1, 2, 4, 8, 16):
        for n in (1, 16):
            s = t.get(f"BM_forward_static<{r}>/r:{r}/n:{n}")
            y = t.get(f"BM_forward_dynamic/r{r}/r:{r}/n:{n}")
            if s is None or y is None:
                continue
            print(f"| {r} | {n} | {s:.3f} | {y:.3f} | {s / y:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
