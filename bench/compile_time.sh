#!/usr/bin/env bash
# What users pay at compile time, measured in one run: user CPU seconds (least
# of N compiles: CPU time barely moves when other work shares the machine) and
# peak compiler memory of one translation unit each, g++ -std=c++20 -O2
# -march=native -fopenmp, as a user would build. Prints a markdown table.
#
#   eigen_include     #include <Eigen/Dense> alone
#   lora_include      #include <lora/lora.hpp> alone
#   eigen_product     <Eigen/Dense> + one X * W^T product
#   forward_r8        one AdaptedLinear<RowMatrix<float>, LowRankDelta<float, 8>> forward
#   sweep_8_ranks     the same forward in for_each_rank<1, 2, 4, 8, 16, 32, 64, 128>
#   forward_r8_extern forward_r8 with LORA_EXTERN_TEMPLATES (products compiled elsewhere)
#   qlora_r8          a QLoRA layer (NF4 base) forward and backward
#   thrust_omp_r8     one forward on the Thrust backend, OMP system
#
# Usage: bench/compile_time.sh [runs=3] [baseline-include-dir]
#   With a second argument (e.g. the include/ of an older checkout), every
#   lora TU is also compiled against it, for a before/after column.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-3}
baseline=${2:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cxx=${CXX:-g++}
cccl=${LORA_CCCL_INCLUDE_DIR:-/usr/local/cuda/include/cccl}
flags=(-std=c++20 -O2 -march=native -fopenmp -isystem /usr/include/eigen3 -isystem "$cccl" -c)

cat > "$tmp/eigen_include.cpp" <<'CPP'
#include <Eigen/Dense>
int main() { return 0; }
CPP
cat > "$tmp/lora_include.cpp" <<'CPP'
#include <lora/lora.hpp>
int main() { return 0; }
CPP
cat > "$tmp/eigen_product.cpp" <<'CPP'
#include <Eigen/Dense>
using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
int main() {
  M W = M::Random(64, 64), X = M::Random(8, 64);
  M Y = X * W.transpose();
  return Y.sum() > 0;
}
CPP
cat > "$tmp/forward_r8.cpp" <<'CPP'
#include <lora/lora.hpp>
int main() {
  lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(64, 64), X = lora::RowMatrix<float>::Random(8, 64);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 8>{64, 64, {.alpha = 16}}};
  layer.delta().init(lora::init::KaimingZero{}, 1);
  lora::RowMatrix<float> Y = layer.forward(X);
  return Y.sum() > 0;
}
CPP
{ echo '#define LORA_EXTERN_TEMPLATES'; cat "$tmp/forward_r8.cpp"; } > "$tmp/forward_r8_extern.cpp"
cat > "$tmp/sweep_8_ranks.cpp" <<'CPP'
#include <lora/lora.hpp>
int main() {
  lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(256, 256), X = lora::RowMatrix<float>::Random(8, 256);
  float total = 0;
  lora::for_each_rank<1, 2, 4, 8, 16, 32, 64, 128>([&]<int R> {
    lora::AdaptedLinear layer{W, lora::LowRankDelta<float, R>{256, 256, {.alpha = 16}}};
    layer.delta().init(lora::init::KaimingZero{}, 1);
    lora::RowMatrix<float> Y = layer.forward(X);
    total += Y.sum();
  });
  return total > 0;
}
CPP
cat > "$tmp/qlora_r8.cpp" <<'CPP'
#include <lora/lora.hpp>
int main() {
  lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(64, 64), X = lora::RowMatrix<float>::Random(8, 64);
  lora::AdaptedLinear layer{lora::NF4Matrix::quantize(W), lora::LowRankDelta<float, 8>{64, 64, {.alpha = 16}}};
  layer.delta().init(lora::init::KaimingZero{}, 1);
  lora::RowMatrix<float> Y(8, 64), dX(8, 64);
  lora::train::Tape<decltype(layer)> tape;
  lora::train::Gradients<decltype(layer)> grads(layer);
  lora::train::forward(layer, X, Y, tape);
  lora::train::backward(layer, X, Y, tape, grads, dX);
  return Y.sum() + dX.sum() > 0;
}
CPP
cat > "$tmp/thrust_omp_r8.cpp" <<'CPP'
#include <lora/thrust.hpp>
int main() {
  lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(64, 64), X = lora::RowMatrix<float>::Random(8, 64);
  lora::AdaptedLinear host{W, lora::LowRankDelta<float, 8>{64, 64, {.alpha = 16}}};
  auto dev = lora::to_device(host);
  auto Y = lora::to_host(dev.forward(lora::to_device(X)));
  return Y.sum() > 0;
}
CPP

