"""The exported ONNX model in onnxruntime against PyTorch: agreement on ImageNet images, and speed.

    python benchmarks/export_speed.py accuracy [--models lite0-w8a8 lite0-w6a6 ...] [--sample DIR]
    python benchmarks/export_speed.py speed [--batch 32] [--runs 5] [--threads N]

`accuracy`: each model is quantized, exported with `vq.export_onnx` and evaluated on the
100-image sample (`../shared/data/imagenet-sample`) by PyTorch (the fake-quant model) and by
onnxruntime (CPU) from the file; prints top-1 / top-5 of both, how many images' top-1
predictions agree, the largest logit difference, and which layers onnxruntime ran as
integer kernels. Models: EfficientNet-Lite0 (ImageNet weights) at W8A8/W6A6/W4A4, a
ResNet18 without ImageNet weights (pytorchcv, seeded random init: only the agreement means
something) at W8A8, and an NVIDIA-style ResNet18 (pytorchcv built inside `quantized_layers()`: QuantConv2d /
QuantLinear, 8 bits, seeded random init, max calibration on 4 images of the extra sample).

`speed`: images/s of EfficientNet-Lite0 (synthetic input) in PyTorch FP32, PyTorch W8A8
fake-quant, and onnxruntime running the exported W8A8 file, in the same run; the median of
`--runs` timed calls after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import vquant_pl as vq
from vquant_pl.export import onnxruntime_kernels, ort_session, run_onnx  # noqa: F401

SHARED = Path(os.environ.get("VQUANT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODELS = ["lite0-w8a8", "lite0-w6a6", "lite0-w4a4", "resnet18-w8a8", "nvidia-resnet18-w8a8"]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def load_images(folder: Path, transform, limit: int | None = None):
    from PIL import Image

    classes = {s: i for i, s in enumerate((SHARED / "data" / "imagenet_synsets.txt").read_text().split())}
    files = sorted(folder.glob("*.JPEG"))[:limit]
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([classes[f.name.split("_")[0]] for f in files])
    return images, labels


def topk(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top5 = logits.topk(5, dim=1).indices
    return int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(1).sum())


def build(name: str, sample: Path):
    """(model quantized as `name` says, preprocessing transform)."""
    if name.startswith("nvidia-"):
        from vquant_pl.nvidia import quant_modules

        torch.manual_seed(0)
        with quant_modules.quantized_layers():  # pytorchcv builds nn.Conv2d at call time: every layer swapped
            model, prep = vq.create_model("pytorchcv:resnet18", pretrained=False)
        model.eval()
        extra = sample.parent / "imagenet-sample-extra"
        calib, _ = load_images(extra, prep.transform(), 4)
        vq.calibrate(model, [calib])
        return model, prep.transform()
    arch, bits = name.split("-")
    bits = int(bits[1])
    if arch == "resnet18":
        torch.manual_seed(0)
        model, prep = vq.create_model("pytorchcv:resnet18", pretrained=False)
    else:
        model, prep = vq.create_model("efficientnet_lite:lite0")
    model.eval()
    vq.quantize_model(model, bits, bits, progress=False)
    return model, prep.transform()


def accuracy(args) -> None:
    print(f"# export agreement, {machine()}, onnxruntime CPU, images: {args.sample}")
    print("| model | images | PyTorch top-1 / top-5 | onnxruntime top-1 / top-5 | same top-1 class | max logit diff "
          "| without graph optimizations: top-1 / top-5, same class, max diff | integer kernels in onnxruntime |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        model, transform = build(name, args.sample)
        images, labels = load_images(args.sample, transform)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.onnx"
            report = vq.export_onnx(model, path, images[:2])
            with torch.no_grad():
                want = torch.cat([model(b) for b in images.split(25)])
            got, plain = (torch.cat([torch.from_numpy(run_onnx(session, b)) for b in images.split(25)])
                          for session in (ort_session(path), ort_session(path, optimize=False)))
        pt, ox, op = topk(want, labels), topk(got, labels), topk(plain, labels)
        same = int((want.argmax(1) == got.argmax(1)).sum())
        same_plain = int((want.argmax(1) == plain.argmax(1)).sum())
        ops = {}
        for layer in report.layers:
            ops[layer.ort_op] = ops.get(layer.ort_op, 0) + 1
        kinds = ", ".join(f"{op} {n}" for op, n in sorted(ops.items()))
        print(f"| {name} | {len(labels)} | {pt[0]} / {pt[1]} | {ox[0]} / {ox[1]} | {same}/{len(labels)} | "
              f"{float((got - want).abs().max()):.3g} | {op[0]} / {op[1]}, {same_plain}/{len(labels)}, "
              f"{float((plain - want).abs().max()):.3g} | {kinds} |", flush=True)
        if args.layers:
            print(report.table(), file=sys.stderr)


def images_per_s(fn, x: torch.Tensor, runs: int) -> float:
    fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def speed(args) -> None:
    torch.set_num_threads(args.threads)
    model, prep = vq.create_model("efficientnet_lite:lite0")
    model.eval()
    x = torch.rand(args.batch, 3, 224, 224)

    def torch_fn(batch):
        with torch.inference_mode():
            model(batch)

    rows = [("PyTorch FP32", images_per_s(torch_fn, x, args.runs))]
    vq.quantize_model(model, 8, 8, progress=False)
    rows.append(("PyTorch W8A8 fake-quant", images_per_s(torch_fn, x, args.runs)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lite0_w8a8.onnx"
        vq.export_onnx(model, path, x[:2], verify=False)
        session = ort_session(path, threads=args.threads)
        rows.append(("onnxruntime W8A8 QDQ (exported)", images_per_s(lambda b: run_onnx(session, b), x, args.runs)))
    print(f"# EfficientNet-Lite0, batch {args.batch}, {args.threads} threads, median of {args.runs}, {machine()}")
    print("| runtime | images/s |\n| --- | --- |")
    for label, value in rows:
        print(f"| {label} | {value:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    acc.add_argument("--sample", type=Path, default=SHARED / "data" / "imagenet-sample")
    acc.add_argument("--layers", action="store_true", help="print each model's per-layer table to stderr")
    spd = sub.add_parser("speed")
    spd.add_argument("--batch", type=int, default=32)
    spd.add_argument("--runs", type=int, default=5)
    spd.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    accuracy(args) if args.what == "accuracy" else speed(args)


if __name__ == "__main__":
    main()
