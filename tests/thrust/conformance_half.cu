// The conformance suite compiled by nvcc for Thrust's CUDA system: the same
// source as the OMP and CPP builds.
#include "conformance_half.cpp"
