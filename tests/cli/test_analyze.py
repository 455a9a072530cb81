"""Per-layer sensitivity (vquant_pl.cli.analyze) on a hand-built network with a known weak layer."""
import json

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl.cli.analyze import analyze, error_kinds, layer_kind, main


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        net[3].weight[:, :, 0, 0] = torch.eye(8) * 0.01
        net[3].weight[:, 0, 0, 0] = 1.0  # one large weight per row: at 2 bits the diagonal rounds away
        for layer in (net[0], net[8]):  # weights in {0, 1} with both per row: exact on the affine grid
            layer.weight.copy_((torch.rand_like(layer.weight) > 0.5).float())
            layer.weight.view(layer.weight.shape[0], -1)[:, :2] = torch.tensor([0.0, 1.0])
        for bn in (net[1], net[4]):
            bn.weight.fill_(1.0)
            bn.bias.fill_(0.5)
    return net.eval()


def test_weak_layer_ranks_first_and_rows_are_complete():
    net = _net()
    x = torch.randn(16, 3, 6, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rep = analyze(net, x, torch.zeros(16, dtype=torch.long), batch_size=8, weight_bits=2, act_bits=8,
                  act_range="bn")
    assert [r.name for r in rep.layers] == ["0", "3", "8"]
    assert [r.kind for r in rep.layers] == ["stem", "conv", "fc"]
    assert rep.sorted("weight_kl")[0].name == "3"
    assert rep.layers[0].input_kl is None and rep.layers[0].act_bits is None  # first layer: input float
    assert rep.layers[2].act_bits == 8  # last layer's input: 8 bits
    assert all(0.0 <= r.clip_fraction <= 1.0 for r in rep.layers[1:])
    assert 0.0 <= rep.full_agreement <= 1.0 and rep.float_top1 is not None
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the model is untouched
    assert not vq.is_quantized(net)
    table = rep.table()
    assert table.index("| 1 | 3 | conv |") < table.index("| 0 | 0 | stem |")
    assert set(rep.by_kind()) == {"stem", "conv", "fc"}


def test_layer_kinds():
    dw = nn.Conv2d(4, 4, 3, groups=4)
    assert layer_kind("blocks.1._depthwise_conv", dw, 3, 10) == "depthwise"
    assert layer_kind("blocks.1._expand_conv", nn.Conv2d(4, 8, 1), 3, 10) == "expand"
    assert layer_kind("x", nn.Conv2d(4, 8, 1), 0, 10) == "stem"
    assert layer_kind("fc", nn.Linear(4, 2), 9, 10) == "fc"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        analyze(_net(), torch.randn(2, 3, 4, 4), torch.zeros(3, dtype=torch.long))


def test_main_writes_table_csv_json_and_figure(tmp_path, capsys):
    model_path = tmp_path / "net.pt"
    torch.save(_net(), model_path)
    data = tmp_path / "images.pt"
    torch.save({"images": torch.randn(8, 3, 6, 6), "labels": torch.zeros(8, dtype=torch.long)}, data)
    out = tmp_path / "an" / "net"
    assert main([str(model_path), "--allow-pickle", "--images", str(data), "--num", "8", "--weight-bits", "2",
                 "--act-bits", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | 3 | conv |" in printed
    assert json.loads(out.with_suffix(".json").read_text())["num_images"] == 8
    assert out.with_suffix(".csv").read_text().count("\n") == 4  # header + 3 layers
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize("kinds", [False, True])
def test_out_never_overwrites_a_file_and_is_refused_before_any_work(tmp_path, monkeypatch, capsys, kinds):
    import vquant_pl.models

    torch.save(_net(), tmp_path / "net.pt")
    torch.save({"images": torch.randn(2, 3, 6, 6)}, tmp_path / "images.pt")
    mine = tmp_path / "mine"
    for suffix in (".csv", ".json", ".png"):
        mine.with_suffix(suffix).write_text("USER DATA\n")

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(vquant_pl.models, "create_model", no_work)
    argv = [str(tmp_path / "net.pt"), "--allow-pickle", "--images", str(tmp_path / "images.pt"), "--out", str(mine)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--kinds"] * kinds)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "choose another --out" in err
    assert str(mine.with_suffix(".png")) in err and (str(mine.with_suffix(".csv")) in err) != kinds
    assert all(mine.with_suffix(x).read_text() == "USER DATA\n" for x in (".csv", ".json", ".png"))


class _Payload:
    """A crafted file: unpickling it would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_images_file_is_loaded_weights_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load's default would unpickle
    marker = tmp_path / "pwned"
    torch.save({"images": torch.randn(2, 3, 6, 6), "extra": _Payload(marker)}, tmp_path / "evil.pt")
    torch.save(_net(), tmp_path / "net.pt")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "net.pt"), "--allow-pickle", "--images", str(tmp_path / "evil.pt")])
    assert exit_info.value.code == 2 and not marker.exists()
    assert f"--images {tmp_path / 'evil.pt'} holds objects other than tensors" in capsys.readouterr().err


def test_recipe_bit_widths_are_used_and_flags_override_them(tmp_path):
    torch.save(_net(), tmp_path / "net.pt")
    torch.save({"images": torch.randn(8, 3, 6, 6)}, tmp_path / "images.pt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("quant:\n  weight_bits: 2\n  act_bits: 8\n  act_range: bn\n  verbose: false\n")
    common = [str(tmp_path / "net.pt"), "--allow-pickle", "--images", str(tmp_path / "images.pt"), "--recipe",
              str(recipe)]
    assert main([*common, "--out", str(tmp_path / "r")]) == 0
    setting = json.loads((tmp_path / "r.json").read_text())["setting"]
    assert (setting["weight_bits"], setting["act_bits"], setting["act_range"]) == (2, 8, "bn")
    rows = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert [r["act_bits"] for r in rows] == [None, 8, 8]
    assert main([*common, "--act-bits", "6", "--out", str(tmp_path / "f")]) == 0
    setting = json.loads((tmp_path / "f.json").read_text())["setting"]
    assert (setting["weight_bits"], setting["act_bits"]) == (2, 6)


def test_error_kinds_rows_match_independent_runs():
    from torch.nn import functional as F

    from vquant_pl.cli.analyze import _clip_only, _round_only, kinds_table
    from vquant_pl.ops.affine import ActivationQuantizer

    q = ActivationQuantizer(4, 0.0, 3.0, signed=False)
    x = torch.linspace(-1.0, 4.0, 101)
    inside = (x >= 0) & (x <= 3)
    assert torch.equal(_round_only(q)(x)[inside], q(x)[inside])  # the grid without the clamp
    assert float(_round_only(q)(torch.tensor([4.0]))) == 4.0
    assert torch.equal(_clip_only(q)(x), x.clamp(0.0, 3.0))

    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randn(16, 3, 6, 6)
    settings = dict(weight_bits=2, act_bits=4, act_range="bn")
    rows = error_kinds(net, images, None, 8, **settings)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the model is untouched
    what = [r.what for r in rows]
    assert what[:5] == ["full setting", "weights only (bias-corrected)", "inputs only", "inputs only, clipping only",
                        "inputs only, rounding only"]
    assert "conv inputs only" in what and "fc inputs only" in what
    assert "conv inputs only, per-channel BN ranges (1 of 1 layers)" in what
    assert rows[0].kl == pytest.approx(analyze(net, images, None, 8, **settings).full_kl, rel=1e-6)
    with torch.no_grad():
        ref = F.log_softmax(torch.cat([net(images[:8]), net(images[8:])]), 1)
        vq.quantize_model(net, weight_bits=2, act_bits=None, act_range="bn")
        logp = F.log_softmax(torch.cat([net(images[:8]), net(images[8:])]), 1)
    vq.restore_model(net)
    assert rows[1].kl > 0 and rows[1].kl == pytest.approx(float((ref.exp() * (ref - logp)).sum(1).mean()), rel=1e-4)
    assert "| full setting |" in kinds_table(rows, 16)


def test_transformed_copy_quantizes_as_quantize_model_under_mixed_precision_and_weight_clip():
    # the copy keeps weight_clip under mixed precision: each layer clipped for its own bits
    from vquant_pl.cli.analyze import _transformed_copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16),
                        nn.ReLU(), nn.Conv2d(16, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        net[4].weight.mul_(30)
    settings = dict(weight_bits=4, act_bits=None, mixed_precision="weights", mixed_min_bits=2, weight_clip=True,
                    equalize=True)
    work, config, _ = _transformed_copy(net, torch.rand(2, 3, 16, 16), None, settings)
    with pytest.warns(UserWarning, match="budget bits exactly"):
        vq.quantize_model(work, config=config)
    with pytest.warns(UserWarning, match="budget bits exactly"):
        vq.quantize_model(net, **settings)
    for (_, a), (_, b) in zip(vq.quantizable_layers(work), vq.quantizable_layers(net)):
        assert torch.equal(a.weight, b.weight)


def _pruned_pair(grad: bool) -> tuple[nn.Module, nn.Module]:
    """A net with layer 3 pruned (`torch.nn.utils.prune`, with or without autograd on), and a
    plain copy whose layer 3 holds the pruned weight (`weight_orig * mask`) as its parameter."""
    from torch.nn.utils import prune

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                             nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 10)).eval()

    pruned, plain = net(), net()
    with torch.set_grad_enabled(grad):  # with autograd on, `weight` has history: a plain deepcopy refuses it
        prune.l1_unstructured(pruned[3], "weight", amount=0.3)
    with torch.no_grad():
        plain[3].weight.copy_(pruned[3].weight)
    return pruned, plain


@pytest.mark.parametrize("grad", [True, False])
def test_a_pruned_layer_is_measured_with_its_quantized_weight(grad):
    # the quantized weight was written into `weight`, which the pruning pre-hook recomputes
    # from `weight_orig` before the forward: the layer showed KL 0 (and a deepcopy crashed)
    pruned, plain = _pruned_pair(grad)
    images = torch.rand(8, 3, 12, 12)
    settings = dict(weight_bits=3, act_bits=8, act_range="sigma", probe_shape=(4, 3, 12, 12))
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    a, b = analyze(pruned, images, **settings), analyze(plain, images, **settings)
    assert a.layers[1].name == "3" and a.layers[1].weight_kl > 0
    for x, y in zip(a.layers, b.layers):
        assert x.weight_kl == pytest.approx(y.weight_kl, rel=1e-5, abs=1e-12)
        assert x.weight_rel_error == pytest.approx(y.weight_rel_error, rel=1e-5)
        assert (x.input_kl is None) == (y.input_kl is None)
        assert x.input_kl is None or x.input_kl == pytest.approx(y.input_kl, rel=1e-5, abs=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())  # the model is untouched
    kinds = {r.what: r.kl for r in error_kinds(pruned, images, **settings)}  # on a copy made alike
    assert kinds["full setting"] == pytest.approx(a.full_kl, rel=1e-5)


def test_kl_is_never_negative():
    from torch.nn import functional as F

    from vquant_pl.cli.analyze import _scores

    torch.manual_seed(2)  # float rounding puts this KL at about -6e-8
    a = torch.randn(4, 1000) * 5
    b = a + torch.randn_like(a) * 1e-5
    kl, agreement, _ = _scores(b, F.log_softmax(a, 1), None)
    assert kl == 0.0 and agreement == 1.0


def _files(tmp_path):
    torch.save(_net(), tmp_path / "net.pt")
    torch.save({"images": torch.randn(6, 3, 6, 6), "labels": torch.zeros(6, dtype=torch.long)}, tmp_path / "images.pt")
    return [str(tmp_path / "net.pt"), "--allow-pickle", "--images", str(tmp_path / "images.pt")]


def test_out_suffixes_are_appended_to_the_whole_prefix(tmp_path, capsys):
    common = _files(tmp_path) + ["--weight-bits", "2", "--act-bits", "8"]
    assert main([*common, "--out", str(tmp_path / "run_v1.5")]) == 0
    assert main([*common, "--out", str(tmp_path / "run_v1.7")]) == 0  # not refused as run_v1.* taken
    assert main([*common, "--kinds", "--out", str(tmp_path / "k.v2")]) == 0
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("run_", "k.")))
    assert written == ["k.v2.png", "run_v1.5.csv", "run_v1.5.json", "run_v1.5.png", "run_v1.7.csv", "run_v1.7.json",
                       "run_v1.7.png"]
    assert f"wrote {tmp_path / 'run_v1.7.csv'}" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "named.csv")]) == 0  # a file name: its prefix, as before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("named")) == [
        "named.csv", "named.json", "named.png"]


@pytest.mark.parametrize("flags,message", [
    (["--num", "0"], "--num must be at least 1, got 0"),
    (["--num", "-1"], "--num must be at least 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--top", "0"], "--top must be at least 1, got 0"),
    (["--act-range", "nosuch"], "unknown act_range 'nosuch'"),
    (["--weight-bits", "1"], "weight_bits"),
    (["--kinds", "--top", "1"], "--kinds prints every error kind: drop --top"),
])
def test_bad_arguments_are_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys, flags, message):
    import vquant_pl.models

    def no_work(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(vquant_pl.models, "create_model", no_work)
    with pytest.raises(SystemExit) as exit_info:
        main(_files(tmp_path) + flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_a_model_path_that_is_a_directory_is_named(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    argv = _files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "models"), *argv[1:]])
    assert exit_info.value.code == 2 and f"model file {tmp_path / 'models'} is a directory" in capsys.readouterr().err


def test_the_report_records_the_effective_setting_with_defaults(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from vquant_pl.config import QuantConfig

    titles = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (titles.append(self.axes[0].get_title()),
                                                                   real(self, *a, **k))[1])
    assert main(_files(tmp_path) + ["--out", str(tmp_path / "d")]) == 0  # no setting given: the defaults
    setting = json.loads((tmp_path / "d.json").read_text())["setting"]
    assert setting == json.loads(json.dumps(QuantConfig().to_dict(resolved=True)))
    assert (setting["weight_bits"], setting["act_bits"], setting["act_range"]) == (4, 4, "bn")
    assert titles and titles[0].startswith("W4A4 bn:") and "None" not in titles[0]
    assert analyze(_net(), torch.randn(4, 3, 6, 6), act_bits=None).setting["act_bits"] is None
