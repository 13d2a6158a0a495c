# cmake/LoraThrust.cmake: the Thrust backend's targets (included once from the
# top-level CMakeLists.txt, after the lora target).
#
#   lora::thrust          lora::lora + CCCL's Thrust, THRUST_DEVICE_SYSTEM set by
#                         LORA_THRUST_DEVICE_SYSTEM (CUDA: compile users with nvcc)
#   lora_thrust_<sys>     one INTERFACE target per available system (cpp, omp,
#                         cuda) so the tests build the same source for each
#
# Options / cache variables:
#   LORA_ENABLE_CUDA            look for nvcc and build the CUDA targets (default:
#                               ON when top-level, so add_subdirectory users are
#                               not switched to CUDA behind their back)
#   LORA_THRUST_DEVICE_SYSTEM   CUDA, OMP or CPP (default CUDA when nvcc was found,
#                               else OMP when OpenMP was found, else CPP)
#   LORA_CCCL_INCLUDE_DIR       the directory holding thrust/ (found from the CUDA
#                               toolkit: <cuda>/include/cccl since CUDA 13)
#   LORA_BUILD_GPU_BENCH        build bench/gpu/bench_gpu.cu (needs CUDA)
# CMAKE_CUDA_ARCHITECTURES defaults to "80;90" (A100, H100/H200), or to the
# CUDAARCHS environment variable when set.

option(LORA_ENABLE_CUDA "Build the CUDA targets (nvcc, cuBLAS) when a CUDA compiler is found" ${PROJECT_IS_TOP_LEVEL})
option(LORA_BUILD_GPU_BENCH "Build the GPU benchmark bench/gpu/bench_gpu.cu (needs CUDA)" OFF)

find_package(CUDAToolkit QUIET)
set(_lora_cccl_hints "")
foreach(dir IN LISTS CUDAToolkit_INCLUDE_DIRS)
  list(APPEND _lora_cccl_hints ${dir}/cccl ${dir})
endforeach()
find_path(LORA_CCCL_INCLUDE_DIR thrust/version.h HINTS ${_lora_cccl_hints}
          DOC "Directory holding CCCL's thrust/ (e.g. <cuda>/include/cccl)")

if(NOT LORA_CCCL_INCLUDE_DIR)
  message(STATUS "lora: CCCL (Thrust) not found; lora::thrust and its tests are not built "
                 "(set LORA_CCCL_INCLUDE_DIR)")
  return()
endif()

find_package(OpenMP QUIET COMPONENTS CXX)

set(LORA_HAVE_CUDA OFF)
if(LORA_ENABLE_CUDA)
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    # nvcc is often not on PATH; the toolkit's own bin directory is the place.
    find_program(LORA_NVCC nvcc HINTS ${CUDAToolkit_BIN_DIR} /usr/local/cuda/bin)
    if(LORA_NVCC)
      set(CMAKE_CUDA_COMPILER ${LORA_NVCC} CACHE FILEPATH "CUDA compiler")
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # CMake's own CUDAARCHS environment variable wins (CI compiles sm_90 only).
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
      set(CMAKE_CUDA_ARCHITECTURES 80 90 CACHE STRING "CUDA architectures (sm_80 and sm_90 by default)")
    endif()
    enable_language(CUDA)
    set(LORA_HAVE_CUDA ON)
  else()
    message(STATUS "lora: no CUDA compiler found; CUDA targets are not built")
  endif()
endif()

if(LORA_HAVE_CUDA)
  set(_lora_default_system CUDA)
elseif(OpenMP_CXX_FOUND)
  set(_lora_default_system OMP)
else()
  set(_lora_default_system CPP)
endif()
set(LORA_THRUST_DEVICE_SYSTEM ${_lora_default_system} CACHE STRING "Thrust device system of lora::thrust: CUDA, OMP or CPP")
set_property(CACHE LORA_THRUST_DEVICE_SYSTEM PROPERTY STRINGS CUDA OMP CPP)
string(TOUPPER "${LORA_THRUST_DEVICE_SYSTEM}" _lora_system)
if(_lora_system STREQUAL "CUDA" AND NOT LORA_HAVE_CUDA)
  message(FATAL_ERROR "lora: LORA_THRUST_DEVICE_SYSTEM=CUDA needs a CUDA compiler (nvcc) and LORA_ENABLE_CUDA=ON; "
                      "set CMAKE_CUDA_COMPILER or choose OMP / CPP")
endif()
if(_lora_system STREQUAL "OMP" AND NOT OpenMP_CXX_FOUND)
  message(FATAL_ERROR "lora: LORA_THRUST_DEVICE_SYSTEM=OMP needs OpenMP for the C++ compiler; choose CPP")
endif()
if(NOT _lora_system MATCHES "^(CUDA|OMP|CPP)$")
  message(FATAL_ERROR "lora: LORA_THRUST_DEVICE_SYSTEM must be CUDA, OMP or CPP, not '${LORA_THRUST_DEVICE_SYSTEM}'")
endif()

# One INTERFACE target per system. CCCL is a SYSTEM include: its own warnings
# are not ours to fix (-Wall -Wextra -Wpedantic stay clean for our code).
function(lora_thrust_system_target system)
  string(TOLOWER ${system} lower)
  set(name lora_thrust_${lower})
  add_library(${name} INTERFACE)
  target_link_libraries(${name} INTERFACE lora)
  target_include_directories(${name} SYSTEM INTERFACE ${LORA_CCCL_INCLUDE_DIR})
  target_compile_definitions(${name} INTERFACE THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_${system})
  if(system STREQUAL "OMP")
    target_link_libraries(${name} INTERFACE OpenMP::OpenMP_CXX)
  elseif(system STREQUAL "CUDA")
    target_link_libraries(${name} INTERFACE CUDA::cudart CUDA::cublas)
    # -std=c++20 by hand: CMake 3.25 does not know CUDA 13's cuda_std_20 feature.
    # Eigen's constexpr helpers are host functions that device code may see;
    # 20012: Eigen 3.4 marks defaulted members __host__ __device__ (its warning, not ours).
    target_compile_options(${name} INTERFACE
      $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr -diag-suppress=20012>)
  endif()
endfunction()

lora_thrust_system_target(CPP)
if(OpenMP_CXX_FOUND)
  lora_thrust_system_target(OMP)
endif()
if(LORA_HAVE_CUDA)
  lora_thrust_system_target(CUDA)
endif()
string(TOLOWER ${_lora_system} _lora_lower)
add_library(lora::thrust ALIAS lora_thrust_${_lora_lower})
message(STATUS "lora: lora::thrust uses Thrust's ${_lora_system} device system (CCCL: ${LORA_CCCL_INCLUDE_DIR})")

# Not exported by install(EXPORT): the target carries the absolute CCCL path and
# CUDA::/OpenMP:: dependencies the package config does not look up yet; users of
# an installed lora add CCCL and -DTHRUST_DEVICE_SYSTEM themselves (docs/gpu.md).

if(LORA_BUILD_GPU_BENCH)
  if(NOT LORA_HAVE_CUDA)
    message(FATAL_ERROR "lora: LORA_BUILD_GPU_BENCH needs CUDA (nvcc)")
  endif()
  add_executable(bench_gpu ${PROJECT_SOURCE_DIR}/bench/gpu/bench_gpu.cu)
  target_link_libraries(bench_gpu PRIVATE lora_thrust_cuda)
endif()
