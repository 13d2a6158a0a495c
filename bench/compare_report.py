#!/usr/bin/env python3
"""The report of bench/compare.sh: reads the JSON files of one run (every round
of every program), keeps each case's best round (fastest time, highest
bandwidth / GFLOP/s: noise on a shared machine only ever slows a case down),
and prints markdown tables: the machine's limits, lora's cases as a percentage
of their limit, PyTorch's times and the ratios, and each issue-5 target with
met / not met. Also writes sweep_n.csv and sweep_r.csv for bench/plot.sh when
the run has the sweeps. Standard library only.

Usage: bench/compare_report.py build/bench-compare
"""
import glob
import json
import os
import re
import sys

D = 4096  # in = out of the layer cases; env.txt's "dim:" line (LORA_BENCH_DIM) replaces it
UNIT = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def gbench(paths):
    """{case: (best ms, counters of that run)}; case without BM_ and /real_time.

    A case's time is its fastest iteration (counter best_ms) where the benchmark
    records it, the statistic compare_torch.py reports for PyTorch; else Google
    Benchmark's mean over the iterations."""
    best = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            if b.get("run_type") == "aggregate":
                continue
            # Without BM_, the time kind and the per-case run settings
            # (min_time, min_warmup_time) that Google Benchmark adds to names.
            name = re.sub(r"^BM_|/(real|manual)_time$|/min_(warmup_)?time:[0-9.]+", "", b["name"])
            ms = b["best_ms"] if "best_ms" in b else b["real_time"] * UNIT[b["time_unit"]]
            if name not in best or ms < best[name][0]:
                best[name] = (ms, b)
    return best


def torch_runs(paths):
    best, meta = {}, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        meta = {k: v for k, v in data.items() if k != "cases"}
        for k, ms in data["cases"].items():
            best[k] = min(ms, best.get(k, ms))
    return best, meta


