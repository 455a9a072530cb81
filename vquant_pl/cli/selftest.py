"""`vquant selftest`: every available backend on golden cases, the CUDA self-check, and timings.

    vquant selftest [--golden PATH] [--emulation] [--no-timing] [--runs 5]

Checks, bit for bit:
- the PyTorch reference against known answers of the reference SQuant implementation
  (a few cases of the project's golden file, shipped below);
- every backend present (`torch`, `cpp`, `cuda` with a GPU, the CUDA emulation when built or
  asked for) against the reference on generated cases: the golden file's shapes (depthwise,
  1x1, 7x7, linear, ...) and distributions (normal, Laplace, outliers, pruned, degenerate)
  at 2, 3, 4, 6, 8 bits in every rounding method, plus rows longer than a CUDA block; the
  fake-quantizer in fp32/fp16/bf16 and contiguous/channels_last layouts;
- with `--golden` (e.g. `../shared/golden/squant_golden.pt`), every case of that file;
- the CUDA self-check that runs at the first CUDA use.

Then prints a timing table (SQuant whole-model ResNet18/ResNet50 at W4, fake-quant
throughput) per device and backend, median of `--runs`. Exit status 1 on any mismatch.
On a GPU machine this is the one command to run; it takes well under 5 minutes there.

Example:
    >>> from vquant_pl.cli import selftest
    >>> selftest.main(["--no-timing"])  # doctest: +SKIP
    0
"""
from __future__ import annotations

import argparse
import base64
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from torch import Tensor

from ..ops import kernels
from ..ops.affine import dequantize, weight_codes
from ..ops.squant import ROUNDINGS, levels
from .files import load_tensors

