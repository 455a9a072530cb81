"""Model-level quantization: which layers, the probe rule, restore, determinism, errors."""
import copy
import warnings

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl.ops.affine import ActivationQuantizer


class Net(nn.Module):
    """Conv -> ReLU -> Conv (subclass, in a ModuleList) -> ReLU -> pool -> Linear (in a ModuleDict)."""

    class MyConv(nn.Conv2d):
        pass

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.ModuleList([Net.MyConv(8, 8, 3, padding=1), nn.BatchNorm2d(8)])
        self.head = nn.ModuleDict({"fc": nn.Linear(8, 10)})

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.body[1](self.body[0](x)))
        return self.head["fc"](x.mean((2, 3)))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), k
    for m in model.modules():
        assert not m._forward_pre_hooks


PROBE = vq.Probe(seed=3, shape=(4, 3, 16, 16))


@pytest.mark.parametrize("name,count", [("resnet18", 21), ("resnet50", 54), ("inceptionv3", 95),
                                        ("sqnxt23_w2", 112), ("shufflenet_g1_w1", 50)])
def test_paper_models_layer_counts(name, count):
    from pytorchcv.model_provider import get_model

    model = get_model(name, pretrained=False)
    report = vq.quantize_model(model, weight_bits=4, act_bits=None)
    assert report.num_layers == len(report.layers) == count
    vq.restore_model(model)


def test_timm_conv2d_same_and_subclasses_are_quantized():
    import timm
    from timm.layers import Conv2dSame

    model = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=10).eval()
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert any(isinstance(m, Conv2dSame) for m in model.modules())
    # sigma ranges: with random init the running statistics do not describe the activations
    report = vq.quantize_model(model, 8, 8, act_range="sigma", probe=vq.Probe(shape=(2, 3, 64, 64)))
    assert [r.name for r in report.layers] == expected
    assert "Conv2dSame" in {r.kind for r in report.layers}
    vq.restore_model(model)


def test_layers_in_containers_and_subclasses_keep_types_and_keys():
    model = Net()
    keys = list(model.state_dict())
    types = [type(m) for m in model.modules()]
    report = vq.quantize_model(model, 4, 4, probe=PROBE)
    assert [r.name for r in report.layers] == ["stem", "body.0", "head.fc"]
    assert [r.kind for r in report.layers] == ["Conv2d", "MyConv", "Linear"]
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == types
    vq.restore_model(model)


def test_probe_rule_is_progressive_first_float_last_8bit():
    """Ranges measured on the input that reaches each layer from already quantized layers."""
    torch.manual_seed(1)
    model = Net().eval()
    float_model = Net().eval()
    float_model.load_state_dict(model.state_dict())
    x = PROBE.tensor(PROBE.shape)
    report = vq.quantize_model(model, weight_bits=4, act_bits=4, probe=PROBE)

    def qw(layer):
        return vq.quantize_weight(layer.weight, 4)

    m = float_model
    with torch.no_grad():
        h = torch.relu(nn.functional.conv2d(x, qw(m.stem), m.stem.bias, padding=1))  # input float
        lo1, hi1, s1 = vq.sigma_range(h, 4, 12.0)
        h = ActivationQuantizer(4, lo1, hi1, s1)(h)
        h = torch.relu(m.body[1](nn.functional.conv2d(h, qw(m.body[0]), m.body[0].bias, padding=1)))
        h = h.mean((2, 3))
        lo2, hi2, s2 = vq.sigma_range(h, 8, 12.0)  # last layer: 8 bits, the run's sigma, no clip
        expected = nn.functional.linear(ActivationQuantizer(8, lo2, hi2, s2)(h), qw(m.head["fc"]), m.head["fc"].bias)
        got = model(x)
    rows = report.layers
    assert rows[0].act_bits is None and rows[0].note.startswith("first layer")
    assert (rows[1].act_bits, rows[1].act_lo, rows[1].act_hi, rows[1].signed) == (4, lo1, hi1, s1)
    assert (rows[2].act_bits, rows[2].act_lo, rows[2].act_hi, rows[2].signed) == (8, lo2, hi2, s2)
    assert torch.equal(got, expected)
    vq.restore_model(model)


def test_restore_is_bit_identical_and_weights_quantized_once():
    model = Net().eval()
    snapshot = _snapshot(model)
    vq.quantize_model(model, 4, 4, probe=PROBE)
    assert not torch.equal(model.stem.weight, snapshot["stem.weight"])
    quantized = model.stem.weight.clone()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    assert torch.equal(model.stem.weight, quantized)
    vq.restore_model(model)
    _assert_same(model, snapshot)
    assert not vq.is_quantized(model)


