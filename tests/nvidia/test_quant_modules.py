"""NVIDIA pytorch-quantization 2.2.1 modules: TensorQuantizer settings, quant layers,
initialize()/deactivate(), calibrate (issue 13, items 2, 3 and 7)."""

import numpy as np
import pytest
import torch
from torch import nn

from vquant_pl.nvidia import quant_modules
from vquant_pl.nvidia.quant_modules import (QuantConv2d, QuantLinear, TensorQuantizer, calibrate, deactivate, initialize,
                                     quantized_layers)
from vquant_pl.nvidia.tensor_quant import QuantDescriptor, fake_tensor_quant


def test_tensor_quantizer_in_flight_fixed_and_per_channel():
    x = torch.randn(4, 3, 5, 5)
    dynamic = TensorQuantizer(QuantDescriptor(num_bits=8))
    assert torch.equal(dynamic(x), fake_tensor_quant(x, x.abs().max(), 8, narrow_range=False))
    fixed = TensorQuantizer(QuantDescriptor(num_bits=4, amax=1.0))
    out = fixed(x)  # not narrow range: codes -8..7, so -8/7 * amax .. amax
    assert out.max() <= 1.0 and out.min() == pytest.approx(-8 / 7) and fixed.amax.item() == 1.0
    per_channel = TensorQuantizer(QuantDescriptor(num_bits=8, axis=0))
    amax = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(per_channel(x), fake_tensor_quant(x, amax, 8, narrow_range=False))
    last = TensorQuantizer(QuantDescriptor(num_bits=8, axis=-1))  # negative axes count from the end
    assert torch.equal(last(x), fake_tensor_quant(x, x.abs().amax(dim=(0, 1, 2), keepdim=True), 8, narrow_range=False))


def test_settings_changed_after_construction_are_used():
    # item 2: num_bits / unsigned / narrow_range are mutable and the next forward uses them
    x = torch.tensor([0.3, 0.6, -1.0, 0.9])
    q = TensorQuantizer(QuantDescriptor(amax=1.0))
    q.num_bits = 2  # codes -2..1 of step 1: round(0.3)=0, round(0.6)=1, -1, 1
    assert q(x).tolist() == [0.0, 1.0, -1.0, 1.0]
    q.narrow_range = True
    assert q(torch.tensor([-1.0])).tolist() == [-1.0]
    q.num_bits, q.narrow_range, q.unsigned = 3, False, True  # codes 0..7 of step 1/7
    assert torch.equal(q(x.abs()), fake_tensor_quant(x.abs(), 1.0, 3, unsigned=True, narrow_range=False))
    with pytest.raises(AttributeError, match="axis"):
        q.axis = 0  # read-only, as NVIDIA's
    with pytest.raises(ValueError, match="num_bits must be a positive integer"):
        q.num_bits = 0



def test_pre_quant_scale_as_pytorch_quantization_2_2():
    q = TensorQuantizer(QuantDescriptor(num_bits=8, amax=4.0))
    assert q.pre_quant_scale is None
    x = torch.tensor([[0.5, -1.0, 1.5]])
    q.pre_quant_scale = torch.tensor([2.0, 1.0, 0.5])
    assert torch.equal(q(x), fake_tensor_quant(x * torch.tensor([2.0, 1.0, 0.5]), torch.tensor(4.0)))
    assert "pre_quant_scale" in repr(q) and "_pre_quant_scale" in q.state_dict()
    with pytest.raises(RuntimeError, match="Changing shape when setting pre_quant_scale is not allowed"):
        q.pre_quant_scale = torch.tensor(2.0)
    q.pre_quant_scale = None  # NVIDIA: meaningless, nothing changes
    assert q.pre_quant_scale.tolist() == [2.0, 1.0, 0.5]
    q.disable()
    assert torch.equal(q(x), x * q.pre_quant_scale)  # NVIDIA scales before the disabled check
    fresh = TensorQuantizer(QuantDescriptor(num_bits=8, amax=4.0))
    fresh.load_state_dict(q.state_dict())  # a checkpoint's scale loads into a quantizer without one
    assert torch.equal(fresh.pre_quant_scale, q.pre_quant_scale)


