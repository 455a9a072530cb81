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
from vquant_pl.ops.squant import ROUNDINGS, levels, squant_round_torch

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


# ------------------------------------------------------------------- the CPU kernel (issue 20)
def _native_or_skip():
    if not NATIVE:
        pytest.skip(f"native kernels unavailable: {kernels.status()['cpu']}")
    return torch.ops.vquant


def _adversarial_codes():
    """Codes that drive every selection path of the CPU kernel: error sums of exactly 0 (the
    K-level boundary at the last place), every residual on one side (k > 8 in a 7x7 kernel,
    k > 32 at the C-level), ties, few candidates (zero priorities taken in index order), -0."""
    g = torch.Generator().manual_seed(20)
    one_side = torch.randint(-7, 7, (5, 40, 49), generator=g) + 0.3  # every error -0.3: s = -14.7 per kernel
    return {
        "exact integers (s == 0)": torch.randint(-8, 8, (6, 20, 9), generator=g).float(),
        "halves and quarters": torch.randint(-32, 32, (6, 50, 9), generator=g) / 4.0,
        "one side, 7x7": one_side,
        "one side, 1x1 row of 2000": torch.randint(-7, 7, (3, 2000, 1), generator=g) - 0.4,
        "few candidates": torch.where(torch.rand(4, 300, 3, generator=g) < 0.05, 0.45, 2.0) + 0.0,
        "clamped codes": (torch.randn(4, 64, 9, generator=g) * 9).clamp(-9.5, 8.5),
        "signed zeros": torch.tensor([-0.3, 0.3, -0.0, 0.0, -0.2, 0.1, -0.1, 0.2, -0.4]).repeat(3, 4, 1),
        "kernel 1x7": torch.randn(5, 30, 7, generator=g) * 3,
        "kernel 5x5": torch.randn(5, 30, 25, generator=g) * 3,
        "kernel 3 (conv1d)": torch.randn(5, 30, 3, generator=g) * 3,
        "kernel 2": torch.randn(5, 30, 2, generator=g) * 3,
    }


@pytest.mark.parametrize("case", list(_adversarial_codes()))
def test_squant_round_cpu_equals_the_reference_to_the_bit(case):
    ops = _native_or_skip()
    codes = _adversarial_codes()[case]
    for bits in (2, 4, 8):
        for rounding in ROUNDINGS:
            k_level, c_level = levels(rounding, codes.shape[-1])
            expected = squant_round_torch(codes, bits, rounding)
            got = ops.squant_round(codes, bits, k_level, c_level)
            # the same bits, -0.0 included (torch.equal alone would accept 0.0 for -0.0)
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (case, bits, rounding)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (16, 1, 3, 3), (24, 40, 1, 1), (10, 300), (6, 3, 7, 7),
                                   (8, 4, 5), (6, 3, 3, 3, 3), (3, 1), (1, 1)])
def test_fused_squant_weight_equals_codes_rounding_dequantization(shape):
    """`vquant::squant_weight` (what quantize_weight runs on the cpp backend) gives the very
    bits of weight_codes + squant_round_torch + dequantize, for every rounding."""
    ops = _native_or_skip()
    from vquant_pl.ops.affine import dequantize, weight_codes

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    w.view(-1)[::5] = 0.0
    if w.shape[0] > 2:
        w[1] = 0.25  # a constant channel: width clamped to 1e-8
    w3 = w.reshape(w.shape[0], w.shape[1] if w.dim() > 1 else 1, -1)
    for bits in (2, 4, 8):
        codes, scale, zero_point = weight_codes(w, bits)
        for rounding in ROUNDINGS:
            expected = dequantize(squant_round_torch(codes.contiguous(), bits, rounding), scale, zero_point)
            got = ops.squant_weight(w3.contiguous(), bits, *levels(rounding, w3.shape[-1]))
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (shape, bits, rounding)
            assert torch.equal(vq.quantize_weight(w, bits, rounding, backend="cpp"),
                               vq.quantize_weight(w, bits, rounding, backend="torch"))