def test_quantized_model_deepcopies_and_runs_the_same():
    import copy

    model = Net().eval()
    vq.quantize_model(model, 4, 4, probe=PROBE)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), expected)
    vq.restore_model(model)


def test_same_probe_same_result():
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    probe = torch.rand(4, 3, 16, 16)
    ra = vq.quantize_model(a, 4, 4, probe=probe)
    rb = vq.quantize_model(b, 4, 4, probe=probe.clone())
    assert [(r.act_lo, r.act_hi, r.signed) for r in ra.layers] == [(r.act_lo, r.act_hi, r.signed) for r in rb.layers]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    vq.restore_model(a), vq.restore_model(b)
    rc = vq.quantize_model(a, 4, 4, probe=vq.Probe(seed=3, shape=(4, 3, 16, 16)))
    rd = vq.quantize_model(b, 4, 4, probe=vq.Probe(seed=3, shape=(4, 3, 16, 16)))
    assert [r.act_hi for r in rc.layers] == [r.act_hi for r in rd.layers]


def test_default_probe_is_256_at_model_input_size():
    import timm

    from vquant_pl.probe import model_input_size

    model = Net()
    model.in_size = (20, 24)  # as pytorchcv models carry it
    seen = []
    model.stem.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    vq.quantize_model(model, 8, 8)
    assert seen == [(1, 3, 20, 24), (256, 3, 20, 24)]  # one-sample shape check, then the probe
    vq.restore_model(model)
    assert model_input_size(timm.create_model("inception_v3", pretrained=False)) == (299, 299)


def test_default_probe_follows_the_preprocessing_that_travels_with_the_model():
    """The probe was drawn at 224 for models whose preprocessing says otherwise (torchvision's
    inception_v3 at 299, a timm model evaluated at its test size)."""
    import timm

    from vquant_pl.models import Preprocessing, attach_preprocessing, create_model
    from vquant_pl.probe import model_input_size

    net = attach_preprocessing(Net(), Preprocessing(input_size=(20, 28)))
    seen = []
    net.stem.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    vq.quantize_model(net, 8, 8)
    assert seen == [(1, 3, 20, 28), (256, 3, 20, 28)]
    vq.restore_model(net)
    assert model_input_size(create_model("torchvision:inception_v3", pretrained=False)[0]) == (299, 299)
    tested = timm.create_model("resnet18", pretrained=False)
    tested.pretrained_cfg = {**tested.pretrained_cfg, "input_size": (3, 224, 224), "test_input_size": (3, 288, 288)}
    assert model_input_size(tested) == (288, 288)


def test_report_has_layers_and_totals():
    report = vq.quantize_model(Net(), 4, 4, probe=PROBE)
    assert report.num_weights == 8 * 3 * 9 + 8 * 8 * 9 + 10 * 8
    assert all(r.weight_mse > 0 and r.time_ms >= 0 for r in report.layers)
    text = report.table()
    assert "3 layers" in text and "body.0" in text and "W4A4 squant" in text


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weight_bits=1), ValueError, "weight_bits must be an integer in 2..8, got 1"),
    (dict(act_bits=9), ValueError, "act_bits must be an integer in 2..8, got 9"),
    (dict(rounding="squant-z"), ValueError, "unknown rounding 'squant-z'"),
    (dict(act_range="minmax"), ValueError, "unknown act_range 'minmax'"),
    (dict(sigma=-1), ValueError, "sigma must be a positive finite number"),
    (dict(probe=torch.rand(2, 1, 16, 16)), ValueError, r"probe of shape \(2, 1, 16, 16\) does not fit Net"),
    (dict(probe=torch.rand(16, 16)), ValueError, r"probe of shape \(16, 16\) does not fit Net"),
    (dict(probe="noise"), TypeError, "probe must be a Tensor"),
])
def test_bad_input_is_named_and_model_untouched(kwargs, error, match):
    model = Net()
    snapshot = _snapshot(model)
    with pytest.raises(error, match=match):
        vq.quantize_model(model, **({"probe": PROBE} | kwargs))
    _assert_same(model, snapshot)
    assert not vq.is_quantized(model)


def test_failure_during_probe_pass_restores_model():
    model = Net()
    snapshot = _snapshot(model)
    calls = []

    def fail_on_probe(module, args):
        calls.append(args[0].shape[0])
        if args[0].shape[0] > 1:
            raise RuntimeError("boom")
    model.head["fc"].register_forward_pre_hook(fail_on_probe)
    with pytest.raises(RuntimeError, match="probe pass through the quantized model failed: boom"):
        vq.quantize_model(model, 4, 4, probe=PROBE)
    model.head["fc"]._forward_pre_hooks.clear()
    _assert_same(model, snapshot)


