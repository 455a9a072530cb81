"""Data-driven activation ranges through quantize_model, for comparison (vquant_pl.nvidia.calib)."""
import pytest
import torch

import vquant_pl as vq

from helpers.models import ConvBnReluConv


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_data_driven_ranges_for_comparison(method):
    model = ConvBnReluConv().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(3)]
    with pytest.raises(ValueError, match="data-driven: pass calibration="):
        vq.quantize_model(model, 8, 8, act_range=method)
    report = vq.quantize_model(model, 8, 8, act_range=method, calibration=batches, calib_batches=2)
    assert report.probe_time_s > 0
    with torch.no_grad():
        h = torch.relu(model.bn1(model.conv1(batches[0])))
        h2 = torch.relu(model.bn1(model.conv1(batches[1])))
    top = float(torch.maximum(h.max(), h2.max()))
    assert report.layers[1].signed is False and 0 < report.layers[1].act_hi <= top * 1.01
    if method == "max":
        assert report.layers[1].act_hi == top
    vq.restore_model(model)
