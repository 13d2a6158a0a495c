#!/usr/bin/env python3
"""The PyTorch side of the side-by-side benchmark: the same cases as
bench/bench_forward.cpp, written the way loralib does them, with the same
thread count. Prints JSON {case: milliseconds} (best of several runs).

  forward: F.linear(x, W) + (x @ A.T @ B.T) * s           (loralib's unmerged Linear)
  merged:  F.linear(x, W)
  merge:   W += (B @ A) * s, then W -= (B @ A) * s       (loralib's train()/eval() merge)

  sweeps (--sweep): the same as bench_forward's BM_sweep_* (r = 8, n = 1..4096)
  and BM_rsweep_* (n = 1, 16, r = 1..128), for bench/plot.sh, and bench_train's
  BM_train_sweep (r = 8, n = 1..4096; r = 1, 128 at n = 16, 256).
  sgemm: torch.mm on 4096^2 and the n = 256 forward shape (torch's own BLAS,
  MKL in PyPI's wheels), reported next to the limits bench_limits measures.

Usage: compare_torch.py --threads 2 [--dim 4096] [--sweep] > torch.json
Needs torch: bench/setup-torch.sh puts PyPI's wheel in build/torch-venv
(Debian's python3-torch 1.13 runs, but its GEMM is far slower on this machine).
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def best_ms(fn, min_time=0.3, max_reps=20):
    fn()  # warm-up (allocator, thread pool)
    best, spent, reps = float("inf"), 0.0, 0
    while (spent < min_time or reps < 3) and reps < max_reps:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="also the n and r sweeps for the plots")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.dim
    W = torch.rand(d, d) * 2 - 1
    blas = "mkl" if torch.backends.mkl.is_available() else "other"
    out = {"torch_version": torch.__version__, "threads": torch.get_num_threads(), "blas": blas, "cases": {}}
    cases = out["cases"]
    with torch.no_grad():
        pd = min(d, 4096)  # the peak at lora's limit size (an 8192^3 product is ~4 s a call)
        a, b = torch.rand(pd, pd), torch.rand(pd, pd)
        cases[f"sgemm_peak/d:{pd}"] = best_ms(lambda: torch.mm(a, b), max_reps=5)
        x = torch.rand(256, d)
        cases["sgemm_forward_shape/n:256"] = best_ms(lambda: F.linear(x, W))
        del a, b
    with torch.no_grad():
        for r in (1, 8, 64):
            A = (torch.rand(r, d) * 2 - 1) * 0.01
            B = (torch.rand(d, r) * 2 - 1) * 0.01
            s = 2.0
            for n in (1, 16, 256):
                x = torch.rand(n, d) * 2 - 1
                cases[f"forward_merged/r:{r}/n:{n}"] = best_ms(lambda: F.linear(x, W))
                cases[f"forward_unmerged/r:{r}/n:{n}"] = best_ms(lambda: F.linear(x, W) + (x @ A.T @ B.T) * s)

            def merge_unmerge():
                W.add_((B @ A) * s)
                W.sub_((B @ A) * s)

            cases[f"merge_unmerge/r:{r}"] = best_ms(merge_unmerge)

    if args.sweep:
        with torch.no_grad():
            def pair(prefix, r, n):
                A = (torch.rand(r, d) * 2 - 1) * 0.01
                B = (torch.rand(d, r) * 2 - 1) * 0.01
                x = torch.rand(n, d) * 2 - 1
                cases[f"{prefix}_merged/r:{r}/n:{n}"] = best_ms(lambda: F.linear(x, W))
                cases[f"{prefix}_unmerged/r:{r}/n:{n}"] = best_ms(lambda: F.linear(x, W) + (x @ A.T @ B.T) * 2.0)

            for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
                pair("sweep", 8, n)
            for n in (1, 16):
                for r in (1, 2, 4, 8, 16, 32, 64, 128):
                    pair("rsweep", r, n)

    # Training step: forward, then backward for A, B and x (W frozen); the
    # sweep's cases as bench_train's BM_train_sweep.
    steps = [("train_step", r, n) for r in (8, 64) for n in (16, 256)]
    if args.sweep:
        steps += [("train_sweep", 1, 16), ("train_sweep", 1, 256), ("train_sweep", 128, 16), ("train_sweep", 128, 256)]
        steps += [("train_sweep", 8, n) for n in (1, 4, 64, 1024, 4096)]
    for prefix, r, n in steps:
        A = ((torch.rand(r, d) * 2 - 1) * 0.01).requires_grad_()
        B = ((torch.rand(d, r) * 2 - 1) * 0.01).requires_grad_()
        x = (torch.rand(n, d) * 2 - 1).requires_grad_()
        g = torch.rand(n, d)

        def step():
            A.grad = B.grad = x.grad = None
            y = F.linear(x, W) + (x @ A.T @ B.T) * 2.0
            y.backward(g)

        cases[f"{prefix}/r:{r}/n:{n}"] = best_ms(step)
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