def test_no_layers_and_double_quantization():
    with pytest.raises(ValueError, match="Sequential has no Conv1d/Conv2d/Conv3d/Linear layer"):
        vq.quantize_model(nn.Sequential(nn.ReLU()), 4, 4)
    model = Net()
    vq.quantize_model(model, 4, 4, probe=PROBE)
    with pytest.raises(RuntimeError, match="already quantized"):
        vq.quantize_model(model, 4, 4, probe=PROBE)
    with pytest.raises(RuntimeError, match=r"already quantized \(layer 'fc'\)"):
        vq.quantize_model(model.head, 4, 4)
    vq.restore_model(model)
    with pytest.raises(ValueError, match="Net is not quantized by vquant_pl"):
        vq.restore_model(model)


def test_float_activations_leave_inputs_untouched():
    model = Net()
    report = vq.quantize_model(model, 4, act_bits=None)
    assert report.act_bits is None and all(r.act_bits is None for r in report.layers)
    assert all(not m._forward_pre_hooks for m in model.modules())
    vq.restore_model(model)


def test_shared_memory_weights_are_never_written():
    """ddp_spawn on CPU / Hogwild: other processes read the shared storage."""
    model = Net().eval()
    model.share_memory()
    shared = model.stem.weight.data
    before = shared.clone()
    vq.quantize_model(model, 4, 4, probe=PROBE)
    assert torch.equal(shared, before) and not torch.equal(model.stem.weight, before)
    vq.restore_model(model)
    assert torch.equal(model.stem.weight, before)


# -- issue 18 items 1-4: weights recomputed on access, shared storage, a user's own originals, meta --------------
def _distinct_per_channel(w: torch.Tensor) -> int:
    flat = w.detach().reshape(w.shape[0], -1)
    return max(len(torch.unique(row)) for row in flat)


def _two_layer_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 10))


def test_a_pruned_layer_runs_quantized_keeps_its_mask_and_restores_exactly():
    from torch.nn.utils import prune

    net = _two_layer_net()
    prune.l1_unstructured(net[2], "weight", amount=0.5)
    orig, mask = net[2].weight_orig.detach().clone(), net[2].weight_mask.clone()
    x = torch.rand(2, 3, 8, 8)
    float_out = net(x)
    report = vq.quantize_model(net, weight_bits=2, act_bits=None)
    net(x)  # the pruning pre-hook recomputes weight = weight_orig * mask
    w = net[2].weight
    assert _distinct_per_channel(w) <= 2 ** 2 + 1  # four codes, and the pruned zeros
    assert torch.equal(w == 0, (mask == 0) | (w == 0)) and bool((w[mask == 0] == 0).all())
    assert "pruned" in report.layers[1].note
    vq.restore_model(net)
    assert torch.equal(net[2].weight_orig, orig) and torch.equal(net[2].weight_mask, mask)
    assert torch.equal(net(x), float_out)