def test_learnable_clip_bounds_must_be_scalar_in_nvidias_words():
    from vquant_pl.nvidia.quant_modules import Clip

    with pytest.raises(ValueError, match="must be scalar"):
        Clip(np.array([-1.0, -2.0]), 1.0, learn_min=True)


def test_zero_amax_quantizer_outputs_zero():
    # item 3: an amax set to 0 gives 0 (was 1e-12)
    q = TensorQuantizer()
    q.amax = 0.0
    assert q(torch.tensor([0.3, -5.0])).tolist() == [0.0, 0.0]
    per_channel = TensorQuantizer(QuantDescriptor(axis=0))
    out = per_channel(torch.tensor([[0.0, 0.0], [1.0, -0.5]]))  # channel 0's in-flight amax is 0
    assert out[0].tolist() == [0.0, 0.0] and out[1, 0].item() == 1.0


def test_amax_setter_and_state_dict():
    q = TensorQuantizer(QuantDescriptor(axis=0))
    q.amax = torch.tensor([[1.0], [2.0]])
    with pytest.raises(TypeError, match=r"Changing shape when setting amax is not allowed: \(2, 1\) -> \(3, 1\)"):
        q.amax = torch.ones(3, 1)
    q.amax = torch.tensor([[3.0], [4.0]])
    assert q.amax.tolist() == [[3.0], [4.0]] and torch.equal(q.step_size, q.amax / 127.0)
    fresh = TensorQuantizer(QuantDescriptor(axis=0))  # dynamic: no amax buffer yet
    fresh.load_state_dict(q.state_dict())
    assert fresh.amax.tolist() == [[3.0], [4.0]]
    with pytest.raises(RuntimeError, match="Calibrator returned None"):
        TensorQuantizer().load_calib_amax()
    lenient = TensorQuantizer()
    lenient.load_calib_amax(strict=False)
    assert lenient.amax.isnan().item()


def test_scale_amax_learn_amax_and_integer_mode():
    x = torch.tensor([-3.0, 0.5, 2.5, 1.0], requires_grad=True)
    half = TensorQuantizer(QuantDescriptor(amax=2.0, scale_amax=0.5))  # amax 1.0 in use
    assert torch.equal(half(x), fake_tensor_quant(x, 1.0, 8, narrow_range=False))
    learned = TensorQuantizer(QuantDescriptor(amax=2.0, learn_amax=True))
    assert learned.clip.clip_value_max.item() == 2.0 and learned.clip.clip_value_min.item() == -2.0
    learned(x).sum().backward()
    # inside (-2, 2) the gradient passes; the clip bounds get the gradients of what they clip
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert learned.clip.clip_value_max.grad.item() == 1.0 and learned.clip.clip_value_min.grad.item() == 1.0
    with pytest.raises(ValueError, match="learn_amax is False. Cannot enable clip."):
        TensorQuantizer(if_clip=True)
    integer = TensorQuantizer(QuantDescriptor(amax=1.0, fake_quant=False, narrow_range=False))
    # integer codes; NVIDIA's quantizer uses tensor_quant's narrow range here whatever the descriptor says
    assert integer(torch.tensor([-1.0, 0.5])).tolist() == [-127.0, 64.0] and integer.scale.item() == 127.0


