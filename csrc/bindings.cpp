// Python bindings of one extension: the CPU one, or (built with -DVQUANT_CUDA) the CUDA one.
#include <torch/extension.h>

#ifdef VQUANT_CUDA
#define VQ_IMPL(name) name##_cuda
#define VQ_DEVICE "CUDA"
#else
#define VQ_IMPL(name) name##_cpu
#define VQ_DEVICE "CPU"
#endif

namespace vquant {
torch::Tensor VQ_IMPL(squant_round)(torch::Tensor codes, int64_t bits, bool k_level, bool c_level);
torch::Tensor VQ_IMPL(fake_quant)(torch::Tensor x, double scale, double zp, int64_t q_min, int64_t q_max);
}  // namespace vquant

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("squant_round", &vquant::VQ_IMPL(squant_round), "SQuant rounding of real codes [OC, IC, K] (" VQ_DEVICE ")",
        py::arg("codes"), py::arg("bits"), py::arg("k_level"), py::arg("c_level"));
  m.def("fake_quant", &vquant::VQ_IMPL(fake_quant), "Per-tensor affine fake quantization, one pass (" VQ_DEVICE ")",
        py::arg("x"), py::arg("scale"), py::arg("zero_point"), py::arg("q_min"), py::arg("q_max"));
}
