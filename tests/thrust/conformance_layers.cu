// The layer kinds beyond AdaptedLinear, compiled by nvcc as one TU (nvcc's
// fixed cost per TU is several times g++'s); g++ builds each as its own.
#include "conformance_dora.cpp"
#include "conformance_embedding.cpp"
#include "conformance_merged.cpp"
#include "conformance_multi.cpp"