@pytest.mark.parametrize("kind", ["parametrize", "weight_norm"])
def test_a_weight_recomputed_by_a_parametrization_is_refused_naming_the_layer(kind):
    net = _two_layer_net()
    if kind == "parametrize":
        torch.nn.utils.parametrizations.weight_norm(net[2])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(net[2])
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"layer '2': its weight is recomputed"):
        vq.quantize_model(net, weight_bits=2, act_bits=None)
    assert not vq.is_quantized(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_weights_viewing_one_storage_are_quantized_once_and_restored():
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    shared = torch.randn(16, 16)
    a.weight, b.weight = nn.Parameter(shared), nn.Parameter(shared)  # two Parameters, one storage
    assert a.weight is not b.weight and a.weight.data_ptr() == b.weight.data_ptr()
    net = nn.Sequential(nn.Linear(4, 16), a, nn.ReLU(), b)
    before = shared.clone()
    report = vq.quantize_model(net, weight_bits=4, act_bits=None)
    assert "quantized once" in report.layers[2].note
    assert torch.equal(a.weight, vq.quantize_weight(before, 4))  # quantized once, not twice
    vq.restore_model(net)
    assert torch.equal(a.weight, before) and torch.equal(b.weight, before)


def test_weights_over_overlapping_parts_of_one_storage_are_refused():
    big = torch.randn(32, 16)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    a.weight, b.weight = nn.Parameter(big[:16]), nn.Parameter(big[8:24])
    net = nn.Sequential(nn.Linear(4, 16), a, b)
    with pytest.raises(ValueError, match=r"layers '1' and '2' are different views of one storage"):
        vq.quantize_model(net, weight_bits=4, act_bits=None)
    assert not vq.is_quantized(net)


def test_save_original_before_quantize_model_is_the_documented_workflow():
    net = _two_layer_net()
    float_weight = net[0].weight.detach().clone()
    vq.save_original(net[0], "weight")
    with torch.no_grad():
        net[0].weight.mul_(0.5)  # a transform of the user's own
    vq.quantize_model(net, weight_bits=4, act_bits=4, probe=vq.Probe(shape=(4, 3, 8, 8)))
    vq.restore_model(net)
    assert torch.equal(net[0].weight, float_weight)  # the transform is undone too, as documented


def test_a_failed_run_keeps_a_users_own_transform():
    net = _two_layer_net()
    vq.save_original(net[0], "weight")
    with torch.no_grad():
        net[0].weight.mul_(0.5)
    halved = net[0].weight.detach().clone()
    with pytest.raises(ValueError):
        vq.quantize_model(net, weight_bits=4, act_bits=4, probe=torch.rand(2, 3, 3, 3))  # too small a probe
    assert torch.equal(net[0].weight, halved)  # as it was before the call, the user's change kept
    vq.restore_model(net)
    assert not torch.equal(net[0].weight, halved)


def test_a_model_on_the_meta_device_is_refused_naming_the_tensor():
    with torch.device("meta"):
        net = _two_layer_net()
    with pytest.raises(ValueError, match=r"'0.weight' is on the meta device"):
        vq.quantize_model(net)
    net = _two_layer_net()
    net[3] = nn.BatchNorm2d(16, device="meta")
    with pytest.raises(ValueError, match=r"'3.weight' is on the meta device"):
        vq.quantize_model(net)


def test_an_already_quantized_model_names_the_layer():
    net = _two_layer_net()
    vq.quantize_model(net, act_bits=None)
    with pytest.raises(RuntimeError, match=r"already quantized \(layer '0'\)"):
        vq.quantize_model(net, act_bits=None)


# -- issue 18 items 5-6: the sigma actually used; a module called more than once per forward ----------------------
def test_the_report_gives_a_sigma_only_when_a_layer_used_the_sigma_rule():
    net = _two_layer_net()
    report = vq.quantize_model(net, 4, 4, act_range="aciq-laplace", probe=vq.Probe(shape=(8, 3, 8, 8)))
    assert report.sigma is None and report.sigma_layers == [] and report.to_dict()["config"]["sigma"] is None
    assert {r.act_rule for r in report.layers[1:]} == {"aciq-laplace"}
    vq.restore_model(net)
    report = vq.quantize_model(net, 4, 4, act_range="sigma", probe=vq.Probe(shape=(8, 3, 8, 8)))
    assert report.sigma == 12.0 and report.sigma_layers == ["2", "5"]


def test_bn_ranges_on_every_layer_report_no_sigma():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    report = vq.quantize_model(net, 4, 4, act_range="bn")
    assert report.probe_time_s == 0.0 and report.sigma is None
    assert [r.act_rule for r in report.layers] == [None, "bn", "bn"]


class Siamese(nn.Module):
    """One block applied to two inputs of very different scale in one forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.shared = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.stem(x)
        a = self.shared(h).mean((2, 3))
        b = self.shared(h * 20).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


def test_a_module_called_twice_is_ranged_over_every_call_and_named_in_the_report():
    torch.manual_seed(0)
    net = Siamese()
    probe = torch.rand(16, 3, 10, 10)
    h = net.stem(probe)
    report = vq.quantize_model(net, 8, 8, act_range="sigma", probe=probe)
    row = report.layers[1]
    assert row.name == "shared" and row.calls == 2 and report.multi_call_layers == ["shared"]
    assert "called 2 times per forward" in row.note and "shared" in report.table()
    # the range covers the larger second call: the sigma rule on h * 20
    _, hi, signed = vq.sigma_range(h * 20, 8, 25.0)
    q = vq.activation_ranges(net)[1]
    assert q[0] == 8 and q[2] >= hi * 0.5 and q[1] <= -hi * 0.5 if signed else q[2] >= hi * 0.99


def test_a_module_called_twice_under_bn_ranges_covers_every_producer():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
            self.shared = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = self.stem(x)
            a = self.shared(torch.relu(self.bn_a(h))).mean((2, 3))
            b = self.shared(torch.relu(self.bn_b(h))).mean((2, 3))
            return self.head(torch.cat([a, b], 1))

    net = TwoBranches().eval()
    with torch.no_grad():
        net.bn_a.bias.fill_(1.0), net.bn_a.weight.fill_(0.5)
        net.bn_b.bias.fill_(4.0), net.bn_b.weight.fill_(2.0)
    report = vq.quantize_model(net, 8, 8, act_range="bn", bn_k=3.0)
    row = next(r for r in report.layers if r.name == "shared")
    assert row.calls == 2 and row.act_rule == "bn"
    assert row.act_lo == 0.0 and row.act_hi == pytest.approx(4.0 + 3 * 2.0)  # branch b's range, the wider one


# -- review of issues 17/18: edges ------------------------------------------------------
def test_a_bias_recomputed_on_access_is_not_reported_bias_corrected():
    """A pruned or parametrized bias is recomputed from its factors before every forward: a
    correction written into it would be lost while the report says "bias corrected"."""
    from torch.nn.utils import parametrize, prune

    class Same(nn.Module):
        def forward(self, b):
            return b * 1.0

    for make in (lambda layer: prune.l1_unstructured(layer, "bias", amount=0.5),
                 lambda layer: parametrize.register_parametrization(layer, "bias", Same())):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
        make(net[3])
        report = vq.quantize_model(net, 4, 4)
        assert "bias corrected (" not in report.layers[1].note
        assert "bias recomputed on access" in report.layers[1].note
        vq.restore_model(net)


def test_a_first_layer_called_twice_is_named_in_the_report():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.c(x) + self.c(x.flip(-1))).mean((2, 3)))

    report = vq.quantize_model(Twice(), 4, 4, "squant", "sigma", probe=torch.rand(4, 3, 8, 8))
    assert [r.calls for r in report.layers] == [2, 1] and report.multi_call_layers == ["c"]
    report = vq.quantize_model(Twice(), 4, 4, "squant", "max", calibration=[torch.rand(2, 3, 8, 8)] * 3)
    assert [r.calls for r in report.layers] == [2, 1]

    class TwiceBN(Twice):  # every other layer ranged from BatchNorm: no probe pass at all
        def __init__(self):
            super().__init__()
            self.bn, self.pool = nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.fc(self.pool(torch.relu(self.bn(self.c(x) + self.c(x.flip(-1))))).flatten(1))

    with pytest.warns(UserWarning, match=r"probe_shape=\(2, 3, 8, 8\) not used: no probe ran"):
        report = vq.quantize_model(TwiceBN(), 4, 4, act_range="bn", probe_shape=(2, 3, 8, 8))
    assert report.probe is None and [r.calls for r in report.layers] == [2, 1]


def test_calibrated_ranges_count_calls_per_forward_not_per_batch():
    class Mid(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x):
            y = self.a(x)
            return self.fc((self.c(y) + self.c(-y)).mean((2, 3)))

    report = vq.quantize_model(Mid(), 4, 4, "squant", "max", calibration=[torch.rand(2, 3, 8, 8)] * 3)
    assert [r.calls for r in report.layers] == [1, 2, 1] and report.multi_call_layers == ["c"]


@pytest.mark.parametrize("kwargs", [dict(probe_seed=5), dict(probe_shape=(2, 3, 8, 8)),
                                    dict(config=vq.QuantConfig(probe_seed=5))])
def test_a_probe_beside_probe_seed_or_shape_is_an_error_not_ignored(kwargs):
    net = _two_layer_net()
    with pytest.raises(ValueError, match=r"probe= .* probe_(seed|shape)"):
        vq.quantize_model(net, 4, 4, "squant", "sigma", probe=torch.rand(2, 3, 8, 8), **kwargs)
    assert not vq.is_quantized(net)


def test_calibration_for_a_data_free_act_range_is_an_error_not_ignored():
    net = _two_layer_net()
    with pytest.raises(ValueError, match=r"calibration= .*'sigma'"):
        vq.quantize_model(net, 4, 4, "squant", "sigma", calibration=[torch.rand(2, 3, 8, 8)])
    with pytest.raises(ValueError, match=r"calibration= .*act_bits=None"):
        vq.quantize_model(net, 4, None, "squant", "max", calibration=[torch.rand(2, 3, 8, 8)])
    assert not vq.is_quantized(net)


def test_disjoint_views_of_one_storage_are_each_quantized_and_restored():
    """A fused buffer split into several layers' weights (views that do not overlap) is fine."""
    big = torch.randn(48, 16)
    layers = [nn.Linear(16, 16) for _ in range(3)]
    for i, layer in enumerate(layers):
        layer.weight = nn.Parameter(big[16 * i:16 * (i + 1)])
    net, before = nn.Sequential(*layers), big.clone()
    report = vq.quantize_model(net, 2, None)
    assert report.num_layers == 3 and not any("shared" in r.note for r in report.layers)
    for layer in layers:
        assert _distinct_per_channel(layer.weight) <= 4
    vq.restore_model(net)
    assert torch.equal(big, before)


def test_a_weight_shared_with_a_module_that_is_not_quantized_is_named():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 16), nn.Linear(16, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    report = vq.quantize_model(LM(), 4, None)
    assert "weight shared with 'emb.weight'" in report.layers[0].note


def test_a_pruned_weight_tied_to_another_layer_is_refused_naming_both():
    from torch.nn.utils import prune

    net = _two_layer_net()
    other = nn.Conv2d(8, 16, 3)
    other.weight = net[2].weight
    net.extra = other  # holds the same Parameter
    prune.l1_unstructured(net[2], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"layer '2' is pruned .*'extra'"):
        vq.quantize_model(net, 4, None)
    assert not vq.is_quantized(net)


def test_a_bad_call_names_quantize_model():
    net = _two_layer_net()
    with pytest.raises(TypeError, match=r"quantize_model\(\) got an unexpected keyword argument 'sigam'"):
        vq.quantize_model(net, 4, 4, sigam=12.0)
    with pytest.raises(TypeError, match=r"quantize_model\(\) too many positional arguments"):
        vq.quantize_model(net, 4, 4, "squant", "sigma", 12.0, None, "extra")
    report = vq.quantize_model(net, 4, 4, "squant", "sigma", 12.0, torch.rand(2, 3, 8, 8))  # the paper's call
    assert (report.config.act_range, report.sigma, report.probe) == ("sigma", 12.0, {"tensor": [2, 3, 8, 8]})


def test_two_parameters_over_one_shared_memory_tensor_both_run_quantized():
    """A tie by storage in shared memory: the second layer reads the quantized private copy,
    not the shared float tensor, and the shared memory is never written."""
    shared = torch.randn(6, 6).share_memory_()
    before = shared.clone()
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    a.weight, b.weight = nn.Parameter(shared), nn.Parameter(shared)
    net = nn.Sequential(a, nn.ReLU(), b)
    report = vq.quantize_model(net, 2, None)
    assert "quantized once" in report.layers[1].note
    assert torch.equal(b.weight, a.weight) and _distinct_per_channel(b.weight) <= 4
    assert torch.equal(shared, before)
    vq.restore_model(net)
    assert torch.equal(a.weight, before) and torch.equal(b.weight, before)


def test_a_probe_on_the_meta_device_is_named():
    net = _two_layer_net()
    with pytest.raises(ValueError, match=r"probe of shape \(2, 3, 8, 8\) is on the meta device"):
        vq.quantize_model(net, 4, 4, "squant", "sigma", probe=torch.rand(2, 3, 8, 8, device="meta"))
    assert not vq.is_quantized(net)


def test_a_signed_and_an_unsigned_call_give_rule_3s_symmetric_range():
    from vquant_pl.input_quantizer import union_range

    assert union_range([(0.0, 4.0, False), (-1.0, 1.0, True)]) == (-4.0, 4.0, True)
    assert union_range([(0.0, 4.0, False), (0.0, 6.0, False)]) == (0.0, 6.0, False)
    assert union_range([(-0.5, 3.0, True), (0.0, 1.0, False)]) == (-0.5, 3.0, True)  # ACIQ's mean-centred: the hull

    class SignedThenUnsigned(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.shared, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(8, 2)

        def forward(self, x):
            h = self.stem(x)
            a, b = self.shared(h - 5.0).mean((2, 3)), self.shared(torch.relu(h) * 4).mean((2, 3))
            return self.head(torch.cat([a, b], 1))

    torch.manual_seed(0)
    net = SignedThenUnsigned()
    vq.quantize_model(net, 8, 8, act_range="sigma", probe=torch.rand(8, 3, 6, 6))
    _, lo, hi, signed = vq.activation_ranges(net)[1]
    assert signed and lo == -hi


def test_layers_after_a_shared_block_are_ranged_on_what_the_final_model_feeds_them():
    """The shared block's range is the union of its calls; the head after it is ranged in a
    second probe pass on the inputs the finished model gives it."""
    torch.manual_seed(0)
    net = Siamese()
    probe = torch.rand(16, 3, 10, 10)
    report = vq.quantize_model(net, 4, 4, act_range="sigma", probe=probe)
    seen = []
    handle = net.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]), prepend=True)
    with torch.no_grad():
        net(probe)
    handle.remove()
    lo, hi, signed = vq.sigma_range(seen[0], 8, 12.0)  # the last layer: 8 bits, the run's sigma (rule 4)
    row = report.layers[2]
    assert row.name == "head" and (row.act_lo, row.act_hi, row.signed) == (lo, hi, signed)


