"""NVIDIA pytorch-quantization 2.2.1 semantics of tensor_quant / fake_tensor_quant,
QuantDescriptor and utils.reduce_amax (issue 13, items 1, 3, 5, 6 and 7)."""

import numpy as np
import pytest
import torch

from vquant_pl.nvidia.utils import reduce_amax
from vquant_pl.nvidia.tensor_quant import NegativeInputError, QuantDescriptor, fake_tensor_quant, tensor_quant


def test_pytorch_quantization_known_answer():
    torch.manual_seed(12345)
    x = torch.rand(10)
    codes, scale = tensor_quant(x, x.abs().max())
    assert codes.tolist() == [126, 113, 127, 59, 11, 23, 47, 73, 43, 27]
    assert round(scale.item(), 4) == 128.0057
    expected = [0.9843, 0.8828, 0.9921, 0.4609, 0.0859, 0.1797, 0.3672, 0.5703, 0.3359, 0.2109]
    assert [round(v, 4) for v in fake_tensor_quant(x, x.abs().max()).tolist()] == expected


def test_straight_through_gradient_is_zero_outside_the_clip():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.9, 1.5], requires_grad=True)
    fake_tensor_quant(x, 1.0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_tensor_quant_passes_the_gradient_straight_through_inside_amax():
    # item 1: NVIDIA's TensorQuantFunction.backward is the same clipped STE as the fake one
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.9, 1.5], requires_grad=True)
    codes, scale = tensor_quant(x, torch.tensor(1.0))
    (codes * torch.arange(1.0, 7.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]
    assert codes.tolist() == [-127, -64, 0, 38, 114, 127]  # round(0.5 * 127) = 64 (63.5 to even), 0.3 * 127 = 38.1


def test_zero_amax_quantizes_to_zero_with_scale_one():
    # item 3: a channel whose amax is 0 (or at most 2^-24) gives 0, its scale is 1
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.5, 1.0]])
    amax = torch.tensor([[0.0], [4.0], [2.0 ** -25]])
    out = fake_tensor_quant(w, amax)
    # row 1: scale 127 / 4 = 31.75, round(3 * 31.75) = round(95.25) = 95, 95 / 31.75
    assert torch.equal(out, torch.stack([torch.zeros(2), torch.stack([torch.tensor(95.0) / 31.75, torch.tensor(4.0)]),
                                         torch.zeros(2)]))
    codes, scale = tensor_quant(w, amax)
    assert codes.tolist() == [[0, 0], [95, 127], [0, 0]] and scale.flatten().tolist() == [1.0, 31.75, 1.0]
    assert fake_tensor_quant(torch.tensor([0.3, -5.0]), 0.0).tolist() == [0.0, 0.0]


def test_fp16_stays_fp16_and_float64_stays_float64():
    # item 5: fp16 is computed in fp32 and returned in fp16
    x = torch.tensor([0.5, -1.0, 0.25], dtype=torch.half)
    codes, scale = tensor_quant(x, torch.tensor(1.0))
    assert codes.dtype == scale.dtype == torch.half
    assert codes.tolist() == [64.0, -127.0, 32.0] and scale.item() == 127.0
    with pytest.raises(ValueError, match="scale is too large for FP16"):
        tensor_quant(x, torch.tensor(1e-3))  # 127 / 1e-3 = 127000 > 65504
    out = fake_tensor_quant(x, torch.tensor(1.0))
    assert out.dtype == torch.half and out.tolist() == [float(torch.tensor(64 / 127, dtype=torch.half)), -1.0,
                                                         float(torch.tensor(32 / 127, dtype=torch.half))]
    # float64 is computed in float64: round(0.3 * 127) = 38, 38 / 127 in double precision
    y = fake_tensor_quant(torch.tensor([0.3], dtype=torch.float64), torch.tensor(1.0))
    assert y.dtype == torch.float64 and y.item() == 38 / 127


def test_amax_and_input_errors():
    with pytest.raises(ValueError, match="amax must be >= 0"):
        fake_tensor_quant(torch.ones(2), -1.0)
    # deliberate difference: NVIDIA returns NaN for a NaN / infinite amax, we refuse it
    with pytest.raises(ValueError, match="amax must be finite"):
        fake_tensor_quant(torch.ones(2), float("nan"))
    with pytest.raises(NegativeInputError, match="Negative values encountered"):
        tensor_quant(torch.tensor([-1.0]), 1.0, unsigned=True)
    assert issubclass(NegativeInputError, TypeError) and issubclass(NegativeInputError, ValueError)
    with pytest.raises(ValueError, match="num_bits must be a positive integer, got 0"):
        fake_tensor_quant(torch.ones(2), 1.0, num_bits=0)


