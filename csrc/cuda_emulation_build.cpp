// The CUDA sources compiled for the CPU under the emulation of the CUDA execution model
// (cuda_emulation.h): the very same files nvcc builds, included verbatim, registered as the
// operators VQ_EMU_NS::squant_round, ::squant_weight and ::fake_quant on CPU tensors (tests, selftest).
#ifndef VQUANT_CUDA_EMULATION
#error "build with -DVQUANT_CUDA_EMULATION"
#endif
#ifndef VQ_EMU_NS
#define VQ_EMU_NS vquant_emu
#endif

#include "squant_cuda.cu"
#include "fake_quant_cuda.cu"

#include <torch/library.h>

#include "ops_schema.h"

#define VQ_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define VQ_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

VQ_TORCH_LIBRARY(VQ_EMU_NS, m) {
  m.def(VQ_SCHEMA_SQUANT_ROUND);
  m.def(VQ_SCHEMA_FAKE_QUANT);
  m.def(VQ_SCHEMA_SQUANT_WEIGHT);
}

VQ_TORCH_LIBRARY_IMPL(VQ_EMU_NS, CPU, m) {
  m.impl("squant_round", &vquant::squant_round_cuda);
  m.impl("fake_quant", &vquant::fake_quant_cuda);
  m.impl("squant_weight", &vquant::squant_weight_cuda);
}
