"""The CUDA kernels (csrc/*.cu), compiled for the CPU under the emulation of the CUDA execution
model (csrc/cuda_emulation.h), equal the PyTorch reference bit for bit; a one-line bug in a
copy of the kernel source makes the emulated build fail the same comparison."""
import shutil

import pytest
import torch

import vquant_pl as vq
from vquant_pl.ops import kernels
from vquant_pl.ops.affine import ActivationQuantizer, dequantize, weight_codes
from vquant_pl.ops.squant import ROUNDINGS, levels, squant_round_torch

try:
    EMU = kernels.load_emulation()  # built once, then loaded from the cache
    WHY = ""
except kernels.BackendUnavailable as err:
    EMU, WHY = None, str(err)
pytestmark = pytest.mark.skipif(EMU is None, reason=f"no C++ compiler to build the CUDA emulation: {WHY}")


def _emulated(weight, bits, rounding, ops=None):
    """quantize_weight with the emulated CUDA rounding in place of the backend."""
    codes, scale, zero_point = weight_codes(weight, bits)
    q = (ops or EMU).squant_round(codes.contiguous(), bits, *levels(rounding, codes.shape[-1]))
    return dequantize(q, scale, zero_point).reshape(weight.shape).to(weight.dtype)


def _mismatches(weight, bits, roundings, ops=None):
    codes = weight_codes(weight, bits)[0]
    return [(tuple(weight.shape), bits, r) for r in roundings
            if not torch.equal((ops or EMU).squant_round(codes, bits, *levels(r, codes.shape[-1])),
                               squant_round_torch(codes, bits, r))]


def test_golden_file(golden):
    wrong = [i for i, c in enumerate(golden["weights"])
             if not torch.equal(_emulated(c["weight"], c["bits"], c["mode"]), c["expected"])]
    assert len(golden["weights"]) == 840 and wrong == []


ODD = {
    "one output channel": (1, 40, 3, 3),
    "one input channel": (16, 1, 3, 3),
    "kernel 1x1": (24, 40, 1, 1),
    "row of 900 > block of 256": (4, 100, 3, 3),
    "row of 1280, K = 1 (linear)": (6, 1280),
    "row of exactly 256": (3, 256),
    "row of 257": (3, 257),
    "one element": (1, 1),
    "conv1d": (5, 3, 7),
    "more kernels than a block (groups > 256)": (40, 30, 3, 3),
}


@pytest.mark.parametrize("kind", list(ODD))
def test_odd_shapes(kind):
    weight = torch.randn(ODD[kind])
    weight.view(-1)[:: 7] = 0.0  # exact codes and ties
    for bits in (2, 4, 8):
        assert _mismatches(weight, bits, ROUNDINGS) == []


def test_ties_and_constant_channels():
    grid = torch.randint(-4, 5, (9, 300, 3)).float() / 2
    grid[0], grid[1] = 0.0, 1.5
    assert _mismatches(grid, 3, ROUNDINGS) == [] and _mismatches(grid, 8, ROUNDINGS) == []


@pytest.mark.parametrize("spec", ["pytorchcv:resnet18", "efficientnet_lite:lite0"])
def test_every_layer_of_the_model(spec):
    model = vq.create_model(spec, pretrained=False)[0]
    layers = vq.quantizable_layers(model)
    assert len(layers) == {"pytorchcv:resnet18": 21, "efficientnet_lite:lite0": 50}[spec]
    wrong = [name for name, layer in layers if _mismatches(layer.weight.detach(), 4, ["squant"])]
    assert wrong == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_fake_quant_kernel(dtype):
    q = ActivationQuantizer(4, -1.5, 3.0, signed=True)
    x = (torch.randn(2, 24, 33, 17) * 3).to(dtype)  # 26928 elements: many blocks, a partial last one
    x.view(-1)[:64] = (torch.arange(64) / 4.0 - 8.0).to(dtype)  # ties
    for layout in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3)):
        got = EMU.fake_quant(layout, q._scale_f, q._zero_point_f, q.q_min, q.q_max)
        assert got.dtype == dtype and got.stride() == torch.empty_like(layout).stride()
        assert torch.equal(got, q.reference(layout))