def test_quant_descriptor_as_nvidia():
    # item 6: amax is stored as a float32 ndarray; a list is accepted, an int refused
    desc = QuantDescriptor(amax=[1.0, 2.5])
    assert isinstance(desc.amax, np.ndarray) and desc.amax.dtype == np.float32 and desc.amax.tolist() == [1.0, 2.5]
    scalar = QuantDescriptor(amax=2.0).amax
    assert isinstance(scalar, np.ndarray) and scalar.shape == () and scalar.dtype == np.float32
    with pytest.raises(TypeError, match="must be float, list or ndarray, not <class 'int'>"):  # NVIDIA's words
        QuantDescriptor(amax=1)
    with pytest.raises(TypeError, match="amax must be float, list or ndarray, not <class 'str'>"):
        QuantDescriptor(amax="oops", learn_amax=True)
    with pytest.raises(TypeError, match="not <class 'torch.Tensor'>"):
        QuantDescriptor(amax=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"amax must be finite and >= 0, got \[1.0, nan\]"):
        QuantDescriptor(amax=[1.0, float("nan")])  # deliberate: NVIDIA stores it and returns NaN
    # num_bits: any positive integer (NVIDIA has no upper limit); 0 and FP8 (4, 3) are not offered
    assert QuantDescriptor(num_bits=17).num_bits == 17
    codes, _ = tensor_quant(torch.tensor([1.0, -1.0]), 1.0, num_bits=17)
    assert codes.tolist() == [65535.0, -65535.0]
    with pytest.raises(ValueError, match="num_bits must be a positive integer, got 0"):
        QuantDescriptor(num_bits=0)
    with pytest.raises(TypeError, match=r"FP8 E4M3 needs NVIDIA's CUDA extension"):
        QuantDescriptor(num_bits=(4, 3))
    with pytest.raises(ValueError, match="unknown calib_method 'kl'"):
        QuantDescriptor(calib_method="kl")
    # item 7: NVIDIA's other keywords, read-only afterwards
    desc = QuantDescriptor(8, "conv1.input", fake_quant=False, learn_amax=True, scale_amax=0.5, narrow_range=True)
    assert (desc.name, desc.fake_quant, desc.learn_amax, desc.scale_amax, desc.narrow_range) == \
        ("conv1.input", False, True, 0.5, True)
    assert desc.dict() == {"num_bits": 8, "name": "conv1.input", "fake_quant": False, "scale_amax": 0.5,
                           "learn_amax": True, "narrow_range": True}
    with pytest.raises(AttributeError):
        desc.num_bits = 4
    with pytest.raises(TypeError, match="axis is ignored and must be None"):
        QuantDescriptor(axis=(1, 2), amax=0.7, learn_amax=True)
    with pytest.raises(TypeError, match="name must be a string"):
        QuantDescriptor(8, 3)
    with pytest.raises(TypeError, match=r"Unused keys: dict_keys\(\['num_bit'\]\)"):
        QuantDescriptor(num_bit=8)  # unknown keyword, refused in NVIDIA's words
    assert QuantDescriptor(amax=[1.0]) == QuantDescriptor(amax=[1.0]) != QuantDescriptor(amax=[2.0])


def test_reduce_amax_reduces_the_given_axes():
    # item 7: utils.reduce_amax(input, axis, keepdims) reduces the dims in axis (numpy style)
    x = torch.tensor([[1.0, -3.0, 2.0], [-4.0, 0.5, 1.0]])
    assert reduce_amax(x).item() == 4.0 and reduce_amax(x).dim() == 0
    assert reduce_amax(x, axis=1).tolist() == [[3.0], [4.0]]
    assert reduce_amax(x, axis=0, keepdims=False).tolist() == [4.0, 3.0, 2.0]
    assert reduce_amax(x, axis=(0,)).tolist() == [[4.0, 3.0, 2.0]]
    assert reduce_amax(x, axis=(0, 1)).shape == ()  # one value: squeezed
    assert reduce_amax(x, axis=[1], keepdims=False).tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="Cannot reduce more axes than tensor's dim"):
        reduce_amax(x, axis=(0, 1, 2))
    assert not reduce_amax(x.requires_grad_()).requires_grad


def test_tensor_quant_imports_as_the_module_like_nvidias():
    """`from pytorch_quantization import tensor_quant` is the module; so is ours (the
    package does not re-export the function over its submodule)."""
    import types

    import vquant_pl.nvidia.tensor_quant as by_path
    from vquant_pl.nvidia import tensor_quant as module

    assert isinstance(module, types.ModuleType) and module is by_path
    assert callable(module.tensor_quant) and module.QuantDescriptor is QuantDescriptor
    import vquant_pl

    assert vquant_pl.tensor_quant is tensor_quant  # the top level keeps the function (documented API)


def test_signed_one_bit_is_refused_where_nvidia_gives_nan():
    """Review defect 7: max_bound 2^0 - 1 = 0, scale 0, codes / scale = NaN."""
    x = torch.tensor([0.5, -0.5, 1.0])
    for quant in (tensor_quant, fake_tensor_quant):
        with pytest.raises(ValueError, match="signed quantization needs num_bits >= 2, got 1"):
            quant(x, 1.0, num_bits=1)
    with pytest.raises(ValueError, match="signed quantization needs num_bits >= 2, got 1"):
        QuantDescriptor(num_bits=1)
    assert QuantDescriptor(num_bits=1, unsigned=True).num_bits == 1
    assert fake_tensor_quant(x.abs(), 1.0, num_bits=1, unsigned=True).tolist() == [0.0, 0.0, 1.0]  # 0.5: even
