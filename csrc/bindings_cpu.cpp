#include <torch/extension.h>

namespace vquant {
torch::Tensor squant_round_cpu(torch::Tensor codes, int64_t bits, bool k_level, bool c_level);
torch::Tensor fake_quant_cpu(torch::Tensor x, double scale, double zp, int64_t q_min, int64_t q_max);
}  // namespace vquant

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("squant_round", &vquant::squant_round_cpu, "SQuant rounding of real codes [OC, IC, K] (CPU)",
        py::arg("codes"), py::arg("bits"), py::arg("k_level"), py::arg("c_level"));
  m.def("fake_quant", &vquant::fake_quant_cpu, "Per-tensor affine fake quantization, one pass (CPU)",
        py::arg("x"), py::arg("scale"), py::arg("zero_point"), py::arg("q_min"), py::arg("q_max"));
}
