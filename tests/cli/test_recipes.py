"""Recipes through quantize_model: every step together restores the exact float model."""
import pytest
import torch
from torch import nn

import vquant_pl as vq
from helpers import REPO, SAMPLE
from vquant_pl.cli.recipes import load_recipe


class Block(nn.Module):
    """stem conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project -> BN (+ skip) -> head -> fc."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.project, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head, self.bn3 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for bn in (self.bn0, self.bn1, self.bn2, self.bn3):
                bn.weight.uniform_(0.2, 2.0)
                bn.bias.uniform_(-0.5, 1.0)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        a = self.act(self.bn0(self.stem(x)))
        s = self.bn2(self.project(self.act(self.bn1(self.dw(a))))) + self.bn0(self.stem(x))
        return self.fc(self.act(self.bn3(self.head(s))).mean((2, 3)))


def test_all_steps_change_the_model_and_restore_exactly():
    torch.manual_seed(0)
    net = Block().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    report = vq.quantize_model(net, 4, 4, act_range="bn-mse", equalize=True, weight_clip=True,
                               bn_bias_correction="all")
    assert vq.is_quantized(net)
    assert any("bias corrected (all)" in r.note for r in report.layers)
    assert not torch.allclose(net(x), ref)
    with pytest.raises(RuntimeError, match="already quantized"):
        vq.quantize_model(net, 4, 4, act_range="bn")
    copy = __import__("copy").deepcopy(net)
    vq.restore_model(net)
    assert not vq.is_quantized(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.equal(net(x), ref)
    vq.restore_model(copy)  # a deep copy of the recipe-quantized model restores as well
    assert all(torch.equal(v, before[k]) for k, v in copy.state_dict().items())


def test_failure_leaves_the_model_as_it_was(monkeypatch):
    torch.manual_seed(0)
    net = Block().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="act_bits"):
        vq.quantize_model(net, 4, 99, act_range="bn", equalize=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="unknown bn_bias_correction 'yes'"):
        vq.quantize_model(net, 4, 4, bn_bias_correction="yes")

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr("vquant_pl.quantize._fix_ranges", boom)  # fails after the transforms and the weights
    with pytest.raises(RuntimeError, match="boom"):
        vq.quantize_model(net, 4, 4, equalize=True, weight_clip=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and not vq.is_quantized(net)


def test_named_and_yaml_recipes():
    assert load_recipe("vquant") == {"act_range": "bn", "bn_bias_correction": "weights"}
    defaults = vq.QuantConfig()  # the vquant recipe is the default
    assert all(getattr(defaults, k) == v for k, v in load_recipe("vquant").items())
    assert load_recipe(str(REPO / "configs" / "recipes" / "vquant.yaml")) == load_recipe("vquant")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_recipes_are_the_shipped_yaml_files_written_once(tmp_path):
    from vquant_pl.cli.recipes import recipe_names, recipes_dir

    assert {"vquant", "squant", "bn"} <= set(recipe_names())
    assert recipe_names() == sorted(p.stem for p in (REPO / "configs" / "recipes").glob("*.yaml"))
    assert recipes_dir().resolve() == (REPO / "configs" / "recipes").resolve()
    assert load_recipe("squant") == {"act_range": "sigma", "bn_bias_correction": None}  # the paper's rules
    source = (REPO / "vquant_pl" / "cli" / "recipes.py").read_text()
    assert '"act_range": "bn"' not in source and '"sigma"' not in source  # no second copy of a recipe
    assert "sigma" not in (REPO / "vquant_pl" / "cli" / "paper.py").read_text().lower()  # sigma: vquant_pl.config
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  act_range: bn\n  stages: [test, predict]\n  verbose: false\n")
    with pytest.raises(ValueError, match=r"recipe .*bad.yaml: stages not quantization setting"):
        load_recipe(str(bad))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _labelled_folder(folder, n=3, seed=0):
    """n random-noise JPEGs named `<synset>_<i>.JPEG` (tench, goldfish, ...)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    synsets = ["n01440764", "n01443537", "n01484850", "n01491361"]
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{synsets[i % 4]}_{i}.JPEG")
    return folder


def test_cached_sample_and_golden_file_are_loaded_weights_only(tmp_path, monkeypatch):
    from vquant_pl.cli import selftest
    from vquant_pl.cli.recipes import cache_file, sample_tensors
    from vquant_pl.models import UnsafeFile

    folder = _labelled_folder(tmp_path / "imgs")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    torch.save({"images": torch.zeros(1), "labels": torch.zeros(1), "x": _Payload(marker)},
               cache_file("lite0", folder, tmp_path))
    with pytest.raises(UnsafeFile, match="cached sample .*lite0_imgs.pt holds objects other than tensors"):
        sample_tensors("lite0", folder, cache_dir=tmp_path)
    torch.save({"weights": [], "x": _Payload(marker)}, tmp_path / "golden.pt")
    with pytest.raises(UnsafeFile, match="golden file .*golden.pt holds objects other than tensors"):
        selftest.check({}, str(tmp_path / "golden.pt"))
    assert not marker.exists()