# Cases of ../shared/golden/squant_golden.pt (outputs of the reference implementation):
# (shape, rounding, bits, weight, expected dequantized weight), float32 little-endian, base64.
KNOWN: list[tuple[tuple[int, ...], str, int, str, str]] = [
    ((12, 1, 3, 3), 'squant', 4,  # outlier
     'rNEEPxlIErh+Rh+91PpbPERPIDx33pQ7J3QDPdRddjwgCQe8WMO7PIiDGzzEi6+6iasqvMkzGz2J3Og87gF2v+KqDr3nM0o5EJ1u'
      'u62NEb2p3Mi6exEeuve7arugrB27j8kCu1elGLzLJD28+9giPCMplDuUy9Y8TVlZv8k0yLznBRa9knriuxuoJjy7KYS8Rucfu0Jk'
      'nDqiwAs9/MrCvI5C4rm9ROW8cgEEPB7m0ryfOqA8OTrhvnkQmLxce3G7Uj42vPWmPjw7jTG87VGou6C8Ar2rnM28IrUnu+FzKDpB'
      'THE7tWCWvAN2+Dcr3fG8aZV3PhRwXDwCT3E7C9d/vP3pljuP4Zk8fvErPZf3wzt52Fi8xD0AuymwZzsTf2Q6lImUu9dMcbzAnKY8'
      'qtVnPA8cCr1cf/M7z4YlvaJTFDyyfby8Ys+ZPOu41TkE/5c8b2zxvF18NDyA4l68IK8AOusZbrx9upq8GbbSvn55bDyJp+W814+F'
      'vNUfszubTBi9wuYdOkW+rjzSy3I8m17RPNZKEL27bDw8ZnMCPX78pbz3J+C71pNrv65eS7whEdG8',
     'aEEFPwAAAADAShi9AAAAAAAAAAAAAAAAwEoYPcBKGD0AAAAAAAAAAAAAAAAAAAAAAAAAAKBgiD0AAAAAF6luv6BgiL0AAAAAXJ+Y'
      'u2cVD71cnxi7AAAAAFyfGLtcnxi7XJ8Yu1yfGLw0xz68AAAAAAAAAAAAAAAAsB9RvwAAAACk/269AAAAAAAAAAAAAAAAAAAAAAAA'
      'AABErAc9ZoLLvAAAAAB3be28RKwHPGaCy7xVl6k8cC/nvgCZ9rwAAAAAAAAAAAAAAAAAAAAAAAAAAACZ9rwAmfa8AAAAAAAAAAAA'
      'AAAAOyuUvAAAAAA7K5S8P8ZwPjsrlDwAAAAAV6F7vFehezvWRJ087P4sPVeh+zsBuTy8V6F7u1ehezsAAAAA97WEu/e1hLx046U8'
      '97WEPPe1BL33tQQ8dOMlvfe1BDzyEMe87ReePAAAAADtF5485CPtvO0XHjySylK8AAAAAJLKUrztF568dNvOvgAAAACFaOy8hWjs'
      'vAAAAACFaOy8AAAAAIVo7DyFaOw8AAAAAFz9gb0AAAAAAAAAAAAAAAAAAAAAYXtjvwAAAAAAAAAA'),
    ((20, 10, 1, 1), 'squant-c', 3,  # normal
     'VlKKvc81cTttoV89kxZtveNJaj1l5Cq9z9EEu11Zir05y4s7U+tQPf5twTxl3ou64N3MPH6UpDzoAx28ovpfvIaymL1/Ye29/7yF'
      'u6Xppbxu1yK8W/FpOzc5KDxKN8Q9U61WPQD/VrsDV1O96gC8vFPxDDwY8oG9Ie83PZC6nz1LZa89Y9NPPQWYOjt4izg97MIOvW0k'
      'qby0dYA9r2lZPZCVLD3ibtC7szJiPbbKkzw6dta85wrRPM1sGT2z7k49b56OPDPyID3epok8Qz52PZJ4tjvvHvm9CvBwPcsuRb3T'
      'dWe8FbEavSwXRbzcZxE9ByzmvJ9Plzs15dE9jU7AvCMmSTw3cbE9JH4DPRUbzTyCgN68qD2sOxgPFLvPNAy9UXi5vdMCO76nR+U8'
      'HZ4APgovOT0r35I9U8cxvTbppjwfKAu9xVmLvWM/g7yg7be96f9DPAXbW7zznMa8J5BHPL56wrzPmAk8R6+Lu+MNjj1t8Ty8t6Cl'
      'vNusNb3V23g6T+CYPXfMBz13TWi88x4MvZhWb72C29U9Jc91vPwJsDxxp429tPYaPTCo+7yRWQG9sDMMPS+avzyHLbK8t7cyvfcd'
      'lj3XFC89i2TOPBeMJL079De8oNPAPIsSL7120IG92QWEvc8F4D1ma5c9Y9B7vZ7auz2QQWi6HXCEvWvbfzx/DQk9mLKGPIB0Kz2X'
      '+T09uvU7PVP9Rj0lOpO8aOnqu0iwHrty8gq9uEqEPFMNpz2TK7m7anHKPcNCzLsx8h+81RtHvUyQS7uYE2+9Ul09vXMzWT1DI0s8'
      'wzD6Par/673a5+y8mlFlvUimpbyghnC8P4aVvTWlYT0XLwa9ULbtvI+zyjv8XLi8/FdCvUX4Ib0ncR89pqiYuqIfrr11Dg49OO5T'
      'PPORqT2sN5M9dznKPLpwfDwz3/I7vdNzPdeelDwlidG8ECXhvDuOqzznbRK9WSymPIu6dL27KtG9dhqovYhk8Tra2lM9r52aOzZS'
      'q7vyTOc9atdkvKuRmL3Tp588Y2rfvMfP8jyCc128Wd+FveQLurxIhh287+jPvEDI3jw=',
     'CP+RvQAAAACM/lo9jP5avYz+Wj0I/xG9AAAAAAj/kb0AAAAAjP5aPbLppDwAAAAAsumkPLLppDwAAAAAAAAAALLppL2MXve9AAAA'
      'ALLppLwAAAAAAAAAAMpgujzKYLo9ymA6PQAAAADKYDq9ymC6vAAAAACXyIu93AMNPdwDjT3TRLA9yoVTPQAAAADKhVM93AMNvdwD'
      'jbzcA409yoVTPeSHPj3khz683iluPeSHvjzkh7685Ie+POvlDj3khz495Ie+POvlDj3AtdQ8wLVUPQAAAACY8QS+wLVUPcC1VL0A'
      'AAAAwLXUvAAAAADAtdQ8aNIYvQAAAAACB789aNKYvGjSmDwCB789aNIYPWjSmDxo0pi8AAAAAAAAAAD3WzS991u0vfdbNL73WzQ9'
      '+UQHPvdbND33W7Q991s0vQAAAAB0tu68CTKVvXS2brzXCLO9dLZuPHS2brx0tu68dLZuPHS27rx0tm48AAAAANlDiz3ZQ4u82UOL'
      'vNlDC70AAAAA2UOLPdlDCz3ZQ4u82UMLvUImS71CJss9QibLvEImyzyyXJi9QiZLPUImy7xCJsu8QibLPEImyzz19Z+89fUfvfX1'
      'nz319R899fWfPPX1H7319Z+89fWfPPX1H73v8G+908SYvRmxyz3TxJg9GbFLvRmxyz0AAAAA08SYvRmxyzwZscs8GbHLPFAoBz14'
      'vEo9eLxKPXi8Sj1QKIe8UCiHvAAAAABQKAe9UCiHPGTyqD0AAAAAQ/23PQAAAAAAAAAAQ/03vQAAAADy/Ym9Q/03vUP9Nz0AAAAA'
      'Q+kKPuVd0L1D6Qq9Q+mKvUPpCr1D6Qq9Q+mKvUPpij1D6Qq9Q+kKvQAAAAB5ZcS8eWVEvXllRL15ZUQ9AAAAABtMk715ZcQ8eWXE'
      'PBtMkz2Xc509Jez7PCXsezwAAAAAJex7PSXsezwl7Pu8Jez7vCXsezwl7Pu8GrL7PBqye72Uxby9lMW8vQAAAAAasns9AAAAAAAA'
      'AAAasvs9GrL7vExWmL1HvXM8R73zvEe98zxHvXO8R71zvUe9c7xHvXO8R73zvEe98zw='),
]

