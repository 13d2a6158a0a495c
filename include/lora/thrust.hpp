// thrust.hpp: the umbrella header of the Thrust backend (GPU through CUDA, or
// CPU threads through Thrust's OMP / CPP device systems).
//   #include <lora/thrust.hpp>
// brings everything of <lora/lora.hpp> plus ThrustBackend, DeviceMatrix and
// its views, the to_device / to_host transfers, DeviceNF4Matrix (QLoRA's
// NF4 base on the device) and 16-bit bases (DeviceMatrix<Eigen::bfloat16> /
// <Eigen::half> under float adapters). Compiled by nvcc with the
// CUDA system it also brings lora::cuda (cuBLAS, the fused LoRA kernel,
// streams). Choose the system with THRUST_DEVICE_SYSTEM (CMake:
// LORA_THRUST_DEVICE_SYSTEM and the lora::thrust target); see docs/gpu.md.
#pragma once

#include "lora.hpp"

#ifndef LORA_THRUST_UMBRELLA_INCLUDED
#define LORA_THRUST_UMBRELLA_INCLUDED
#endif

#include "backend/thrust/storage.hpp"
#include "backend/thrust/kernels.hpp"
#include "backend/thrust/backend.hpp"
#include "backend/thrust/transfer.hpp"
#include "backend/thrust/nf4.hpp"
#include "backend/thrust/half.hpp"

#if LORA_THRUST_ON_CUDA
#include "backend/thrust/cuda_hooks.hpp"
#endif