measure() {  # least user CPU seconds of $runs compiles and the peak RSS (GB): $1 include dir, $2 TU
  local inc=$1 src=$2 best="" rss="" t m extra=()
  [[ $src == *thrust* ]] && extra=(-DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_OMP)
  for _ in $(seq "$runs"); do
    /usr/bin/time -o "$tmp/time" -f '%U %M' "$cxx" "${flags[@]}" "${extra[@]}" -I"$inc" "$src" -o "$tmp/out.o" \
      2>"$tmp/err" || { echo "compile_time.sh: $src failed against $inc:" >&2; head -5 "$tmp/err" >&2; echo "- -"; return; }
    read -r t m <"$tmp/time"
    if [[ -z $best ]] || awk "BEGIN {exit !($t < $best)}"; then best=$t; fi
    rss=$m
  done
  echo "$best $(awk "BEGIN {printf \"%.2f\", $rss / 1048576}")"
}

tus=(eigen_include lora_include eigen_product forward_r8 sweep_8_ranks forward_r8_extern qlora_r8 thrust_omp_r8)
declare -A cpu mem base_cpu base_mem
for tu in "${tus[@]}"; do
  read -r cpu[$tu] mem[$tu] < <(measure "$root/include" "$tmp/$tu.cpp")
  if [[ -n $baseline && $tu != eigen_* ]]; then
    read -r base_cpu[$tu] base_mem[$tu] < <(measure "$baseline" "$tmp/$tu.cpp")
  fi
done

ratio() { awk "BEGIN {if ($2 + 0 > 0 && \"$1\" != \"-\") printf \"%.2f\", $1 / $2; else print \"-\"}"; }
echo "host: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; $("$cxx" --version | head -1)"
echo "flags: ${flags[*]}; least user CPU time of $runs compiles"
echo
if [[ -n $baseline ]]; then
  echo "| translation unit | CPU s | peak RSS GB | before: CPU s | before: RSS GB | vs <Eigen/Dense> + product |"
  echo "|---|---:|---:|---:|---:|---:|"
else
  echo "| translation unit | CPU s | peak RSS GB | vs <Eigen/Dense> + product |"
  echo "|---|---:|---:|---:|"
fi
for tu in "${tus[@]}"; do
  if [[ -n $baseline ]]; then
    echo "| $tu | ${cpu[$tu]} | ${mem[$tu]} | ${base_cpu[$tu]:--} | ${base_mem[$tu]:--} | $(ratio "${cpu[$tu]}" "${cpu[eigen_product]}") |"
  else
    echo "| $tu | ${cpu[$tu]} | ${mem[$tu]} | $(ratio "${cpu[$tu]}" "${cpu[eigen_product]}") |"
  fi
done
echo
echo "targets: forward_r8 <= 1.5x eigen_product: $(ratio "${cpu[forward_r8]}" "${cpu[eigen_product]}")x;" \
  "sweep_8_ranks <= 2x forward_r8: $(ratio "${cpu[sweep_8_ranks]}" "${cpu[forward_r8]}")x, RSS <= 1 GB: ${mem[sweep_8_ranks]} GB;" \
  "lora_include <= 1.3x eigen_include: $(ratio "${cpu[lora_include]}" "${cpu[eigen_include]}")x"
