#!/usr/bin/env bash
# Plots for docs/benchmarks.md from a bench/compare.sh run made with
# LORA_BENCH_SWEEP=1 (its sweep_n.csv and sweep_r.csv), with gnuplot:
#   forward_vs_n.png  time vs tokens n at r = 8: lora unmerged, lora merged,
#                     plain Eigen, PyTorch (loralib-style), and the limit
#   forward_vs_r.png  time vs rank r at n = 1 and n = 16: unmerged vs merged,
#                     and the target merged x (1 + 1.5 F)
# Usage: bench/plot.sh [run=build/bench-compare] [outdir=docs/img]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
run=${1:-$root/build/bench-compare}
img=${2:-$root/docs/img}
mkdir -p "$img"
title=$(sed -n 's/^threads: /threads /p' "$run/env.txt")
cpu=$(sed -n 's/^cpu: //p' "$run/env.txt")

gnuplot <<GP
set terminal pngcairo size 900,560 font "sans,11"
set datafile separator ","
set key inside top left box opaque
set grid
set output "$img/forward_vs_n.png"
set title "Forward, in = out = 4096, fp32, r = 8, $title ($cpu)"
set xlabel "tokens n"
set ylabel "ms per forward (log)"
set logscale xy 2
set xrange [0.8:5000]
set xtics (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
set ytics ("0.5" 0.5, "1" 1, "2" 2, "4" 4, "8" 8, "16" 16, "32" 32, "64" 64, "128" 128, "256" 256, "512" 512)
plot "$run/sweep_n.csv" every ::1 using 1:5 with linespoints lw 2 pt 9 lc rgb "#d62728" title "PyTorch F.linear + (x A^T B^T) s", \
     "" every ::1 using 1:4 with linespoints lw 2 pt 5 lc rgb "#7f7f7f" title "plain Eigen  Y = X W^T", \
     "" every ::1 using 1:3 with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "lora unmerged", \
     "" every ::1 using 1:2 with linespoints lw 2 pt 6 dt 2 lc rgb "#2ca02c" title "lora merged", \
     "" every ::1 using 1:7 with lines lw 1 dt 3 lc rgb "black" title "limit: max(W / L3 read, flops / peak SGEMM)"

reset
set terminal pngcairo size 900,420 font "sans,11"
set datafile separator ","
set output "$img/forward_vs_r.png"
set multiplot layout 1,2 title "Unmerged vs merged forward, in = out = 4096, fp32, $title"
set grid
set logscale x 2
set xrange [0.8:160]
set xtics (1, 2, 4, 8, 16, 32, 64, 128)
set xlabel "rank r"
set ylabel "ms per forward"
set key inside bottom right box opaque
set yrange [0:*]
F(r) = 1 + 1.5 * r * 2.0 / 4096
set title "n = 1"
plot "$run/sweep_r.csv" every ::1 using 1:3 with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "unmerged", \
     "" every ::1 using 1:2 with linespoints lw 2 pt 6 dt 2 lc rgb "#2ca02c" title "merged", \
     "" every ::1 using 1:(\$2 * 1.15) with lines dt 3 lc rgb "black" title "merged x 1.15"
set title "n = 16"
plot "$run/sweep_r.csv" every ::1 using 1:5 with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "unmerged", \
     "" every ::1 using 1:4 with linespoints lw 2 pt 6 dt 2 lc rgb "#2ca02c" title "merged", \
     "" every ::1 using 1:(\$4 * F(\$1)) with lines dt 3 lc rgb "black" title "merged x (1 + 1.5 F)"
unset multiplot
GP
echo "wrote $img/forward_vs_n.png $img/forward_vs_r.png"