def test_sample_cache_is_keyed_by_the_files_and_the_preprocessing(tmp_path, monkeypatch, capsys):
    """The cache was keyed by the model name alone: other images in the folder, or another
    folder of the same name, were served the first folder's tensors."""
    from vquant_pl.cli import recipes
    from vquant_pl.datamodules import imagenet

    folder = _labelled_folder(tmp_path / "a" / "val")
    images, labels = recipes.sample_tensors("lite0", folder, cache_dir=tmp_path / "cache")
    assert images.shape == (3, 3, 224, 224) and labels.tolist() == [0, 1, 2]

    def no_decoding(path):
        raise AssertionError(f"{path} decoded although cached")

    monkeypatch.setattr(imagenet, "open_image", no_decoding)
    again, _ = recipes.sample_tensors("lite0", folder, cache_dir=tmp_path / "cache")
    assert torch.equal(again, images)
    monkeypatch.undo()

    other = _labelled_folder(tmp_path / "b" / "val", n=4, seed=1)  # same name, other images
    images2, labels2 = recipes.sample_tensors("lite0", other, cache_dir=tmp_path / "cache")
    assert labels2.tolist() == [0, 1, 2, 3] and not torch.equal(images2[:3], images)
    assert "made from other files" in capsys.readouterr().out
    lite1, _ = recipes.sample_tensors("lite1", other, cache_dir=tmp_path / "cache")  # another transform
    assert lite1.shape[-1] == 240
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["lite0_val.pt", "lite1_val.pt"]


def test_data_folder_names_a_missing_folder(tmp_path, monkeypatch):
    from vquant_pl.cli.recipes import data_folder

    monkeypatch.setenv("VQUANT_SHARED", str(tmp_path))
    (tmp_path / "data" / "imagenet-sample").mkdir(parents=True)
    assert data_folder("imagenet-sample") == tmp_path / "data" / "imagenet-sample"
    with pytest.raises(FileNotFoundError, match=r"image folder 'nope' not found, neither as a path nor in .*data"):
        data_folder("nope")


def test_paired_difference():
    from vquant_pl.cli.recipes import paired_difference

    ref = torch.zeros(500, dtype=torch.bool)
    ref[:437] = True
    same = paired_difference(ref, ref)
    assert same[0] == 0.0 and same[2] == pytest.approx(100 * 1.96 / 502) and same[1] == -same[2]
    quant = ref.clone()
    quant[:4] = False  # 4 lost, 1 gained: -0.6 points
    quant[437] = True
    diff, low, high = paired_difference(quant, ref)
    assert diff == pytest.approx(-0.6) and low < -0.6 < high and low < 0 < high
    back = paired_difference(ref, quant)
    assert back == pytest.approx((0.6, -high, -low))
    many = torch.zeros(500, dtype=torch.bool)  # 100 lost: far below 0
    many[:337] = True
    assert paired_difference(many, ref)[2] < -15


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"ImageNet sample {SAMPLE} not found")
def test_recipe_table_counts_every_image_of_every_folder(tmp_path, capsys, monkeypatch):
    from vquant_pl.cli import recipes
    from vquant_pl.models import create_model

    monkeypatch.chdir(tmp_path)
    extra = _labelled_folder(tmp_path / "noise", n=2)
    assert recipes.main(["--models", "lite0", "--bits", "8", "--recipes", "vquant", "--num", "6",
                         "--data", str(SAMPLE), str(extra)]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| lite0")]
    images, labels = recipes.sample_tensors("lite0", SAMPLE)
    model, _ = create_model("efficientnet_lite:lite0")
    with torch.inference_mode():
        hits = int((model(images[:6]).argmax(1) == labels[:6]).sum())
    assert rows[0].startswith(f"| lite0 | float | - | {100 * hits / 6:.1f} ({hits}/6) | ")
    assert "/2) | " in rows[0] and "/8) |" in rows[0]
    assert rows[1].startswith("| lite0 | W8A8 | vquant | ") and "/8 | " in rows[1]
    with pytest.raises(SystemExit):
        recipes.main(["--data", str(extra), str(tmp_path / "x" / "noise")])
    assert "not found" in capsys.readouterr().err


def test_a_cache_others_can_write_is_not_used(tmp_path, capsys):
    import os

    from vquant_pl.cli import recipes

    folder = _labelled_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    images, _ = recipes.sample_tensors("lite0", folder, cache_dir=cache)
    planted = recipes.cache_file("lite0", folder, cache)
    data = torch.load(planted)
    torch.save(data | {"images": torch.zeros_like(data["images"])}, planted)  # right key, other images
    os.chmod(planted, 0o666)
    again, _ = recipes.sample_tensors("lite0", folder, cache_dir=cache)
    assert torch.equal(again, images) and "not using the cache" in capsys.readouterr().out