def test_fused_squant_weight_opcheck_and_names_the_bad_channel():
    ops = _native_or_skip()
    for args in [(torch.randn(5, 7, 9), 4, True, True), (torch.randn(3, 300, 1), 2, False, True)]:
        opcheck(ops.squant_weight, args)
    w = torch.randn(4, 8, 9)
    w[2, 5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(output channel 2"):
        ops.squant_weight(w, 4, True, True)
    w[2, 5, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        vq.quantize_weight(w, 4, backend="cpp")
    with pytest.raises(RuntimeError, match="must be float32"):
        ops.squant_weight(w.double(), 4, True, True)


def test_cpu_kernel_results_do_not_depend_on_the_threads():
    """Channels are handed out in chunks to whichever thread is free: the result is the same."""
    ops = _native_or_skip()
    w = torch.randn(700, 24, 9, generator=torch.Generator().manual_seed(5))  # many chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [ops.squant_weight(w, 4, True, True), ops.squant_round(w * 3, 4, True, True)]
        torch.set_num_threads(max(threads, 2))
        for _ in range(3):
            many = [ops.squant_weight(w, 4, True, True), ops.squant_round(w * 3, 4, True, True)]
            assert all(torch.equal(a, b) for a, b in zip(one, many))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("lo,hi,match", [(float("nan"), 4.0, r"\[nan, 4.0\] must be finite"),
                                         (0.0, float("inf"), r"\[0.0, inf\] must be finite"),
                                         (6.0, 0.0, r"\[6.0, 0.0\] is inverted \(lo > hi\)"),
                                         (-3e38, 3e38, r"\[-3e\+38, 3e\+38\] overflows float32")])
def test_activation_ranges_that_give_nan_or_constants_are_refused(lo, hi, match):
    """Review defect 2: NaN / inf / inverted ranges returned NaN or a constant silently."""
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0, 5.0])
    with pytest.raises(ValueError, match="activation range " + match):
        vq.fake_quant_activation(x, 4, lo, hi, False)
    with pytest.raises(ValueError, match="activation range " + match):
        ActivationQuantizer(4, torch.tensor(lo), torch.tensor(hi), True)
    with pytest.raises(ValueError, match=r"activation range .*\(channel 1\) " + match.split("] ")[-1]):
        ChannelActivationQuantizer(torch.tensor([4, 4]), torch.tensor([0.0, lo]), torch.tensor([1.0, hi]), False)
    assert vq.fake_quant_activation(x, 4, 0.0, 0.0, False).isfinite().all()  # a zero-width range stays valid


def test_python_and_fake_operators_check_what_the_native_ones_check():
    """Review defect 3: vquant_py.squant_round took bits=0 (codes -0.5); the fake took fp16."""
    codes = torch.randn(2, 3, 9)
    for ns in _namespaces():
        for bits in (0, 17):
            with pytest.raises(RuntimeError, match=f"squant_round: bits must lie in 1..16, got {bits}"):
                ns.squant_round(codes, bits, True, True)
        with pytest.raises(RuntimeError, match="must be float32"):
            ns.squant_round(codes.half(), 4, True, True)
        with pytest.raises(RuntimeError, match="q_min 3 > q_max 2"):
            ns.fake_quant(torch.randn(4), 1.0, 0.0, 3, 2)
    meta = torch.empty(4, 3, 9, device="meta")
    ops = [torch.ops.vquant_py.squant_round] + ([torch.ops.vquant.squant_round, torch.ops.vquant.squant_weight]
                                                if NATIVE else [])
    for op in ops:
        assert op(meta, 4, True, True).shape == meta.shape
        with pytest.raises(RuntimeError, match="must be float32"):
            op(meta.half(), 4, True, True)
        with pytest.raises(RuntimeError, match="bits must lie in 1..16, got 0"):
            op(meta, 0, True, True)
    with pytest.raises(RuntimeError, match="q_min 3 > q_max 2"):
        torch.ops.vquant_py.fake_quant(torch.empty(4, device="meta"), 1.0, 0.0, 3, 2)