RoundOp = Callable[[Tensor, int, bool, bool], Tensor]
FakeQuantOp = Callable[[Tensor, float, float, int, int], Tensor]


def _decode(text: str, shape: tuple[int, ...]) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.float32).reshape(shape).clone()


def _quantize(weight: Tensor, bits: int, rounding: str, op: RoundOp, device: torch.device) -> Tensor:
    codes, scale, zero_point = weight_codes(weight, bits)
    q = op(codes.contiguous().to(device), bits, *levels(rounding, codes.shape[-1])).cpu()
    return dequantize(q, scale, zero_point).reshape(weight.shape).to(weight.dtype)


def generated_weights(seed: int = 0) -> list[tuple[Tensor, int, str]]:
    """Seeded weight cases in the golden file's shapes and distributions, every rounding."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8, 3, 3), (12, 1, 3, 3), (20, 10, 1, 1), (8, 4, 5, 5), (8, 3, 7, 7), (30, 16), (6, 5, 3, 3),
              (4, 300, 3), (3, 1300)]
    cases = []
    for i, shape in enumerate(shapes):
        for dist in ("normal", "laplace", "outlier", "pruned", "degenerate"):
            w = torch.randn(shape, generator=g)
            if dist == "laplace":
                w = torch.distributions.Laplace(0.0, 1.0).icdf(torch.rand(shape, generator=g) * 0.998 + 0.001)
            elif dist == "outlier":
                w.view(-1)[:: 17] *= 20
            elif dist == "pruned":
                w[torch.rand(shape, generator=g) < 0.5] = 0.0
            elif dist == "degenerate":
                w[0] = 0.5
                w.view(-1)[1::3] = torch.randint(-3, 4, w.view(-1)[1::3].shape, generator=g) / 4.0
            for j, rounding in enumerate(ROUNDINGS[1:]):
                cases.append((w.float(), (2, 3, 4, 6, 8)[(i + j) % 5], rounding))
    return cases


def backends_present(emulation: bool) -> dict[str, tuple[torch.device, RoundOp, FakeQuantOp]]:
    """Name -> (device, squant_round, fake_quant) of every backend that runs here."""
    present = {"torch": (torch.device("cpu"), kernels._squant_round_reference, kernels.fake_quant_reference)}
    try:
        native = kernels.native_ops()
        present["cpp"] = (torch.device("cpu"), native.squant_round, native.fake_quant)
        if kernels.status()["cuda"] == "native":
            present["cuda"] = (torch.device("cuda"), native.squant_round, native.fake_quant)
    except kernels.BackendUnavailable as err:
        print(f"cpp: not available ({err})")
    if torch.cuda.is_available():  # the reference's ops on the GPU too (and its timing)
        present["torch-cuda"] = (torch.device("cuda"), kernels._squant_round_reference, kernels.fake_quant_reference)
    if torch.cuda.is_available() and "cuda" not in present:
        print(f"cuda: not in use ({kernels.status()['cuda']})")
    if emulation:
        try:
            emu = kernels.load_emulation()
            present["cuda-emulation"] = (torch.device("cpu"), emu.squant_round, emu.fake_quant)
        except kernels.BackendUnavailable as err:
            print(f"cuda-emulation: not available ({err})")
    return present


def check(present: dict, golden_path: str | None) -> list[str]:
    """All correctness checks; returns the failures."""
    failures = []
    for shape, rounding, bits, w, expected in KNOWN:  # the reference itself
        got = _quantize(_decode(w, shape), bits, rounding, kernels._squant_round_reference, torch.device("cpu"))
        if not torch.equal(got, _decode(expected, shape)):
            failures.append(f"torch reference differs from the SQuant reference on {shape} {rounding} {bits} bits")
    cases = generated_weights()
    expected = [_quantize(w, bits, r, kernels._squant_round_reference, torch.device("cpu")) for w, bits, r in cases]
    golden = load_tensors(golden_path, "golden file") if golden_path else None
    for name, (device, round_op, fake_op) in present.items():
        start = time.perf_counter()
        wrong = [(tuple(w.shape), bits, r) for (w, bits, r), e in zip(cases, expected)
                 if not torch.equal(_quantize(w, bits, r, round_op, device), e)]
        n_golden = 0
        if golden is not None:
            for c in golden["weights"]:
                n_golden += 1
                if not torch.equal(_quantize(c["weight"], c["bits"], c["mode"], round_op, device), c["expected"]):
                    wrong.append((tuple(c["shape"]), c["bits"], c["mode"] + " (golden file)"))
        x = torch.randn(4, 25, 25, 40, generator=torch.Generator().manual_seed(1)) * 4
        x.view(-1)[:129] = torch.arange(-64, 65) / 4.0  # ties
        n_act = 0
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for layout in (x, x.to(memory_format=torch.channels_last)):
                xd = layout.to(dtype)
                for args in ((4.0, 0.0, 0, 15), (2.5, 8.0, -8, 7), (127.5, 128.0, -128, 127)):
                    n_act += 1
                    got = fake_op(xd.to(device), *args).cpu()
                    if not (torch.equal(got, kernels.fake_quant_reference(xd, *args)) and got.stride() == xd.stride()):
                        wrong.append((tuple(xd.shape), str(dtype), f"fake_quant {args}"))
        status = "ok" if not wrong else f"{len(wrong)} MISMATCHES, first: {wrong[:3]}"
        print(f"{name:15s} {len(cases)} generated + {n_golden} golden weight cases, {n_act} activation cases: "
              f"{status} ({time.perf_counter() - start:.1f} s)", flush=True)
        failures += [f"{name}: {w}" for w in wrong]
    if torch.cuda.is_available():
        state = kernels.status()["cuda"]
        print(f"CUDA self-check at first use: {'passed' if state == 'native' else state}")
        if state == "native":
            problems = kernels.self_check(torch.ops.vquant, "cuda")
            failures += [f"cuda self-check: {p}" for p in problems]
    return failures


def _median_ms(fn: Callable[[], object], runs: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def timings(present: dict, runs: int) -> None:
    """SQuant whole-model W4 (ResNet18, ResNet50, pytorchcv, random init) and fake-quant throughput."""
    from pytorchcv.model_provider import get_model

    from ..layers import quantizable_layers

    print(f"\nTimings, median of {runs} runs; torch {torch.__version__}")
    print("| what | device | backend | ms |")
    print("| --- | --- | --- | ---: |")
    for model_name in ("resnet18", "resnet50"):
        weights = [layer.weight.detach() for _, layer in quantizable_layers(get_model(model_name, pretrained=False))]
        for name, (device, round_op, _) in present.items():
            if name == "cuda-emulation":
                continue  # a correctness tool, not a backend
            ws = [w.to(device) for w in weights]

            def once():
                for w in ws:
                    codes, scale, zp = weight_codes(w, 4)
                    dequantize(round_op(codes.contiguous(), 4, *levels("squant", codes.shape[-1])), scale, zp)

            ms = _median_ms(once, runs, device.type == "cuda")
            print(f"| SQuant W4 {model_name} ({len(ws)} layers) | {device_name(device)} | {name} | {ms:.1f} |",
                  flush=True)
    for name, (device, _, fake_op) in present.items():
        if name == "cuda-emulation":
            continue
        x = torch.randn(64, 64, 56, 56, device=device).to(memory_format=torch.channels_last)
        ms = _median_ms(lambda: fake_op(x, 4.0, 0.0, 0, 15), runs, device.type == "cuda")
        print(f"| fake-quant 64x64x56x56 fp32 ({x.numel() / ms / 1e6:.2f} G elem/s) | {device_name(device)} "
              f"| {name} | {ms:.2f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the self-test; returns 0 when every backend agrees with the reference, else 1."""
    parser = argparse.ArgumentParser(prog="vquant selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--golden", default=None, help="a golden file (squant_golden.pt) to check every case of")
    parser.add_argument("--emulation", action="store_true", help="also check the CUDA sources under the CPU emulation")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (median; at least 1)")
    args = parser.parse_args(argv)
    if args.runs < 1:  # checked before any work: a median needs a run
        parser.error(f"--runs must be at least 1, got {args.runs}")
    start = time.perf_counter()
    print(f"vquant selftest: torch {torch.__version__}, CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    present = backends_present(args.emulation)
    failures = check(present, args.golden)
    if not args.no_timing:
        timings(present, args.runs)
    print(f"\n{'FAILED' if failures else 'PASSED'}: backends {', '.join(present)}; "
          f"{len(failures)} mismatches ({time.perf_counter() - start:.0f} s)")
    for f in failures[:20]:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