def torch_target(n):
    """Issue 17's torch / lora target: >= 1.5 up to 16 tokens, >= 1.0 past them."""
    return 1.5 if n <= 16 else 1.0


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main():
    out = sys.argv[1]
    files = lambda pattern: sorted(glob.glob(os.path.join(out, pattern)))
    env = open(os.path.join(out, "env.txt")).read().strip()
    print("```\n" + env + "\n```\n")
    global D
    m = re.search(r"^dim: (\d+)$", env, re.M)
    D = int(m.group(1)) if m else 4096

    # ---- limits -------------------------------------------------------------
    eigen_limits = gbench(files("limits.eigen.*.json"))
    gbs = lambda key: max(b["GB/s"] for k, (ms, b) in eigen_limits.items() if k.startswith(key)) / 1e9
    l3_read, l3_update = gbs("l3_read"), gbs("l3_update")
    dram_read, dram_scale = gbs("dram_read"), gbs("dram_scale")
    # The bandwidth a layer's W streams at: the L3's where W fits the 64 MiB the
    # L3 limits were measured with (D <= 4096), else DRAM's.
    in_l3 = 4 * D * D <= 64 << 20
    read_bw, read_name = (l3_read, "L3 read") if in_l3 else (dram_read, "DRAM read")
    update_bw, update_name = (l3_update, "L3 update") if in_l3 else (dram_scale, "DRAM read + write")
    PD = min(D, 4096)  # compare_torch.py's SGEMM peak size
    libs = {}
    for path in files("limits.*.json"):
        lib = os.path.basename(path).split(".")[1]
        libs.setdefault(lib, []).append(path)
    gemm = {}
    for lib, paths in libs.items():
        runs = gbench(paths)
        peak = max((b["GFLOP/s"] for k, (ms, b) in runs.items() if k.startswith("sgemm_peak")), default=0) / 1e9
        shape = max((b["GFLOP/s"] for k, (ms, b) in runs.items() if k.startswith("sgemm_forward_shape")),
                    default=0) / 1e9
        gemm[lib] = (peak, shape)
    t_env, meta = torch_runs(files("torch_env.*.json"))
    t_uns, _ = torch_runs(files("torch_unset.*.json"))
    if f"sgemm_peak/d:{PD}" in t_env:
        gemm[f"torch {meta.get('torch_version', '?')} ({meta.get('blas', '?')}, not through Eigen)"] = (
            2.0 * PD**3 / (t_env[f"sgemm_peak/d:{PD}"] * 1e6),
            2.0 * 256 * D * D / (t_env["sgemm_forward_shape/n:256"] * 1e6))
    # The peak is the fastest SGEMM measured in the run, any library and shape
    # (PyTorch's MKL included): a limit no lora kernel should beat. (The best
    # square SGEMM through Eigen alone was beaten by lora's own 256-token
    # forward, 104 % of it, in a run where MKL ran 7 % faster.)
    best_lib = max(gemm, key=lambda k: max(gemm[k]))
    peak = max(gemm[best_lib])

    print("### Limits (best of the rounds)\n")
    print("| limit | measured |\n|---|---|")
    print(f"| DRAM read (sum over 1 GiB) | {dram_read:.1f} GB/s |")
    print(f"| DRAM read + write (scale, 2 x 1 GiB) | {dram_scale:.1f} GB/s |")
    print(f"| L3 read (sum over 64 MiB = one 4096^2 fp32 W) | {l3_read:.1f} GB/s |")
    print(f"| L3 read + write (in-place update of 64 MiB, merge's traffic) | {l3_update:.1f} GB/s |")
    for lib, (p, s) in gemm.items():
        mark = " **(the fastest: the peak below)**" if lib == best_lib else ""
        name = "eigen or lora's packed kernel (the faster)" if lib == "eigen" else lib
        shape = f"256 x {D} x {D}" if lib.startswith("torch") else "256 x 4096 x 4096"  # torch's is at d
        print(f"| SGEMM {name}: 2048^3 / 4096^3 best; {shape} | {p:.0f} GFLOP/s; {s:.0f} GFLOP/s{mark} |")
    print()

    lora = gbench(files("lora.*.json"))
    lora_blas = gbench(files("lora_openblas.*.json"))
    train = gbench(files("train.*.json"))
    train_blas = gbench(files("train_openblas.*.json"))

    above = []  # cases faster than their limit: that limit kernel is no limit

    def pct_cell(pct, case):
        """A '% of limit' cell; above 100 % it is flagged and remembered."""
        if pct <= 100.5:
            return f"{pct:.0f}%"
        above.append(f"{case}: {pct:.0f}% of its limit")
        return f"**{pct:.0f}% (above the limit)**"

    def limit_ms(n, r=0):
        mem = 4.0 * (D * D + 2 * r * D) / (read_bw * 1e9) * 1e3
        flops = 2.0 * n * D * D / (peak * 1e9) * 1e3
        return max(mem, flops), mem, flops

    # ---- forward --------------------------------------------------------------
    print(f"### Forward, in = out = {D} (lora ms; limit = max(W bytes / {read_name}, flops / peak SGEMM))\n")
    print("unmerged / merged: from BM_forward_pair (both on one buffer of W, best of its iterations) "
          "where the run has it.\n")
    print("| r | n | merged ms | unmerged ms | unmerged / merged | target | met | unmerged % of limit "
          "| torch unmerged ms (env) | torch / lora (env) | torch target | met | torch ms (OPENBLAS_* unset) "
          "| torch / lora (unset) |")
    print("|" + "---|" * 14)
    for r in (1, 8, 64):
        for n in (1, 16, 256):
            m, u = lora.get(f"forward_merged/r:{r}/n:{n}"), lora.get(f"forward_unmerged/r:{r}/n:{n}")
            if m is None or u is None:
                continue
            m, u = m[0], u[0]
            F = r * 2.0 * D / (D * D)
            tgt = 1 + 1.5 * F if n >= 16 else (1.15 if r <= 8 else None)
            # The paired case times both on one buffer of W (bench_forward.cpp,
            # BM_forward_pair); separate cases own separate copies of W.
            pair = lora.get(f"forward_pair/r:{r}/n:{n}")
            ratio = pair[1]["ratio"] if pair else u / m
            met = "-" if tgt is None else ("yes" if ratio <= tgt else "no")
            lim = limit_ms(n, r)[0]
            te = t_env.get(f"forward_unmerged/r:{r}/n:{n}")
            tu = t_uns.get(f"forward_unmerged/r:{r}/n:{n}")
            ttgt = {1: 2.0, 16: 1.3, 256: 1.0}[n]
            tmet = "-" if te is None else ("yes" if te / u >= ttgt else "no")
            print(f"| {r} | {n} | {m:.3f} | {u:.3f} | {ratio:.3f} | {fmt(tgt)} | {met} | {pct_cell(100 * lim / u, f'forward r={r} n={n}')} "
                  f"| {fmt(te)} | {fmt(te and te / u, '.2f')} | >= {ttgt} | {tmet} | {fmt(tu)} "
                  f"| {fmt(tu and tu / u, '.2f')} |")
    print()

    # ---- merge ----------------------------------------------------------------
    print(f"### Merge + unmerge, d = {D} (per op = half the pair; limit = max(8 d^2 bytes / {update_name}, "
          "2 r d^2 / peak))\n")
    print("| r | per op ms | limit ms | per op / limit | target | met | torch per op ms (env) | torch / lora |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (1, 8, 64):
        mu = lora.get(f"merge_unmerge/r:{r}")
        if mu is None:
            continue
        per = mu[0] / 2
        lim = max(8.0 * D * D / (update_bw * 1e9), 2.0 * r * D * D / (peak * 1e9)) * 1e3
        te = t_env.get(f"merge_unmerge/r:{r}")
        print(f"| {r} | {per:.3f} | {lim:.3f} | {per / lim:.2f} | <= 1.3 | {'yes' if per / lim <= 1.3 else 'no'} "
              f"| {fmt(te and te / 2)} | {fmt(te and te / mu[0], '.2f')} |")
    print()

    # ---- training step --------------------------------------------------------
    if train:
        print(f"### Training step, in = out = {D} (forward + backward for A, B, X; min GEMM = the two plain Eigen "
              "GEMMs, same run)\n")
        print("| r | n | lora ms | min GEMM ms | ratio | % of peak (4 n d^2 flops) | torch ms (env) | torch / lora |")
        print("|---|---|---|---|---|---|---|---|")
        for key, (ms, b) in sorted(train.items(), key=lambda kv: [int(v) for v in re.findall(r"\d+", kv[0])]):
            mm = re.match(r"train_step<(\d+)>/(\d+)", key)
            if not mm:
                continue
            r, n = int(mm.group(1)), int(mm.group(2))
            te = t_env.get(f"train_step/r:{r}/n:{n}")
            pct = 100 * 4.0 * n * D * D / (peak * 1e9) * 1e3 / ms
            print(f"| {r} | {n} | {ms:.3f} | {b['ref_ms']:.3f} | {b['ratio']:.2f} | {pct:.0f}% | {fmt(te)} "
                  f"| {fmt(te and te / ms, '.2f')} |")
        print()

    # ---- PackedMatrix base ------------------------------------------------------
    packed_fwd = {k: v for k, v in lora.items() if k.startswith("forward_packed/")}
    packed_step = {k: v for k, v in train.items() if k.startswith("train_step_packed<")}
    if packed_fwd or packed_step:
        print(f"### PackedMatrix base, in = out = {D} (W packed once for lora's own GEMM kernels; same run)\n")
        print("| case | lora ms (plain W) | lora ms (packed W) | plain / packed | torch ms (env) | torch / packed |")
        print("|---|---|---|---|---|---|")
        for r in (8, 64):
            for n in (1, 16, 256):
                p = packed_fwd.get(f"forward_packed/r:{r}/n:{n}")
                if not p:
                    continue
                u = lora.get(f"forward_unmerged/r:{r}/n:{n}")
                te = t_env.get(f"forward_unmerged/r:{r}/n:{n}")
                base = u and u[0]
                print(f"| forward r = {r}, n = {n} | {fmt(base)} | {p[0]:.3f} | {fmt(base and base / p[0], '.2f')} "
                      f"| {fmt(te)} | {fmt(te and te / p[0], '.2f')} |")
        for key, (ms, b) in sorted(packed_step.items(), key=lambda kv: [int(v) for v in re.findall(r"\d+", kv[0])]):
            mm = re.match(r"train_step_packed<(\d+)>/(\d+)", key)
            if not mm:
                continue
            r, n = int(mm.group(1)), int(mm.group(2))
            base = train.get(f"train_step<{r}>/{n}", (None,))[0]
            te = t_env.get(f"train_step/r:{r}/n:{n}")
            print(f"| training step r = {r}, n = {n} | {fmt(base)} | {ms:.3f} | {fmt(base and base / ms, '.2f')} "
                  f"| {fmt(te)} | {fmt(te and te / ms, '.2f')} |")
        print()

    # ---- lora::blas -----------------------------------------------------------
    if lora_blas or train_blas:
        print("### With lora::blas (large products through OpenBLAS; same run, same rounds)\n")
        print("| case | lora ms (Eigen GEMM) | lora ms (lora::blas) | blas / Eigen speed-up | % of limit "
              "| target | met | torch ms (env) | torch / lora::blas |")
        print("|" + "---|" * 9)
        for key, n, r in (("sweep_unmerged/r:8/n:64", 64, 8), ("sweep_unmerged/r:8/n:128", 128, 8),
                          ("forward_unmerged/r:8/n:256", 256, 8), ("forward_unmerged/r:64/n:256", 256, 64)):
            if key not in lora_blas:
                continue
            ms = lora_blas[key][0]
            base = lora.get(key, (None,))[0]
            pct = 100 * limit_ms(n, r)[0] / ms
            te = t_env.get(key)
            tgt, ok = (">= 90% of peak", pct >= 90) if n > 64 else (">= 60% of peak", pct >= 60)
            if n == 256:
                tgt, ok = tgt + ", >= 1.0x torch", pct >= 90 and te is not None and te / ms >= 1.0
            print(f"| forward {key.split('_', 1)[1]} | {fmt(base)} | {ms:.3f} | {fmt(base and base / ms, '.2f')} "
                  f"| {pct:.0f}% of peak | {tgt} | {'yes' if ok else 'no'} | {fmt(te)} | {fmt(te and te / ms, '.2f')} |")
        for r in (1, 8, 64):
            mu = lora_blas.get(f"merge_unmerge/r:{r}")
            if mu is None:
                continue
            per = mu[0] / 2
            base = lora.get(f"merge_unmerge/r:{r}", (None,))[0]
            lim = max(8.0 * D * D / (update_bw * 1e9), 2.0 * r * D * D / (peak * 1e9)) * 1e3
            te = t_env.get(f"merge_unmerge/r:{r}")
            print(f"| merge r = {r} (per op) | {fmt(base and base / 2)} | {per:.3f} | {fmt(base and base / mu[0], '.2f')} "
                  f"| {per / lim:.2f}x limit | <= 1.3x | {'yes' if per / lim <= 1.3 else 'no'} | {fmt(te and te / 2)} "
                  f"| {fmt(te and te / mu[0], '.2f')} |")
        for key, (ms, b) in sorted(train_blas.items(), key=lambda kv: [int(v) for v in re.findall(r"\d+", kv[0])]):
            mm = re.match(r"train_step<(\d+)>/(\d+)", key)
            if not mm:
                continue
            r, n = int(mm.group(1)), int(mm.group(2))
            base = train.get(key, (None,))[0]
            te = t_env.get(f"train_step/r:{r}/n:{n}")
            pct = 100 * 4.0 * n * D * D / (peak * 1e9) * 1e3 / ms
            print(f"| training step r = {r}, n = {n} | {fmt(base)} | {ms:.3f} | {fmt(base and base / ms, '.2f')} "
                  f"| {pct:.0f}% of peak | - | - | {fmt(te)} | {fmt(te and te / ms, '.2f')} |")
        print()

    # ---- sweeps -----------------------------------------------------------------
    if any(k.startswith("sweep_") for k in lora):
        rows = []
        print("### n sweep, r = 8 (limit: n = 1 W from L3; 2 <= n <= 64 % of peak and of the roofline "
              "max(L3 bytes, flops); n >= 128 % of peak)\n")
        print("| n | lora merged ms | lora unmerged ms | plain Eigen ms | torch merged ms | torch unmerged ms "
              "| unmerged % of peak | unmerged % of roofline | target | met | torch / lora | torch target | met |")
        print("|" + "---|" * 13)
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
            key = f"r:8/n:{n}"
            m, u, e = (lora.get(f"sweep_{v}/{key}", (None,))[0] for v in ("merged", "unmerged", "eigen"))
            tm, tu = t_env.get(f"sweep_merged/{key}"), t_env.get(f"sweep_unmerged/{key}")
            if u is None:
                continue
            lim, mem, flops = limit_ms(n, 8)
            pct_peak, pct_roof = 100 * flops / u, 100 * lim / u
            if n == 1:
                tgt, ok = ">= 85% of L3 read", pct_roof >= 85
            elif n <= 64:
                tgt, ok = ">= 60% of peak", pct_peak >= 60
            else:
                tgt, ok = ">= 90% of peak", pct_peak >= 90
            ttgt = torch_target(n)
            tmet = "-" if tu is None else ("yes" if tu / u >= ttgt else "no")
            print(f"| {n} | {fmt(m)} | {u:.3f} | {fmt(e)} | {fmt(tm)} | {fmt(tu)} | {pct_peak:.0f}% | {pct_cell(pct_roof, f'sweep n={n}')} "
                  f"| {tgt} | {'yes' if ok else 'no'} | {fmt(tu and tu / u, '.2f')} | >= {ttgt} | {tmet} |")
            rows.append((n, m, u, e, tm, tu, lim))
        with open(os.path.join(out, "sweep_n.csv"), "w") as f:
            f.write("n,lora_merged_ms,lora_unmerged_ms,eigen_ms,torch_merged_ms,torch_unmerged_ms,limit_ms\n")
            for row in rows:
                f.write(",".join("" if v is None else f"{v:.6g}" for v in row) + "\n")
        print()

        rows = []
        print("### r sweep: unmerged / merged (target 1 + 1.5 F at n = 16; 1.15 for r <= 8 at n = 1) and "
              "torch / lora (unmerged; target >= 1.5)\n")
        print("| r | n = 1 merged ms | n = 1 unmerged ms | ratio | n = 16 merged ms | n = 16 unmerged ms | ratio "
              "| 1 + 1.5 F | torch / lora n = 1 | torch / lora n = 16 |")
        print("|" + "---|" * 10)
        for r in (1, 2, 4, 8, 16, 32, 64, 128):
            vals = []
            for n in (1, 16):
                m = lora.get(f"rsweep_merged/r:{r}/n:{n}", (None,))[0]
                u = lora.get(f"rsweep_unmerged/r:{r}/n:{n}", (None,))[0]
                vals += [m, u]
            if None in vals:
                continue
            F = r * 2.0 * D / (D * D)
            t1, t16 = t_env.get(f"rsweep_unmerged/r:{r}/n:1"), t_env.get(f"rsweep_unmerged/r:{r}/n:16")
            print(f"| {r} | {vals[0]:.3f} | {vals[1]:.3f} | {vals[1] / vals[0]:.3f} | {vals[2]:.3f} | {vals[3]:.3f} "
                  f"| {vals[3] / vals[2]:.3f} | {1 + 1.5 * F:.3f} | {fmt(t1 and t1 / vals[1], '.2f')} "
                  f"| {fmt(t16 and t16 / vals[3], '.2f')} |")
            rows.append([r] + vals + [t_env.get(f"rsweep_unmerged/r:{r}/n:1"), t_env.get(f"rsweep_unmerged/r:{r}/n:16")])
        with open(os.path.join(out, "sweep_r.csv"), "w") as f:
            f.write("r,n1_merged_ms,n1_unmerged_ms,n16_merged_ms,n16_unmerged_ms,torch_n1_unmerged_ms,"
                    "torch_n16_unmerged_ms\n")
            for row in rows:
                f.write(",".join("" if v is None else f"{v:.6g}" for v in row) + "\n")
        print()
    step_sweep = [(int(mm.group(1)), int(mm.group(2)), ms) for key, (ms, b) in train.items()
                  if (mm := re.match(r"train_sweep<(\d+)>/(\d+)", key))]
    if step_sweep:
        print("### Training step sweep (target: torch / lora >= 1.5 up to 16 tokens, >= 1.0 past them)\n")
        print("| r | n | lora ms | % of peak (4 n d^2 flops) | torch ms (env) | torch / lora | target | met |")
        print("|---|---|---|---|---|---|---|---|")
        for r, n, ms in sorted(step_sweep, key=lambda t: (t[0] != 8, t[0], t[1])):
            te = t_env.get(f"train_sweep/r:{r}/n:{n}")
            pct = 100 * 4.0 * n * D * D / (peak * 1e9) * 1e3 / ms
            ttgt = torch_target(n)
            met = "-" if te is None else ("yes" if te / ms >= ttgt else "no")
            print(f"| {r} | {n} | {ms:.3f} | {pct:.0f}% | {fmt(te)} | {fmt(te and te / ms, '.2f')} | >= {ttgt} | {met} |")
        print()
    if above:
        print("**Cases above 100 % of their limit** (the limit kernel is slower than the case, so it bounds "
              "nothing; fix bench_limits before reading any '% of limit'):\n")
        for a in above:
            print(f"- {a}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