def _bn_chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("quantize_the_wrapper", [False, True])
def test_a_model_compiled_before_quantizing_runs_quantized(quantize_the_wrapper):
    """torch.compile does not see hooks added after it compiled: the compiled model ran with
    float inputs (the weights-only model) while the report said A4."""
    import copy

    net = _bn_chain()
    eager = copy.deepcopy(net)
    x = torch.rand(4, 3, 16, 16)
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad():
        float_out = compiled(x)
        report = vq.quantize_model(compiled if quantize_the_wrapper else net, 4, 4)
        vq.quantize_model(eager, 4, 4)
        assert [r.name for r in report.layers] == ["0", "3", "8"]
        assert torch.equal(compiled(x), eager(x)) and not torch.equal(compiled(x), float_out)
        vq.restore_model(compiled if quantize_the_wrapper else net)
        assert torch.equal(compiled(x), float_out)


def test_a_compiled_submodule_is_refused():
    net = _bn_chain()
    net[3] = torch.compile(net[3], backend="eager")
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"submodule '3' is compiled \(torch.compile\)"):
        vq.quantize_model(net, 4, 4)
    _assert_same(net, before)


class _Recompute:
    """A user's reparametrization, like pruning's: weight = raw * gain before every forward."""

    def __call__(self, module, args):
        module.weight = module.raw * module.gain


