"""Quantization state lives on the layers: tied weights, deep copies, pickles, dtypes, NaN errors."""
import copy
import warnings
import io

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl.state import ORIGINALS

PROBE = vq.Probe(seed=1, shape=(4, 3, 16, 16))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class Tied(nn.Module):
    """Two layers holding one Parameter (as weight tying does)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snapshot):
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in snapshot)


def test_tied_weight_is_quantized_once_and_restored_exactly():
    model = Tied()
    floats = _snapshot(model)
    expected = vq.quantize_weight(model.a.weight.detach().clone(), 4)
    report = vq.quantize_model(model, 4, 4, probe=torch.rand(8, 6))
    assert torch.equal(model.a.weight, expected)  # once, not the quantized weight quantized again
    assert "shared with 'a'" in report.layers[1].note
    vq.restore_model(model)
    assert _same(model, floats) and model.b.weight is model.a.weight


def test_deepcopy_of_a_quantized_model_is_quantized_and_restorable():
    model = Net().eval()
    x = torch.rand(2, 3, 16, 16)
    floats, float_out = _snapshot(model), model(x)
    vq.quantize_model(model, 4, 4, probe=PROBE)
    quant_out = model(x)
    twin = copy.deepcopy(model)
    assert vq.is_quantized(twin) and torch.equal(twin(x), quant_out)
    assert vq.activation_ranges(twin) == vq.activation_ranges(model)
    with pytest.raises(RuntimeError, match="already quantized"):
        vq.quantize_model(twin, 4, 4, probe=PROBE)  # no second set of hooks
    vq.restore_model(twin)
    assert _same(twin, floats) and torch.equal(twin(x), float_out) and not vq.is_quantized(twin)
    assert torch.equal(model(x), quant_out)  # the original is untouched by its twin's restore


def test_torch_save_and_load_of_a_quantized_model():
    model = Net().eval()
    x = torch.rand(2, 3, 16, 16)
    floats = _snapshot(model)
    vq.quantize_model(model, 4, 4, probe=PROBE)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    assert vq.quantization_report(loaded).to_dict() == vq.quantization_report(model).to_dict()
    assert loaded.state_dict().keys() == floats.keys()  # state_dict keys unchanged
    vq.restore_model(loaded)
    assert _same(loaded, floats)


def test_report_and_ranges_are_read_from_the_layers():
    model = Net().eval()
    report = vq.quantize_model(model, 4, 4, probe=PROBE)
    assert [r.name for r in report.layers] == ["conv1", "conv2", "fc"]
    assert report.sigma == 12.0 and report.probe == {"seed": 1, "shape": [4, 3, 16, 16]}
    assert vq.activation_ranges(model)[0] is None and vq.activation_ranges(model)[2][0] == 8
    sub = vq.quantization_report(model.conv2)
    assert [r.name for r in sub.layers] == ["conv2"]  # rows keep the names of the run


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_double_precision_models_quantize(dtype):
    ref = Net().eval()
    model = copy.deepcopy(ref).to(dtype)
    floats = _snapshot(model)
    vq.quantize_model(ref, 4, 4, probe=PROBE)
    vq.quantize_model(model, 4, 4, probe=PROBE)
    for (_, a), (_, b) in zip(vq.quantizable_layers(ref), vq.quantizable_layers(model)):
        assert b.weight.dtype == dtype
        # the rules computed in float32 on the weight as the model holds it, cast back
        expected = vq.quantize_weight(floats[_name(model, b) + ".weight"], 4)
        assert torch.equal(b.weight, expected)
    y = model(torch.rand(2, 3, 16, 16, dtype=dtype))
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    vq.restore_model(model)
    assert _same(model, floats)


def _name(model, layer):
    return next(n for n, m in model.named_modules() if m is layer)


def test_nan_in_the_probe_is_named():
    probe = torch.rand(4, 3, 16, 16)
    probe[0, 0, 0, 0] = float("nan")
    model = Net()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="the probe holds NaN or infinite values"):
        vq.quantize_model(model, 4, 4, probe=probe)
    assert _same(model, snapshot) and not vq.is_quantized(model)


def test_inf_in_a_bias_is_named():
    model = Net()
    with torch.no_grad():
        model.conv2.bias[3] = float("inf")
    with pytest.raises(ValueError, match="bias of layer 'conv2' holds NaN or infinite values"):
        vq.quantize_model(model, 4, 4, probe=PROBE)


def test_nan_in_batchnorm_statistics_is_named():
    model = Net()
    model.bn.running_var[2] = float("nan")
    with pytest.raises(ValueError, match="BatchNorm 'bn': running_var holds NaN or infinite values"):
        vq.quantize_model(model, 4, 4, probe=PROBE)


def test_nan_produced_inside_the_network_names_the_layer():
    class Bad(Net):
        def forward(self, x):
            x = torch.relu(self.bn(self.conv1(x)))
            x = torch.relu(self.conv2(x * float("inf")))
            return self.fc(self.pool(x).flatten(1))

    model = Bad()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="the input of layer 'conv2' holds NaN or inf on the probe"):
        vq.quantize_model(model, 4, 4, probe=PROBE)
    assert _same(model, snapshot) and not vq.is_quantized(model)


@pytest.mark.parametrize("sigma", [float("inf"), float("nan"), 0.0, True])
def test_sigma_must_be_finite_and_positive(sigma):
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        vq.QuantConfig(sigma=sigma)


def test_save_original_is_restored_by_restore_model():
    model = Net().eval()
    floats = _snapshot(model)
    vq.quantize_model(model, 8, None)
    with torch.no_grad():
        assert vq.save_original(model.bn, "running_mean")
        assert not vq.save_original(model.bn, "running_mean")  # already saved: the first value wins
        model.bn.running_mean.add_(1.0)
    vq.restore_model(model)
    assert _same(model, floats)


def test_a_failed_run_restores_everything():
    class Breaks(Net):
        def forward(self, x):
            if x.shape[0] > 1:
                raise RuntimeError("boom")
            return super().forward(x)

    model = Breaks()
    snapshot = _snapshot(model)
    with pytest.raises(RuntimeError, match="the probe pass through the quantized model failed: boom"):
        vq.quantize_model(model, 4, 4, probe=PROBE)
    assert _same(model, snapshot) and not vq.is_quantized(model)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_weights_saved_while_quantized_are_reported_when_quantized_again():
    model = nn.Sequential(nn.Linear(600, 4))
    vq.quantize_model(model, 4, None)
    fresh = nn.Sequential(nn.Linear(600, 4))
    fresh.load_state_dict(model.state_dict())  # a state_dict taken while quantized
    with pytest.warns(UserWarning, match="layer '0' hold at most 16 distinct values per output channel"):
        vq.quantize_model(fresh, 4, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vq.quantize_model(nn.Sequential(nn.Linear(600, 4)), 4, None)  # float weights: no warning


def test_a_run_failing_after_the_weights_puts_back_a_tensor_the_user_saved_before_it():
    """`save_original` before `quantize_model` (a transform of the user's own), then a run that
    fails in the probe pass, after the weights were written: the weight is as the user left it."""
    class Boom(nn.Module):
        def forward(self, x):
            if x.shape[0] > 1:  # the one-sample shape check passes, the probe pass fails
                raise RuntimeError("boom")
            return x

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), Boom(), nn.Conv2d(8, 4, 3))
    vq.save_original(net[0], "weight")
    with torch.no_grad():
        net[0].weight.mul_(0.5)
    halved, other = net[0].weight.detach().clone(), net[3].weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        vq.quantize_model(net, 4, 4, "squant", "sigma", probe=torch.rand(4, 3, 8, 8))
    assert torch.equal(net[0].weight, halved) and torch.equal(net[3].weight, other)
    assert not vq.is_quantized(net)
    vq.restore_model(net)  # the user's own original is still there
    assert torch.equal(net[0].weight, halved * 2)


def test_a_model_pickled_before_the_call_counting_attributes_loads_and_runs():
    from vquant_pl.input_quantizer import InputQuantizer

    net = Net()
    vq.quantize_model(net, 4, 4, "squant", "sigma", probe=PROBE)
    x = torch.rand(2, 3, 16, 16)
    expected = net(x)
    for m in net.modules():  # as an InputQuantizer pickled before `calls`/`counting` existed
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, InputQuantizer):
                del hook.__dict__["calls"], hook.__dict__["counting"]
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    old = torch.load(buf, weights_only=False)
    assert torch.equal(old(x), expected)
    hooks = [h for m in old.modules() for h in m._forward_pre_hooks.values() if isinstance(h, InputQuantizer)]
    assert hooks and all(h.calls == 0 and h.counting is False for h in hooks)  # not counting after the run


# -- shared memory (ddp_spawn on CPU, Hogwild): keyed before any tensor moves, storage given back --------------
class TiedHead(nn.Module):
    """Two layers holding one Parameter, and a head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


def _storages(model):
    return {k: (t.untyped_storage().data_ptr(), t.is_shared())
            for k, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}


def test_a_tied_weight_in_shared_memory_is_quantized_once_and_restored_exactly():
    """The second layer holding the Parameter was keyed after the first had moved it to a
    private copy: quantized again, the quantized values saved as its float original, so
    restore_model left the model quantized, and the note "weight shared" was lost."""
    torch.manual_seed(0)
    model = TiedHead().eval()
    model.share_memory()
    floats, storages, x = _snapshot(model), _storages(model), torch.rand(4, 8)
    float_out = model(x)
    expected = vq.quantize_weight(model.a.weight.detach().clone(), 4)
    report = vq.quantize_model(model, 4, 4, act_range="sigma", probe=torch.rand(16, 8))
    assert report.layers[1].note == "weight shared with 'a': quantized once"
    assert torch.equal(model.a.weight, expected) and model.b.weight is model.a.weight  # once, not twice
    vq.restore_model(model)
    assert _same(model, floats) and torch.equal(model(x), float_out) and _storages(model) == storages


class BoomAfterOne(nn.Module):
    def forward(self, x):
        if x.shape[0] > 1:  # the one-sample shape check passes, the probe pass fails
            raise RuntimeError("boom")
        return x


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("settings", [dict(act_range="sigma", probe=torch.rand(4, 3, 12, 12)),
                                      dict(equalize=True, weight_clip=True)], ids=["weights", "transforms"])
def test_shared_memory_is_never_written_and_given_back_by_restore(settings):
    """Quantize + restore left every changed tensor on a private storage, no longer shared;
    equalize, weight_clip and bias correction wrote into the shared storage itself."""
    model = _bn_net()
    model.share_memory()
    floats, storages = _snapshot(model), _storages(model)
    shared = {k: t.detach() for k, t in model.state_dict().items()}  # aliases of the shared storages
    report = vq.quantize_model(model, 4, 4, **settings)
    assert any("bias corrected" in r.note for r in report.layers)
    assert all(torch.equal(shared[k], floats[k]) for k in floats), "a shared storage was written"
    assert not torch.equal(model[3].weight, floats["3.weight"])  # the model runs quantized
    vq.restore_model(model)
    assert _same(model, floats) and _storages(model) == storages


def test_a_failed_run_gives_shared_memory_back():
    """After a failure in the probe pass the weight was on another storage, not shared."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), BoomAfterOne(), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    model.share_memory()
    floats, storages = _snapshot(model), _storages(model)
    with pytest.raises(RuntimeError, match="the probe pass through the quantized model failed: boom"):
        vq.quantize_model(model, 4, 4, act_range="sigma", probe=torch.rand(4, 3, 12, 12))
    assert _same(model, floats) and _storages(model) == storages and not vq.is_quantized(model)
    assert not any(ORIGINALS in m.__dict__ for m in model.modules())


def test_tensors_over_one_shared_storage_move_together():
    """Two Parameters over one shared storage, one of a quantized layer, one of a module that is
    not quantized: both read the one quantized copy (as the note says) and get the storage back."""
    torch.manual_seed(0)
    table = torch.randn(8, 8).share_memory_()
    embed, a, b = nn.Embedding(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    embed.weight, a.weight, b.weight = nn.Parameter(table), nn.Parameter(table), nn.Parameter(table)
    model = nn.Sequential(nn.Linear(8, 8), a, b, nn.ModuleList([embed]))
    floats, storages = _snapshot(model), _storages(model)
    report = vq.quantize_model(model, 4, None)
    assert "weight shared with '3.0.weight' (not a quantized layer): it reads the quantized values too" in \
        report.layers[1].note and report.layers[2].note == "weight shared with '1': quantized once"
    assert torch.equal(embed.weight, a.weight) and torch.equal(b.weight, a.weight)
    assert torch.equal(a.weight, vq.quantize_weight(floats["1.weight"], 4)) and torch.equal(table, floats["1.weight"])
    vq.restore_model(model)
    assert _same(model, floats) and _storages(model) == storages


def test_restore_after_a_cast_of_a_model_in_shared_memory_follows_the_cast():
    """The shared storage is given back only while the tensor has its device and dtype; a
    model cast (or moved, as Lightning's teardown moves it to the CPU) after quantizing gets
    its floats copied in, in the new dtype."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).share_memory()
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    vq.quantize_model(net, 4, None)
    net.double()
    vq.restore_model(net)
    assert {v.dtype for v in net.state_dict().values()} == {torch.float64}
    assert all(torch.equal(net.state_dict()[k], v.double()) for k, v in ref.items())
    net(torch.rand(1, 3, 4, 4, dtype=torch.float64))