def test_quant_layers_expose_their_quantizers():
    # item 7: input_quantizer / weight_quantizer, class defaults, fake quantization only
    layer = QuantLinear(3, 2, quant_desc_input=QuantDescriptor(num_bits=4))
    assert layer.input_quantizer is layer._input_quantizer and layer.input_quantizer.num_bits == 4
    assert layer.weight_quantizer.axis == 0 and QuantConv2d(1, 2, 1).weight_quantizer.axis == 0
    with pytest.raises(ValueError, match="Only fake quantization is supported!"):
        QuantLinear(3, 2, quant_desc_weight=QuantDescriptor(fake_quant=False))
    try:
        QuantConv2d.set_default_quant_desc_input(QuantDescriptor(num_bits=6))
        assert QuantConv2d(1, 1, 1).input_quantizer.num_bits == 6 and QuantLinear(1, 1).input_quantizer.num_bits == 8
    finally:
        QuantConv2d.set_default_quant_desc_input(QuantDescriptor(num_bits=8))
    with pytest.raises(ValueError, match="is not an instance of QuantDescriptor"):
        QuantLinear.set_default_quant_desc_weight(8)


def test_initialize_and_deactivate():
    original_conv, original_linear = nn.Conv2d, nn.Linear
    try:
        initialize(float_module_list=["Linear"])
        initialize()  # twice: deactivate still brings back the float classes
        assert nn.Conv2d is QuantConv2d and isinstance(nn.Conv2d(1, 1, 1), QuantConv2d)
        assert nn.Linear is QuantLinear
    finally:
        deactivate()
    assert nn.Conv2d is original_conv and nn.Linear is original_linear
    try:
        initialize(custom_quant_modules=[(nn, "Linear", QuantLinear)], float_module_list=["Linear", "Conv2d"])
        assert nn.Linear is QuantLinear and nn.Conv2d is original_conv
    finally:
        deactivate()
    assert nn.Linear is original_linear and quant_modules._ORIGINALS == {}


def test_drop_in_layers_and_context_manager():
    import torchvision

    original = nn.Conv2d
    with quantized_layers():
        model = torchvision.models.resnet18(num_classes=10)
    assert nn.Conv2d is original  # restored
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    conv = model.conv1
    x = torch.rand(2, 3, 32, 32)
    xq = fake_tensor_quant(x, x.abs().max(), 8, narrow_range=False)
    wq = fake_tensor_quant(conv.weight, conv.weight.detach().abs().amax((1, 2, 3), keepdim=True), 8, narrow_range=False)
    assert torch.equal(conv(x), nn.functional.conv2d(xq, wq, None, conv.stride, conv.padding))


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_calibrators(method):
    layer = QuantLinear(16, 4, quant_desc_input=QuantDescriptor(num_bits=8, calib_method=method))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(256, 16, generator=g) for _ in range(3)]
    batches[0][0, 0] = 40.0  # one outlier (in the first batch: the histogram keeps 2048 bins)
    kwargs = {"percentile": 99.9} if method == "percentile" else {}  # 99.99 of 8192 values is the outlier
    assert calibrate(layer, batches, num_batches=2, **kwargs) == 2
    amax = layer.input_quantizer.amax.item()
    if method == "max":
        assert amax == 40.0
    else:
        assert 2.0 < amax < 40.0  # the histogram methods clip the outlier
    assert torch.equal(layer.weight_quantizer.amax, layer.weight.detach().abs().amax(1, keepdim=True))
    assert layer.input_quantizer._if_quant and not layer.input_quantizer._if_calib


def test_histogram_descriptor_needs_a_method():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram"), if_calib=True)
    q(torch.arange(100.0))
    with pytest.raises(TypeError, match="calib_method 'histogram' needs a method"):
        q.load_calib_amax()
    q.load_calib_amax("percentile", percentile=90)
    assert q.amax.item() == 1841 * 99 / 2048
    with pytest.raises(NotImplementedError, match="per tensor only"):
        TensorQuantizer(QuantDescriptor(calib_method="histogram", axis=0))