def test_a_weight_recomputed_by_a_pre_hook_is_refused_without_a_probe_pass():
    """With BatchNorm ranges no forward ran, so a hook recomputing the weight went unnoticed:
    the report said W4 while the forward used the float weight."""
    net = _bn_chain()
    conv = net[3]
    raw = conv.weight.detach().clone()
    del conv.weight
    conv.register_parameter("raw", nn.Parameter(raw))
    conv.register_buffer("gain", torch.tensor(1.0))
    conv.weight = raw.clone()
    conv.register_forward_pre_hook(_Recompute())
    for act_bits in (4, None):
        with pytest.raises(RuntimeError, match="layer '3': its weight was replaced during the forward"):
            vq.quantize_model(net, 4, act_bits, act_range="bn")
        assert torch.equal(conv.raw, raw) and len(conv._forward_pre_hooks) == 1 and not vq.is_quantized(net)
    ok = _bn_chain()
    ok[3].register_forward_pre_hook(lambda m, a: None)  # a harmless hook: checked, and quantized
    assert vq.quantize_model(ok, 4, 4).num_layers == 3


@pytest.mark.parametrize("act_range", ["sigma", "bn"])
def test_the_probe_and_check_passes_keep_each_modules_train_flag(act_range):
    """The passes set the whole model back to its own mode: a frozen BatchNorm inside a
    training model came back in training mode."""
    net = _bn_chain().train()
    net[1].eval()
    net[3].register_forward_pre_hook(lambda m, a: None)  # a hook of the user's: the check pass runs under bn
    before = [m.training for m in net.modules()]
    vq.quantize_model(net, 4, 4, act_range=act_range, probe_shape=(4, 3, 16, 16))
    assert [m.training for m in net.modules()] == before


