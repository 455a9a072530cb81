"""The vquant operators: dispatcher registration (opcheck), dtypes and memory formats,
torch.compile without graph breaks, and the build (once, visibly, cached by version + hash)."""
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch.library import opcheck

import vquant_pl as vq
from vquant_pl.ops import backends, kernels
from vquant_pl.ops.affine import ActivationQuantizer, ChannelActivationQuantizer
from vquant_pl.ops.squant import squant_round_torch

REPO = Path(__file__).resolve().parents[2]
NATIVE = kernels.ops() is torch.ops.vquant  # builds (or loads the cached build) once


def _namespaces():
    return [torch.ops.vquant_py] + ([torch.ops.vquant] if NATIVE else [])


@pytest.mark.parametrize("ns", ["vquant", "vquant_py"])
def test_opcheck(ns):
    if ns == "vquant" and not NATIVE:
        pytest.skip(f"native kernels unavailable: {kernels.status()['cpu']}")
    ops = getattr(torch.ops, ns)
    x = torch.randn(2, 5, 6, 7)
    for args in [(x, 4.0, 1.0, 0, 15), (x.to(memory_format=torch.channels_last), 2.5, 8.0, -8, 7),
                 (x.bfloat16(), 4.0, 0.0, 0, 15), (x.half().transpose(1, 3), 4.0, 0.0, 0, 15),
                 (x[:, ::2], 4.0, 0.0, 0, 15)]:  # not dense
        opcheck(ops.fake_quant, args)
    for args in [(torch.randn(5, 7, 9) * 3, 4, True, True), (torch.randn(3, 300, 1) * 3, 2, False, True),
                 (torch.randn(4, 2, 3) * 3, 8, True, False)]:
        opcheck(ops.squant_round, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_fake_quant_keeps_dtype_and_layout(dtype, layout):
    x = (torch.randn(2, 8, 9, 10) * 3).to(dtype)
    x = {"contiguous": x, "channels_last": x.to(memory_format=torch.channels_last),
         "transposed": x.transpose(1, 2)}[layout]
    q = ActivationQuantizer(4, -1.0, 3.0, signed=True)
    expected = q.reference(x)
    for ops in _namespaces():
        got = ops.fake_quant(x, q._scale_f, q._zero_point_f, q.q_min, q.q_max)
        assert got.dtype == dtype and got.stride() == expected.stride() and torch.equal(got, expected), ops
    got = q(x)
    assert got.dtype == dtype and torch.equal(got, expected)
    if layout == "channels_last":  # the old fused kernel returned a contiguous tensor here
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_channel_quantizer_keeps_layout_and_values():
    q = ChannelActivationQuantizer(torch.tensor([2, 4, 8]), torch.tensor([0.0, -1.0, 0.0]),
                                   torch.tensor([1.0, 2.0, 6.0]), signed=False)
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    y = q(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    scale = q.scale.view(1, 3, 1, 1)
    zp = q.zero_point.view(1, 3, 1, 1)
    ref = ((x * scale - zp).round().clamp(q.q_min.view(1, 3, 1, 1), q.q_max.view(1, 3, 1, 1)) + zp) / scale
    assert torch.equal(y, ref)


def test_quantizer_pickles_and_copies():
    import copy
    import pickle

    q = ActivationQuantizer(4, 0.0, 6.0, signed=False)
    x = torch.rand(3, 4) * 8
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert clone.ranges() == q.ranges() and torch.equal(clone(x), q(x))


def _lite0_quantized(size=64):
    model = vq.create_model("efficientnet_lite:lite0", pretrained=False)[0].eval()
    model = model.to(memory_format=torch.channels_last)
    vq.quantize_model(model, 4, 4, probe=vq.Probe(0, (8, 3, size, size)))
    return model


def _channels_last_conv_inputs(model, x):
    seen = []
    def record(module, args):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(seen), len(seen)


def test_compiled_quantized_lite0_equals_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = _lite0_quantized()
    x = torch.rand(2, 3, 64, 64).to(memory_format=torch.channels_last)
    # channels_last survives quantization: every conv input (after its fake-quantizer) is channels_last
    assert _channels_last_conv_inputs(model, x) == (49, 49)
    with torch.no_grad():
        explain = torch._dynamo.explain(model)(x)
        assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
        torch._dynamo.reset()
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------- building
# (names, reuse, locks, folders: tests/ops/test_build.py)

NO_COMPILER = r"""
import warnings, torch
warnings.simplefilter("always")
import vquant_pl as vq
from vquant_pl.ops import kernels
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten(),
                            torch.nn.Linear(64, 10))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report = vq.quantize_model(model, 4, 4, probe=vq.Probe(0, (4, 3, 8, 8)))
    model(torch.rand(2, 3, 8, 8))
    vq.quantize_weight(torch.randn(8, 3, 3, 3), 4)
unavailable = [str(w.message) for w in caught if "native kernels are unavailable" in str(w.message)]
print("ATTEMPTS", kernels.attempts["cpu"], "WARNINGS", len(unavailable))
print("REASON", unavailable)
print("BACKEND", report.backend, "OPS", kernels.ops())
"""


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_compiler_one_build_attempt_and_one_warning(tmp_path, compiler):
    cxx = str(tmp_path / "no-such-compiler") if compiler == "missing" else shutil.which("false")
    env = dict(os.environ, CXX=cxx, VQUANT_BUILD_DIR=str(tmp_path / "build"), PYTHONPATH=str(REPO))
    env.pop("VQUANT_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", NO_COMPILER], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ATTEMPTS 1 WARNINGS 1" in run.stdout
    assert "BACKEND torch" in run.stdout and "torch.ops.vquant_py" in run.stdout
    if compiler == "missing":
        assert f"no C++ compiler: {cxx!r} is not on PATH" in run.stdout
        assert "building the native kernels" not in run.stderr
    else:  # the build starts, visibly, and fails
        assert run.stderr.count("building the native kernels (first use only, about") == 1
        assert "could not build the cpu kernels" in run.stdout


def test_cuda_self_check_failure_falls_back_loudly(monkeypatch):
    monkeypatch.setitem(kernels._state, "cuda", None)
    monkeypatch.setattr(kernels, "build", lambda kind, *a, **k: None)
    monkeypatch.setattr(kernels, "self_check", lambda ns, device: ["squant_round squant 4 bits: 3 codes differ"])
    monkeypatch.setattr(kernels, "_rank_zero", lambda: True)
    with pytest.warns(RuntimeWarning, match="THE CUDA KERNELS GIVE WRONG RESULTS.*3 codes differ"):
        kernels._load_cuda()
    assert kernels.status()["cuda"].startswith("failed the self-check")
    with pytest.raises(kernels.BackendUnavailable, match="failed the self-check"):
        backends._native("cuda")


def test_self_check_finds_a_wrong_kernel():
    assert kernels.self_check(torch.ops.vquant_py, "cpu") == []
    wrong = types.SimpleNamespace(
        squant_round=lambda c, b, k, cl: squant_round_torch(c, b, "squant-e"),  # forgets the flips
        fake_quant=torch.ops.vquant_py.fake_quant)
    problems = kernels.self_check(wrong, "cpu")
    assert problems and all(p.startswith("squant_round") for p in problems)


def test_prebuild_command_builds_and_reports():
    if not NATIVE:
        pytest.skip("no compiler")
    with warnings.catch_warnings():
        assert kernels.main(["--no-cuda"]) == 0


def test_selftest_passes_and_fails_on_a_wrong_backend(monkeypatch, capsys):
    from vquant_pl.cli import selftest

    assert selftest.main(["--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "torch " in out and ("cpp " in out) == NATIVE
    wrong = types.SimpleNamespace(squant_round=lambda c, b, k, cl: torch.ops.vquant_py.squant_round(c, b, False, cl),
                                  fake_quant=torch.ops.vquant_py.fake_quant)  # forgets the K-level
    monkeypatch.setattr(kernels, "native_ops", lambda: wrong)
    assert selftest.main(["--no-timing"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "cpp: ((16, 8, 3, 3)" in out


def test_backend_env_torch_selects_the_pytorch_operators(monkeypatch):
    monkeypatch.setenv("VQUANT_BACKEND", "torch")
    assert kernels.ops() is torch.ops.vquant_py
    assert backends.resolve(None, torch.device("cpu"))[0] == "torch"


def test_torch_kernels_replace_loaded_cuda_kernels(monkeypatch):
    """What a failed CUDA self-check does to the dispatcher (no GPU needed: the CUDA library
    loads and registers on a CPU-only machine; the compile test in test_backends builds it)."""
    # no GPU to ask: the architecture tests/ops/test_backends.py compiles for
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0")
    if not NATIVE or not (kernels.build_root() / kernels.build_name("cuda") / "BUILD_OK").is_file():
        pytest.skip("the CUDA library is not built here (no nvcc)")
    kernels.build("cuda")
    # the build is shared by every checkout with the same sources: the file name, not the folder
    assert re.search(r"\nCUDA: registered at \S*register_cuda\.cpp", torch._C._dispatch_dump("vquant::squant_round"))
    monkeypatch.setitem(kernels._state, "cuda", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warning about the override
        kernels._use_torch_on_cuda("test")
    for op in ("squant_round", "fake_quant"):
        dump = torch._C._dispatch_dump(f"vquant::{op}")
        assert "CUDA: registered at " + str(Path(kernels.__file__)) in dump and "CUDA (inactive)" in dump
    assert kernels.status()["cuda"] == "test"