def test_self_check_passes_on_the_emulated_kernels():
    assert kernels.self_check(EMU, "cpu") == []


BUG = ("      __syncthreads();\n    }\n  }\n  for (long i = threadIdx.x; i < row; i += blockDim.x)\n"
       "    orow[i] = fminf(fmaxf(orow[i], t_min), t_max);")


def test_a_one_line_bug_in_the_kernel_source_is_caught(tmp_path):
    """Delete the barrier that ends each selection round of the C-level: thread 0's update of
    the chosen element then races with the other threads' next scan. The emulated barrier is
    real and the threads of a phase run in alternating order, so the race gives wrong codes."""
    src = tmp_path / "csrc"
    shutil.copytree(kernels.source_dir(), src)
    cu = src / "squant_cuda.cu"
    text = cu.read_text()
    assert text.count(BUG) == 1
    cu.write_text(text.replace(BUG, BUG.replace("      __syncthreads();\n", "", 1)))
    buggy = kernels.load_emulation(src, namespace="vquant_emu_bug")
    weight = torch.randn(4, 100, 3, 3)
    assert _mismatches(weight, 4, ["squant-c"], ops=buggy) != []
    assert _mismatches(weight, 4, ["squant-c"]) == []  # the real source, same case
    assert kernels.self_check(buggy, "cpu") != []


def _weight_mismatches(weight, bits, roundings, ops=None):
    """The fused `squant_weight` (codes, rounding, dequantization) against the PyTorch path."""
    codes, scale, zero_point = weight_codes(weight, bits)
    w3 = weight.float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1).contiguous()
    wrong = []
    for r in roundings:
        expected = dequantize(squant_round_torch(codes.contiguous(), bits, r), scale, zero_point)
        got = (ops or EMU).squant_weight(w3, bits, *levels(r, w3.shape[-1]))
        if not torch.equal(got.view(torch.int32), expected.view(torch.int32)):
            wrong.append((tuple(weight.shape), bits, r))
    return wrong


@pytest.mark.parametrize("kind", list(ODD))
def test_fused_squant_weight_odd_shapes(kind):
    weight = torch.randn(ODD[kind])
    weight.view(-1)[:: 7] = 0.0
    if weight.shape[0] > 1:
        weight[0] = 0.5  # a constant channel (width clamped to 1e-8)
    for bits in (2, 4, 8):
        assert _weight_mismatches(weight, bits, ROUNDINGS) == []


def test_fused_squant_weight_golden_file(golden):
    wrong = []
    for i, c in enumerate(golden["weights"]):
        w = c["weight"]
        w3 = w.float().reshape(w.shape[0], w.shape[1] if w.dim() > 1 else 1, -1).contiguous()
        got = EMU.squant_weight(w3, c["bits"], *levels(c["mode"], w3.shape[-1])).reshape(w.shape).to(w.dtype)
        if not torch.equal(got, c["expected"]):
            wrong.append(i)
    assert wrong == []


def test_one_sided_residuals_worst_case_rounds():
    """Every error of a channel on one side: the most C-level rounds (k = IC/2 and more)."""
    codes = torch.randint(-7, 7, (3, 600, 1)) - 0.4
    assert [r for r in ROUNDINGS
            if not torch.equal(EMU.squant_round(codes, 4, *levels(r, 1)), squant_round_torch(codes, 4, r))] == []
    codes = torch.randint(-7, 7, (3, 100, 9)) + 0.3
    assert [r for r in ROUNDINGS
            if not torch.equal(EMU.squant_round(codes, 4, *levels(r, 9)), squant_round_torch(codes, 4, r))] == []