def test_a_check_pass_that_cannot_run_is_a_warning():
    """A model of token ids has no float probe that fits: the check warns instead of refusing."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc1, self.fc2 = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.embed(ids).mean(1))))

    net = Tokens()
    net.fc1.register_forward_pre_hook(lambda m, a: None)
    with pytest.warns(UserWarning, match=r"so this is unchecked"):
        assert vq.quantize_model(net, 4, None, probe_shape=(2, 5)).num_layers == 2


# -- review: weight_clip and bias correction, unread probe settings, num_weights, partial views -------------------
def _heavy_tailed_bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32),
                        nn.ReLU(), nn.Conv2d(32, 4, 1)).eval()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.3, 2)
            bn.bias.uniform_(0.5, 1.5)
        net[3].weight.copy_(torch.distributions.Laplace(0.0, 0.05).sample(net[3].weight.shape))  # clipping helps
    return net


def test_bn_bias_correction_also_corrects_the_mean_shift_of_weight_clip():
    """The reference float weight was taken after clipping: the clip's shift of E[y] stayed,
    although the row said "bias corrected" (max residual 0.25 against 0.04 without clipping)."""
    from vquant_pl.methods.bn_graph import bn_stats
    from vquant_pl.methods.bn_mse import sample_stats

    def residual(clip: bool) -> float:
        net = _heavy_tailed_bn_net()
        w, b = net[3].weight.detach().clone(), net[3].bias.detach().clone()
        mean = sample_stats(bn_stats(net, ["3"])["3"], 256, 0).mean(1)  # the input means correct_bias uses
        report = vq.quantize_model(net, 3, None, weight_clip=clip)
        assert report.layers[1].note == "bias corrected (weights)"

        def expected(weight, bias):
            return (weight.sum((2, 3)) * mean).sum(1) + bias
        return float((expected(net[3].weight.detach(), net[3].bias.detach()) - expected(w, b)).abs().max())

    assert residual(False) < 1e-4 and residual(True) < 1e-4


def test_aciq_bias_correction_restores_the_channel_means_from_before_weight_clip():
    net = _heavy_tailed_bn_net()
    w = net[3].weight.detach().clone()
    vq.quantize_model(net, 3, None, weight_clip=True, bias_correction=True, bn_bias_correction=None)

    def means(t):
        return t.detach().reshape(t.shape[0], -1).mean(1)
    assert torch.allclose(means(net[3].weight), means(w), rtol=0, atol=1e-6)


@pytest.mark.parametrize("settings, named, why", [
    (dict(act_bits=None, probe_seed=5), "probe_seed=5", "the activations stay float"),
    (dict(act_bits=None, probe_seed=0), "probe_seed=0", "the activations stay float"),  # named, at the default
    (dict(probe_shape=(2, 3, 8, 8)), r"probe_shape=\(2, 3, 8, 8\)", "BatchNorm statistics ranged every layer input"),
    (dict(probe=vq.Probe(shape=(2, 3, 8, 8))), "probe=", "BatchNorm statistics ranged every layer input"),
    (dict(act_range="max", probe_shape=(2, 3, 8, 8), calibration=[torch.rand(2, 3, 8, 8)]),
     r"probe_shape=\(2, 3, 8, 8\)", "act_range 'max' calibrates on the calibration= batches"),
])
def test_probe_settings_a_run_never_reads_are_a_warning_naming_them(settings, named, why):
    """probe_seed / probe_shape were accepted and silently ignored where no probe ran."""
    net = _bn_chain()
    with pytest.warns(UserWarning, match=f"^{named}.* not used: no probe ran \\({why}\\)"):
        report = vq.quantize_model(net, 4, **settings)
    assert report.probe is None


def test_probe_settings_a_run_reads_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vq.quantize_model(_bn_chain(), 4, 4, act_range="sigma", probe_shape=(2, 3, 8, 8), probe_seed=5)
        hooked = _bn_chain()
        hooked[3].register_forward_pre_hook(lambda m, a: None)  # the check forward draws one probe sample
        vq.quantize_model(hooked, 4, None, probe_shape=(2, 3, 8, 8))


def test_num_weights_counts_a_shared_weight_once():
    """192 for 128 distinct weight elements, while bit_budget counts a shared weight once."""
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    net[1].weight = net[0].weight
    report = vq.quantize_model(net, 4, None)
    assert report.num_weights == report.to_dict()["num_weights"] == 2 * 8 * 8
    assert [r.shared_with for r in report.layers] == [None, "0", None]
    assert "3 layers, 128 weights (a shared weight once), W4" in report.table()


class _RowsOfATable(nn.Module):
    """A quantized layer whose weight is rows 8..15 of an embedding table (not quantized)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.emb, self.fc, self.head = nn.Linear(8, 8), nn.Embedding(24, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.fc.weight = nn.Parameter(self.emb.weight[8:16])

    def forward(self, x):
        return self.head(self.fc(self.fc0(x))) + self.emb.weight.sum()


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared-memory"])
def test_a_weight_over_part_of_another_modules_parameter_is_noted(shared):
    """The embedding rows were rewritten with no note (only the very same view was matched)."""
    torch.manual_seed(0)
    net = _RowsOfATable().eval()
    if shared:
        net.share_memory()
    floats, table = _snapshot(net), net.emb.weight.detach().clone()
    ptr = net.emb.weight.untyped_storage().data_ptr()
    report = vq.quantize_model(net, 4, None, bn_bias_correction=None)
    rows = (net.emb.weight != table).any(1).nonzero().flatten().tolist()
    note = report.layers[1].note
    assert note.startswith("weight overlaps part of 'emb.weight' (not a quantized layer): ")
    if shared:  # the layer moved to a private copy, the table was never written
        assert note.endswith("in shared memory, so the layer quantizes a private copy and those keep the float "
                             "values") and rows == []
    else:
        assert note.endswith("the overlapping elements hold the quantized values too") and rows == list(range(8, 16))
    assert not torch.equal(net.fc.weight, floats["fc.weight"])
    vq.restore_model(net)
    _assert_same(net, floats)
    assert net.emb.weight.untyped_storage().data_ptr() == ptr == net.fc.weight.untyped_storage().data_ptr()


def test_an_all_negative_input_below_6_bits_is_an_error_naming_the_layer():
    """The sigma rule clips alpha to max(x) below 6 bits: with every value negative that
    was an inverted range, and every output one constant."""
    with pytest.raises(ValueError, match=r"every value is negative \(max -1"):
        vq.sigma_range(-torch.rand(64) - 1, 4, 12.0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[0].weight.fill_(0.0)
        net[0].bias.fill_(-1.0)
    with pytest.raises(ValueError, match=r"layer '1': every value is negative"):
        vq.quantize_model(net, 4, 4, act_range="sigma", probe=torch.rand(2, 3, 8, 8))
