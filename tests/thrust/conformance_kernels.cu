// The host side's Eigen products and SVD (the references, the SVD inits) of
// the CUDA conformance binary, compiled once: its other TUs declare them
// extern (LORA_EXTERN_TEMPLATES; init's TU: 94 -> 40 s, 3.5 -> 1.3 GB). A .cu
// like them, so nvcc's host compiler sees the same flags as where they are used.
#define LORA_INSTANTIATE_TEMPLATES
#include <lora/lora.hpp>
