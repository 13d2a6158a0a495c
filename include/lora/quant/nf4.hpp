// quant/nf4.hpp: NF4 storage for frozen base weights (the format and
// NF4Matrix), usable without the rest of lora. The fused CPU products
// (nf4_gemv, nf4_gemm, the QLoRA layer's) come with <lora/lora.hpp>
// (backend/eigen/nf4.hpp).
#pragma once

#include "lora/quant/nf4_format.hpp"
#include "lora/quant/nf4_matrix.hpp"
