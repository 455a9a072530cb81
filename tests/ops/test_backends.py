"""torch, native C++ and CUDA SQuant backends agree bit for bit; selection and build."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import vquant_pl as vq
from vquant_pl.ops import backends, kernels
from vquant_pl.ops.squant import ROUNDINGS

CUDA = torch.cuda.is_available()
NATIVE = ["cpp"] + (["cuda"] if CUDA else [])


def _all_equal(weight, bits, rounding):
    expected = vq.quantize_weight(weight, bits, rounding, backend="torch")
    for backend in NATIVE:
        w = weight.cuda() if backend == "cuda" else weight
        got = vq.quantize_weight(w, bits, rounding, backend=backend).cpu()
        assert torch.equal(got, expected), (backend, tuple(weight.shape), bits, rounding)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "inceptionv3", "sqnxt23_w2", "shufflenet_g1_w1"])
def test_paper_model_weights_equal_on_every_backend(name):
    from pytorchcv.model_provider import get_model

    model = get_model(name, pretrained=False)
    for _, layer in vq.quantizable_layers(model):
        for rounding in ("squant", "squant-k", "squant-c"):
            _all_equal(layer.weight.detach(), 4, rounding)


def _odd(kind):
    shapes = {"depthwise": (32, 1, 3, 3), "pointwise": (24, 40, 1, 1), "linear": (10, 300),
              "conv1d": (8, 4, 5), "conv3d": (6, 3, 3, 3, 3), "wide": (4, 512, 3, 3)}
    if kind in shapes:
        return torch.randn(shapes[kind])
    w = torch.randn(8, 6, 3, 3)
    if kind == "constant":
        w[0], w[1], w[2] = 0.0, 1.5, -2.0
    elif kind == "grid":
        w = torch.randint(-4, 5, (8, 6, 3, 3)).float() / 2
    elif kind == "half":
        w = w.half()
    elif kind == "bf16":
        w = w.bfloat16()
    elif kind == "non-contiguous":
        w = torch.randn(3, 3, 6, 8).permute(3, 2, 0, 1)
    return w


@pytest.mark.parametrize("kind", ["depthwise", "pointwise", "linear", "conv1d", "conv3d", "wide", "constant",
                                  "grid", "half", "bf16", "non-contiguous"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_odd_shapes_and_dtypes_equal_on_every_backend(kind, bits):
    for rounding in ROUNDINGS:
        _all_equal(_odd(kind), bits, rounding)


def test_selection(monkeypatch):
    assert backends.resolve(None, torch.device("cpu"))[0] == "cpp"
    monkeypatch.setenv("VQUANT_BACKEND", "torch")
    assert backends.resolve(None, torch.device("cpu"))[0] == "torch"
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.resolve("gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend 'cuda' needs a CUDA tensor"):
        vq.quantize_weight(torch.randn(4, 4), 4, backend="cuda")
    monkeypatch.setenv("VQUANT_BACKEND", "cpp")
    model = torch.nn.Linear(8, 4)
    assert vq.quantize_model(model, 4, None).backend == "cpp"
    vq.restore_model(model)


@pytest.mark.skipif(CUDA, reason="with a GPU the CUDA tests above build and run the kernel")
@pytest.mark.skipif(shutil.which("nvcc") is None or kernels.find_cuda_home() is None,
                    reason="no nvcc / CUDA toolkit: the CUDA sources cannot be compiled here")
def test_cuda_sources_compile(monkeypatch):
    """Compile (not run) the CUDA extension so that a broken .cu file fails CI."""
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # no GPU to ask: build for Hopper
    code = "from vquant_pl.ops import kernels; kernels.build('cpu'); print(kernels.build('cuda').name)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", env["TORCH_CUDA_ARCH_LIST"])  # the name names the architectures
    assert kernels.build_name("cuda") in run.stdout


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_fused_fake_quant_equals_reference(bits, signed):
    from vquant_pl.ops.affine import ActivationQuantizer

    n = 2 ** (bits - 1)
    # scale 1, zero point 0 (unsigned) or n - n (signed): codes x + .5 are exact ties
    lo, hi = (-(2 ** bits - 1) / 2, (2 ** bits - 1) / 2) if signed else (0.0, 2.0 ** bits - 1)
    q = ActivationQuantizer(bits, lo, hi, signed)
    ties = torch.arange(-2 * n, 2 * n + 1).float() + 0.5 + (q.zero_point.item() if signed else 0.0)
    x = torch.cat([ties, torch.randn(10000) * n, torch.tensor([1e30, -1e30, 0.0])])
    devices = ["cpu"] + (["cuda"] if CUDA else [])
    for device in devices:
        xd = x.to(device)
        assert torch.equal(q(xd).cpu(), q.reference(xd).cpu()), device
        strided = xd.reshape(-1, 1).expand(-1, 2).t()  # non-contiguous
        assert torch.equal(q(strided).cpu(), q.reference(strided).cpu()), device


def test_golden_activations_through_both_paths(golden):
    from vquant_pl.ops.affine import ActivationQuantizer

    for c in golden["activations"]:
        q = ActivationQuantizer(c["bits"], c["x_min"], c["x_max"], c["signed"])
        assert torch.equal(q(c["input"]), c["expected"]) and torch.equal(q.reference(c["input"]), c["expected"])
