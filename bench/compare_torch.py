#!/usr/bin/env python3
"""The PyTorch side of the side-by-side benchmark: the same cases as
bench/bench_forward.cpp, written the way loralib does them, with the same
thread count. Prints JSON {case: milliseconds} (best of several runs).

  forward: F.linear(x, W) + (x @ A.T @ B.T) * s           (loralib's unmerged Linear)
  merged:  F.linear(x, W)
  merge:   W += (B @ A) * s, then W -= (B @ A) * s       (loralib's train()/eval() merge)

Usage: compare_torch.py --threads 2 [--dim 4096] > torch.json
Needs torch (Debian's python3-torch is enough: run with /usr/bin/python3).
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.dim
    W = torch.rand(d, d) * 2 - 1
    out = {"torch_version": torch.__version__, "threads": torch.get_num_threads(), "cases": {}}
    cases = out["cases"]
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

    # Training step: forward, then backward for A, B and x (W frozen).
    for r in (8, 64):
        for n in (16, 256):
            A = ((torch.rand(r, d) * 2 - 1) * 0.01).requires_grad_()
            B = ((torch.rand(d, r) * 2 - 1) * 0.01).requires_grad_()
            x = (torch.rand(n, d) * 2 - 1).requires_grad_()
            g = torch.rand(n, d)

            def step():
                A.grad = B.grad = x.grad = None
                y = F.linear(x, W) + (x @ A.T @ B.T) * 2.0
                y.backward(g)

            cases[f"train_step/r:{r}/n:{n}"] = best_ms(step)
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