def test_initialize_inside_quantized_layers_still_restores_the_float_classes():
    """Review defect 5: the Quant class was recorded as the original."""
    original_conv, original_linear = nn.Conv2d, nn.Linear
    try:
        with quantized_layers():
            initialize()
            initialize()  # again: a no-op for what is already swapped
        assert nn.Conv2d is QuantConv2d  # initialize() holds after the block
    finally:
        deactivate()
    assert nn.Conv2d is original_conv and nn.Linear is original_linear and quant_modules._ORIGINALS == {}
    try:
        initialize()
        with quantized_layers():
            deactivate()
        assert nn.Conv2d is original_conv  # a deactivate() inside the block holds too
        with quantized_layers():
            with quantized_layers():
                pass
            assert nn.Conv2d is QuantConv2d  # nested blocks
    finally:
        deactivate()
    assert nn.Conv2d is original_conv and nn.Linear is original_linear


def test_initialize_checks_every_entry_before_swapping_anything():
    original_conv, original_linear = nn.Conv2d, nn.Linear
    with pytest.raises(AttributeError, match="custom_quant_modules: 'torch.nn' has no attribute 'NoSuchLayer' "
                                             r"\(nothing was swapped\)"):
        initialize(custom_quant_modules=[(nn, "NoSuchLayer", QuantLinear)])
    with pytest.raises(TypeError, match=r"\(module, name, replacement\) triples"):
        initialize(custom_quant_modules=[(nn, "Linear")])
    assert nn.Conv2d is original_conv and nn.Linear is original_linear and quant_modules._ORIGINALS == {}


def test_calibrate_refuses_a_method_that_no_calibrator_uses():
    """Review defect 6: method="percentile" on max calibrators was ignored (amax stayed the max)."""
    layer = QuantLinear(16, 4)  # max calibrators only
    x = torch.randn(256, 16)
    with pytest.raises(TypeError, match=r"calibrate\(method='percentile', percentile=99.0\): every quantizer has a "
                                        r"max calibrator, which computes the max only \(\['_input_quantizer', "
                                        r"'_weight_quantizer'\]\)"):
        calibrate(layer, [x], method="percentile", percentile=99.0)
    assert layer.input_quantizer.amax is None  # refused before any batch ran
    hist = QuantLinear(16, 4, quant_desc_input=QuantDescriptor(calib_method="histogram"))
    with pytest.raises(TypeError, match=r"method='max': the histogram calibrators of \['_input_quantizer'\]"):
        calibrate(hist, [x], method="max")
    calibrate(hist, [x], method="percentile", percentile=99.0)  # weights: max, as NVIDIA's compute_amax recipe
    assert torch.equal(hist.weight_quantizer.amax, hist.weight.detach().abs().amax(1, keepdim=True))


@pytest.mark.parametrize("fail", [False, True])
def test_calibrate_runs_in_eval_mode_and_restores_each_training_flag(fail):
    """Review defect 8: in train mode BatchNorm running statistics moved during calibration."""
    model = nn.Sequential(QuantConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    stats = model[1].running_mean.clone(), model[1].running_var.clone(), model[1].num_batches_tracked.clone()
    seen = []

    def batches():
        seen.append(model[1].training)
        yield torch.randn(8, 3, 8, 8) + 3
        if fail:
            raise RuntimeError("loader failed")

    if fail:
        with pytest.raises(RuntimeError, match="loader failed"):
            calibrate(model, batches())
    else:
        calibrate(model, batches())
    assert seen == [False]
    assert all(torch.equal(a, b) for a, b in zip(stats, (model[1].running_mean, model[1].running_var,
                                                          model[1].num_batches_tracked)))
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]


def test_fixed_per_channel_clip_has_a_backward():
    """Review defect 9: only a bound that needs a gradient must be a scalar (as NVIDIA's)."""
    from vquant_pl.nvidia.quant_modules import Clip

    x = torch.tensor([0.5, 3.0], requires_grad=True)
    Clip(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]))(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]
    learned = Clip(torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"Learnable min value must be scalar, got size \(2,\)"):
        learned(torch.tensor([0.5, 3.0], requires_grad=True)).sum().backward()
