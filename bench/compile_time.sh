#!/usr/bin/env bash
# The compile-time cost users pay for #include <lora/lora.hpp>: the same TU
# compiled with only <Eigen/Dense>, with <Eigen/Dense> + <lora/lora.hpp>, and a
# TU that instantiates a layer; plus examples/02_rank_sweep.cpp. Least CPU time of N runs,
# g++ -std=c++20 -O2 (the release flags minus -march=native).
# Usage: bench/compile_time.sh [runs=3]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cxx=${CXX:-g++}
flags=(-std=c++20 -O2 -I"$root/include" -isystem /usr/include/eigen3 -c)

cat > "$tmp/eigen_only.cpp" <<'CPP'
#include <Eigen/Dense>
int main() {
  Eigen::MatrixXf W = Eigen::MatrixXf::Random(64, 64), X = Eigen::MatrixXf::Random(8, 64);
  Eigen::MatrixXf Y = X * W.transpose();
  return Y.sum() > 0;
}
CPP
{ echo '#include <lora/lora.hpp>'; cat "$tmp/eigen_only.cpp"; } > "$tmp/eigen_plus_lora.cpp"
cat > "$tmp/lora_layer.cpp" <<'CPP'
#include <Eigen/Dense>
#include <lora/lora.hpp>
int main() {
  lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(64, 64), X = lora::RowMatrix<float>::Random(8, 64);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 8>{64, 64, {.alpha = 16}}};
  layer.delta().init(lora::init::kaiming_zero{}, 1);
  lora::RowMatrix<float> Y = layer.forward(X);
  layer.merge();
  return Y.sum() > 0;
}
CPP

best() {  # least CPU time (user + sys) of $runs compiles of $1, in seconds: CPU time,
          # unlike wall time, barely moves when other work shares the machine
  local src=$1 best="" t
  for _ in $(seq "$runs"); do
    t=$( { TIMEFORMAT='%3U %3S'; time "$cxx" "${flags[@]}" "$src" -o "$tmp/out.o"; } 2>&1 | tail -n 1 |
        awk '{print $1 + $2}')
    best=$(echo "$t $best" | awk '{if ($2 == "" || $1 < $2) print $1; else print $2}')
  done
  echo "$best"
}

e=$(best "$tmp/eigen_only.cpp")
l=$(best "$tmp/eigen_plus_lora.cpp")
i=$(best "$tmp/lora_layer.cpp")
x=$(best "$root/examples/02_rank_sweep.cpp")
printf '%-44s %8s %8s\n' "translation unit" "CPU s" "vs Eigen"
printf '%-44s %8.2f %8s\n' "<Eigen/Dense> + a product" "$e" "1.00"
printf '%-44s %8.2f %8.2f\n' "<Eigen/Dense> + <lora/lora.hpp>, same code" "$l" "$(echo "$l $e" | awk '{print $1 / $2}')"
printf '%-44s %8.2f %8.2f\n' "one AdaptedLinear<float, 8>: forward, merge" "$i" "$(echo "$i $e" | awk '{print $1 / $2}')"
printf '%-44s %8.2f %8.2f\n' "examples/02_rank_sweep.cpp (6 ranks)" "$x" "$(echo "$x $e" | awk '{print $1 / $2}')"
