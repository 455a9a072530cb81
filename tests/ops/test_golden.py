"""Bit-exact agreement with the reference implementation's outputs (../shared/golden), on every backend."""
import pytest
import torch

import vquant_pl as vq

BACKENDS = [
    pytest.param("torch", "cpu"),
    pytest.param("cpp", "cpu"),
    pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_weight_case_is_bit_exact(golden, backend, device):
    mismatches = [
        (i, c["shape"], c["dist"], c["bits"], c["mode"])
        for i, c in enumerate(golden["weights"])
        if not torch.equal(vq.quantize_weight(c["weight"].to(device), c["bits"], c["mode"], backend=backend).cpu(),
                           c["expected"])
    ]
    assert len(golden["weights"]) == 840
    assert mismatches == []


def test_every_activation_case_is_bit_exact(golden):
    for c in golden["activations"]:
        lo, hi, signed = vq.sigma_range(c["input"], c["bits"], c["sigma"])
        assert (lo, hi, signed) == (c["x_min"], c["x_max"], c["signed"])
        out = vq.fake_quant_activation(c["input"], c["bits"], lo, hi, signed)
        assert torch.equal(out, c["expected"])
    assert len(golden["activations"]) == 30
