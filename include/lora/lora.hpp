// lora.hpp: the umbrella header of the CPU library (Eigen backend).
//   #include <lora/lora.hpp>
// brings LowRankDelta, AdaptedLinear, the expression nodes and evaluators, and
// the initialisation strategies, QLoRA (AdaptedLinear over an NF4Matrix) and
// lora::train. The Thrust backend is <lora/thrust.hpp>.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#define LORA_UMBRELLA_INCLUDED
#endif

#include "config.hpp"
#include "error.hpp"
#include "rank.hpp"
#include "backend/traits.hpp"
#include "backend/eigen/backend.hpp"
#include "backend/concept.hpp"
#include "expr/nodes.hpp"
#include "expr/evaluate.hpp"
#include "adapter.hpp"
#include "low_rank_delta.hpp"
#include "adapted_linear.hpp"
#include "backend/eigen/nf4.hpp"
#include "backend/eigen/packed.hpp"
#include "backend/eigen/half.hpp"
#include "merge.hpp"
#include "init.hpp"
#include "train/dropout.hpp"
#include "train/gradients.hpp"
#include "train/optimizers.hpp"
#include "train/memory.hpp"
