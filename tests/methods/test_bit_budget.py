"""Mixed precision on a fixed budget (vquant_pl.methods.bit_budget, QuantConfig.mixed_precision)."""
import itertools
import warnings

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl.config import QuantConfig
from vquant_pl.layers import quantizable_layers
from vquant_pl.methods import bit_budget
from vquant_pl.methods.bit_budget import allocate, exact_fill, greedy_bits, input_noise, output_gains, weight_nsr
from vquant_pl.methods.bn_graph import bn_stats, stats_range


def _net() -> nn.Module:
    """A small BN network: a wide 1x1 conv (many parameters), a depthwise conv, a classifier."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                        nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.ReLU6(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.0, 1.0)
    return net.eval()


def test_greedy_bits_known_answer_and_budget():
    # layer 1's NSR is 16x layer 0's at every width: it gets the bits
    nsr = torch.tensor([[4.0, 1.0, 0.25], [64.0, 16.0, 4.0]], dtype=torch.float64)
    assert greedy_bits(nsr, [1, 1], 3, 2, (2, 3, 4)) == [2, 4]
    # the budget is met exactly when it can be, never exceeded
    costs = [10, 3, 7]
    nsr = torch.tensor([[2.0 ** (-2 * b) * s for b in range(2, 9)] for s in (1.0, 100.0, 10.0)], dtype=torch.float64)
    bits = greedy_bits(nsr, costs, 4, 2)
    assert sum(c * b for c, b in zip(costs, bits)) == 4 * sum(costs)  # the greedy left 1 unit: filled exactly
    assert bits[1] == max(bits) and bits[0] == min(bits)
    with pytest.raises(ValueError, match="min_bits 5"):
        greedy_bits(nsr, costs, 4, 5)


def test_nsr_falls_with_bits():
    net = _net()
    layer = net[6]
    s = bn_stats(net, ["6"])["6"]
    w = weight_nsr(layer, s)
    a = input_noise(s, lambda b: stats_range(s, 3.0))
    assert w.shape == (7,) and a.shape == (7, 16)
    assert bool((w[1:] < w[:-1]).all()) and bool((a[1:] < a[:-1]).all())
    # about 4x less weight noise per bit (uniform rounding noise of step 2^-b)
    assert 2.5 < float(w[2] / w[3]) < 6.5


def test_exact_fill_spends_the_rest_with_the_cheapest_moves():
    nsr = torch.tensor([[4.0, 2.0, 1.0], [4.0, 2.0, 1.0], [40.0, 20.0, 10.0]], dtype=torch.float64)
    # 2 budget units left, costs 3/5/7: only "+1 on layer 1 (cost 5), -1 on layer 0 (cost 3)" spends 2
    assert exact_fill(nsr, [1, 0, 1], [3, 5, 7], 2, 0) == [0, 1, 1]
    # the cheapest of two exact solutions (lowering layer 2 costs 10x more NSR than layer 0)
    assert exact_fill(nsr, [1, 1, 1], [4, 4, 4], 4, 0) in ([1, 1, 2], [1, 2, 1], [2, 1, 1])
    assert exact_fill(nsr, [1, 1, 1], [4, 4, 4], 4, 0)[2] == 2  # +1 where the NSR gain is largest
    # nothing spends 1 with costs 4/6: unchanged (the average stays below the target)
    assert exact_fill(nsr[:2], [1, 1], [4, 6], 1, 0) == [1, 1]
    # never below the lowest candidate
    assert exact_fill(nsr[:2], [0, 1], [3, 5], 2, 0) == [0, 1]


def test_output_gains_is_the_squared_jacobian():
    # outputs = w2 . mean_hw(W1 x): a channel's gain at the Linear input is w2_c^2; at the conv
    # input, summed over its H*W positions, (w2 W1)_c^2 / (H*W). One output: Hutchinson is exact.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 1, bias=False)).train()
    layers = quantizable_layers(net)
    g = output_gains(net, layers, torch.rand(5, 3, 6, 6), chunk=2)
    w1, w2 = net[0].weight.detach().reshape(4, 3), net[3].weight.detach().reshape(4)
    assert torch.allclose(g["3"], w2 ** 2, rtol=1e-5)
    assert torch.allclose(g["0"], (w2 @ w1) ** 2 / 36, rtol=1e-5)
    assert net.training and all(p.grad is None for p in net.parameters())  # mode kept, no .grad written


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False)

    def forward(self, x):
        return (self.a(x) + self.b(x) + x).mean((2, 3)).sum(1, keepdim=True)


def test_output_gains_are_each_layers_own():
    # the residual path and the sibling branch read the same tensor; each layer's gain is its own
    # (its input quantizer is a pre-hook on that layer alone): a ~ 0, b the sum of its weights squared
    net = _Residual().eval()
    with torch.no_grad():
        net.a.weight.mul_(1e-3)
    g = output_gains(net, quantizable_layers(net), torch.rand(3, 4, 5, 5))
    wb = net.b.weight.detach().reshape(4, 4).sum(0)  # d out / d x_c through b, per position: wb_c / 25
    assert torch.allclose(g["b"], wb ** 2 / 25, rtol=1e-5)
    assert float(g["a"].max()) < 1e-5 * float(g["b"].max())


def test_output_gains_of_linear_layers_are_per_feature():
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    g = output_gains(net, quantizable_layers(net), torch.rand(4, 5, 8))  # [batch, tokens, features]
    assert g["0"].shape == (8,) and g["2"].shape == (6,)


def test_output_gains_refuse_a_non_tensor_output():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.fc(x)}

    with pytest.raises(ValueError, match="mixed_precision='all'.*returns one tensor, got dict"):
        output_gains(Dict(), [("fc", Dict().fc)], torch.rand(2, 3))


def test_exact_fill_is_taken_even_where_it_raises_the_cost():
    # the greedy leaves 2 of 24 units; spending them lowers layer 0 (NSR +99) to raise layer 1 (-0.1)
    nsr = torch.tensor([[1000.0, 100.0, 1.0], [1.0, 0.9, 0.8]], dtype=torch.float64)
    assert greedy_bits(nsr, [3, 5], 3, 2, (2, 3, 4)) == [3, 3]  # 3*3 + 5*3 = 3 * (3 + 5)


def test_exact_fill_is_the_cheapest_exact_fill_within_reach():
    # against brute force over every combination of moves of at most 2 steps, also with
    # candidate widths that are not consecutive and running sums far outside [0, left]
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for case in range(150):
        widths = ((2, 3, 4, 5, 6), (2, 4, 8, 9, 10))[case % 2]
        n = int(torch.randint(1, 5, (1,), generator=gen))
        nsr = torch.rand(n, 5, generator=gen, dtype=torch.float64).sort(1, descending=True).values
        pos = torch.randint(0, 5, (n,), generator=gen).tolist()
        costs = torch.randint(1, 31, (n,), generator=gen).tolist()
        left, lowest = int(torch.randint(0, 41, (1,), generator=gen)), int(torch.randint(0, 2, (1,), generator=gen))
        best = None
        for steps in itertools.product(range(-2, 3), repeat=n):
            q = [p + s for p, s in zip(pos, steps)]
            if any(s and not lowest <= b < 5 for b, s in zip(q, steps)):
                continue
            if sum(c * (widths[b] - widths[p]) for c, b, p in zip(costs, q, pos)) != left:
                continue
            added = sum(float(nsr[l, q[l]] - nsr[l, pos[l]]) for l in range(n))
            best = added if best is None else min(best, added)
        got = exact_fill(nsr, pos, costs, left, lowest, 2, widths)
        if best is None:
            assert got == pos
            continue
        checked += 1
        assert sum(c * (widths[g] - widths[p]) for c, g, p in zip(costs, got, pos)) == left
        assert sum(float(nsr[l, got[l]] - nsr[l, pos[l]]) for l in range(n)) == pytest.approx(best, abs=1e-12)
    assert checked > 20


def test_greedy_bits_exact_where_the_running_sum_strays_far_from_the_rest():
    # the greedy leaves [3, 6, 6, 5, 2]; spending the rest exactly needs running sums far
    # outside [0, left] (a narrower table warned here)
    nsr = torch.tensor([[0.72, 0.5244, 0.5123, 0.4879, 0.0313], [0.9613, 0.4823, 0.2608, 0.0744, 0.0076],
                        [0.81, 0.6163, 0.517, 0.3145, 0.0097], [0.813, 0.8009, 0.5795, 0.5045, 0.2944],
                        [0.8492, 0.8472, 0.7375, 0.723, 0.4005]], dtype=torch.float64)
    costs = [39, 16, 21, 6, 23]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bits = greedy_bits(nsr, costs, 4, 2, (2, 3, 4, 5, 6))
    assert sum(c * b for c, b in zip(costs, bits)) == 4 * sum(costs)


def test_exact_fill_searches_a_band_when_the_table_is_too_large(monkeypatch):
    nsr = torch.tensor([[16.0, 8.0, 4.0, 2.0, 1.0]] * 6, dtype=torch.float64)
    costs, pos = [3, 5, 7, 11, 13, 17], [2] * 6
    assert exact_fill(nsr, pos, costs, 4, 0) == [3, 3, 3, 1, 2, 2]  # +3 +5 +7 -11: NSR -2 (282 table entries)
    monkeypatch.setattr(bit_budget, "FILL_CELLS", 60)
    banded = exact_fill(nsr, pos, costs, 4, 0)  # running sums kept near [0, 4]: still exact, not the cheapest
    assert sum(c * (b - p) for c, b, p in zip(costs, banded, pos)) == 4 and banded == [1, 2, 3, 2, 2, 2]
    assert exact_fill(nsr, pos, [1, 2, 3, 4, 5, 6], 4, 0) != pos  # a fill inside [0, 4]: +4
    monkeypatch.setattr(bit_budget, "FILL_CELLS", 20)  # not even the band [0, 4] fits (6 x 5 entries): no table
    assert exact_fill(nsr, pos, [1, 2, 3, 4, 5, 6], 4, 0) == pos


def test_greedy_bits_never_exceeds_the_budget_with_wide_steps():
    nsr = torch.tensor([[9.0, 3.0, 1.0], [9.0, 3.0, 1.0]], dtype=torch.float64)
    with pytest.warns(UserWarning, match="the average is 2.66667, not 3"):
        bits = greedy_bits(nsr, [1, 2], 3, 2, (2, 4, 8))
    assert 1 * bits[0] + 2 * bits[1] <= 9


def test_greedy_bits_warns_when_the_budget_cannot_be_spent_exactly(monkeypatch):
    nsr = torch.tensor([[4.0, 2.0, 1.0], [4.0, 2.0, 1.0]], dtype=torch.float64)
    monkeypatch.setattr(bit_budget, "exact_fill", lambda nsr, pos, *a, **k: list(pos))  # nothing spends it
    with pytest.warns(UserWarning, match=r"last 3 of 21 budget bits exactly; the average is 2.57143, not 3"):
        assert greedy_bits(nsr, [2, 5], 3, 2, (2, 3, 4)) == [4, 2]


def test_allocate_gives_input_bits_where_the_outputs_are_sensitive():
    net = _net()
    layers = quantizable_layers(net)
    stats = bn_stats(net, [n for n, _ in layers])
    with pytest.raises(ValueError, match="probe"):
        allocate(net, layers, stats, 4, [None, 4, 4, 8], 4, lambda s, b, layer: stats_range(s, 3.0),
                 torch.zeros(1, 3, 8, 8))
    with torch.no_grad():  # the depthwise output is scaled down 1000x by its BatchNorm: its input matters least
        net[4].weight.mul_(1e-3)
    with pytest.warns(UserWarning, match="last 112 of 8960 budget bits"):  # weights: no moves within reach spend it
        alloc = allocate(net, layers, bn_stats(net, [n for n, _ in layers]), 4, [None, 4, 4, 8], 4,
                         lambda s, b, layer: stats_range(s, 3.0), torch.zeros(1, 3, 8, 8), min_bits=2,
                         probe=torch.rand(4, 3, 8, 8))
    assert alloc.act_bits[0] is None and alloc.act_bits[3] == 8
    assert alloc.act_bits[1] < 4 < alloc.act_bits[2]
    assert alloc.act_average == 4.0  # equal element counts: the two free inputs average exactly 4


def test_allocate_keeps_the_average_and_the_rules():
    net = _net()
    layers = quantizable_layers(net)
    stats = bn_stats(net, [n for n, _ in layers])
    alloc = allocate(net, layers, stats, 4, [None, 4, 4, 8], 4, lambda s, b, layer: stats_range(s, 3.0),
                     torch.zeros(1, 3, 8, 8), min_bits=2, probe=torch.rand(4, 3, 8, 8))
    assert alloc.params == [432, 144, 1024, 640]
    assert alloc.elements == [3 * 64, 16 * 64, 16 * 64, 64]
    assert sum(p * b for p, b in zip(alloc.params, alloc.weight_bits)) == 4 * sum(alloc.params)  # exactly
    assert alloc.weight_average == pytest.approx(
        sum(p * b for p, b in zip(alloc.params, alloc.weight_bits)) / sum(alloc.params))
    assert alloc.weight_average == 4.0
    assert alloc.weight_bits != [4, 4, 4, 4]  # the small depthwise layer is cheap to raise
    assert alloc.act_bits[0] is None and alloc.act_bits[3] == 8  # rule 4 layers keep their bits
    assert alloc.act_bits[1] + alloc.act_bits[2] == 8 and alloc.act_average == 4.0


def test_quantize_model_mixed_weights_uses_the_allocated_bits_and_restores():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rep = vq.quantize_model(net, config=QuantConfig(mixed_precision="weights", mixed_min_bits=2))
    bits = [r.weight_bits for r in rep.layers]
    params = [layer.weight.numel() for _, layer in quantizable_layers(net)]
    assert sum(p * b for p, b in zip(params, bits)) == 4 * sum(params)
    assert len(set(bits)) > 1
    for (_, layer), b in zip(quantizable_layers(net), bits):
        distinct = max(len(row.unique()) for row in layer.weight.detach().reshape(layer.weight.shape[0], -1))
        assert distinct <= 2 ** b
    assert [r.act_bits for r in rep.layers] == [None, 4, 4, 8]  # inputs uniform under "weights"
    vq.restore_model(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_quantize_model_mixed_all_moves_input_bits_and_reports_the_averages():
    net = _net()
    rep = vq.quantize_model(net, config=QuantConfig(mixed_precision="all", mixed_min_bits=2))
    acts = [r.act_bits for r in rep.layers]
    assert acts[0] is None and acts[3] == 8
    assert acts[1] + acts[2] == 8  # equal element counts: the two free inputs average exactly 4
    params = [layer.weight.numel() for _, layer in quantizable_layers(net)]
    average = sum(p * r.weight_bits for p, r in zip(params, rep.layers)) / sum(params)
    elements = 2 * 16 * 224 * 224  # the two free inputs at the default probe's 224 x 224
    assert rep.bit_budget == {"weight_average": average, "params": 2240, "act_average": 4.0, "act_elements": elements}
    assert vq.quantization_report(net).to_dict()["bit_budget"] == rep.bit_budget
    assert (f"mixed precision: weight bits average {average:.4f} over 2,240 parameters; input bits 4.0000 over "
            f"{elements:,} elements per image") in rep.table()
    vq.restore_model(net)
    uniform = vq.quantize_model(net)
    assert uniform.bit_budget is None and "mixed precision" not in uniform.table()
    vq.restore_model(net)


def test_output_gains_inside_inference_mode():
    # Lightning's test loop runs under torch.inference_mode(); the probe may be an inference tensor
    net = _net()
    layers = quantizable_layers(net)
    probe = torch.rand(4, 3, 8, 8)
    expected = output_gains(net, layers, probe)
    with torch.inference_mode():
        got = output_gains(net, layers, probe.clone())
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(p.grad is None for p in net.parameters())


def test_config_checks():
    assert QuantConfig().mixed_precision is None  # the default stays uniform
    with pytest.raises(ValueError, match="mixed_precision"):
        QuantConfig(mixed_precision="layers")
    with pytest.raises(ValueError, match="mixed_precision='all'.*act_range='sigma'"):
        QuantConfig(mixed_precision="all", act_range="sigma")
    with pytest.raises(ValueError, match="mixed_min_bits"):
        QuantConfig(mixed_precision="weights", mixed_min_bits=1)


def test_mixed_at_eight_bits_is_uniform_eight():
    # the budget at the top candidate width leaves no choice: exactly the uniform run
    net = _net()
    rep = vq.quantize_model(net, config=QuantConfig(weight_bits=8, act_bits=8, mixed_precision="weights"))
    assert [r.weight_bits for r in rep.layers] == [8, 8, 8, 8]
    mixed = {k: v.clone() for k, v in net.state_dict().items()}
    vq.restore_model(net)
    vq.quantize_model(net, config=QuantConfig(weight_bits=8, act_bits=8))
    assert all(torch.equal(v, mixed[k]) for k, v in net.state_dict().items())
    vq.restore_model(net)


def test_bits_are_allocated_for_the_transformed_model(monkeypatch):
    # equalize changes the weights and BatchNorm after the plan: the bits are chosen once, for
    # the model that is quantized, from the rules' input bits
    from vquant_pl.methods.equalize import equalize

    net, ref = _net(), _net()
    with torch.no_grad():
        equalize(ref, 0.5, 4.0)
    seen = []
    real = bit_budget.allocate

    def spy(model, layers, stats, weight_bits, act_bits, *a, **k):
        seen.append(([layer.weight.detach().clone() for _, layer in layers], list(act_bits)))
        return real(model, layers, stats, weight_bits, act_bits, *a, **k)

    monkeypatch.setattr(bit_budget, "allocate", spy)
    rep = vq.quantize_model(net, config=QuantConfig(mixed_precision="all", mixed_min_bits=2, equalize=True))
    vq.restore_model(net)
    assert len(seen) == 1
    weights, act_bits = seen[0]
    assert all(torch.allclose(w, layer.weight) for w, (_, layer) in zip(weights, quantizable_layers(ref)))
    assert act_bits == [None, 4, 4, 8]
    assert rep.bit_budget["act_average"] == 4.0


def test_tied_weights_share_their_bits_and_count_once():
    torch.manual_seed(0)
    fc = nn.Linear(32, 32)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), fc, nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    net[4].weight = fc.weight  # tied: one tensor, two layers
    rep = vq.quantize_model(net, config=QuantConfig(mixed_precision="weights", mixed_min_bits=2,
                                                    probe_shape=(8, 16)))
    bits = [r.weight_bits for r in rep.layers]
    assert bits[1] == bits[2]  # the report tells the bits the shared tensor got
    params = [16 * 32, 32 * 32, 32 * 10]  # the tied tensor once
    assert rep.bit_budget["params"] == sum(params)
    average = sum(p * b for p, b in zip(params, [bits[0], bits[1], bits[3]])) / sum(params)
    assert rep.bit_budget["weight_average"] == average
    vq.restore_model(net)



def test_a_tied_weight_costs_the_noise_of_every_layer_using_it(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    net[4].weight = net[2].weight
    rows = []
    real = bit_budget.greedy_bits
    monkeypatch.setattr(bit_budget, "greedy_bits", lambda nsr, *a, **k: (rows.append(nsr), real(nsr, *a, **k))[1])
    layers = quantizable_layers(net)
    bit_budget.allocate(net, layers, {}, 4, [None, 4, 4, 8], None, None, torch.zeros(1, 16), min_bits=2)
    own = [weight_nsr(layer, None) for _, layer in layers]
    assert torch.equal(rows[0], torch.stack([own[0], own[1] + own[2], own[3]]))


def test_element_counts_follow_a_given_probe():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    rep = vq.quantize_model(net, probe=torch.rand(4, 3, 8, 8), config=QuantConfig(mixed_precision="all"))
    assert rep.bit_budget["act_elements"] == 8 * 6 * 6 and rep.bit_budget["act_average"] == 4  # not at 224 x 224
    vq.restore_model(net)
    two = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with pytest.raises(ValueError, match="no layer input can take part"):  # the first input float, the last 8 bits
        vq.quantize_model(two.eval(), probe=torch.rand(4, 3, 8, 8), config=QuantConfig(mixed_precision="all"))


def test_weight_clip_under_mixed_precision_clips_each_layer_for_its_own_bits(monkeypatch):
    from vquant_pl.methods import weight_clip

    asked = []
    real = weight_clip.clip_ratios
    monkeypatch.setattr(weight_clip, "clip_ratios", lambda w, bits, *a: (asked.append(bits), real(w, bits, *a))[1])
    net = _net()
    rep = vq.quantize_model(net, config=QuantConfig(mixed_precision="weights", mixed_min_bits=2, weight_clip=True))
    bits = [r.weight_bits for r in rep.layers]
    assert asked == bits and len(set(bits)) > 1
    vq.restore_model(net)


# -- the second review's edges ---------------------------------------------------------
def _five(small_head: bool = False):
    torch.manual_seed(0)
    chans = [3, 16, 32, 32, 64, 64]
    body = []
    for i, o in zip(chans, chans[1:]):
        body += [nn.Conv2d(i, o, 3 if o != 64 or i != 64 else 1, padding=1 if o != 64 or i != 64 else 0),
                 nn.BatchNorm2d(o), nn.ReLU()]
    m = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.data.uniform_(0.2, 3)
            bn.bias.data.uniform_(-2, 2)
    if small_head:
        m[-1].weight.data *= 1e-6  # small logits, e.g. a temperature-scaled head
    return m


def test_statistics_follow_the_device_of_the_model():
    """On CUDA the BatchNorm draws (CPU noise + CUDA statistics) and the zero/one moments of a
    layer without statistics (CPU) crashed; meta stands in for the other device here."""
    from vquant_pl.methods.bn_graph import ChannelStats
    from vquant_pl.methods.bn_mse import sample_stats

    cpu = sample_stats(ChannelStats(torch.zeros(3), torch.ones(3)), 5, 0)
    meta = sample_stats(ChannelStats(torch.zeros(3, device="meta"), torch.ones(3, device="meta")), 5, 0)
    assert meta.device.type == "meta" and meta.shape == cpu.shape
    layer = nn.Conv2d(3, 8, 3, device="meta")
    mean, var = bit_budget._input_moments(layer, None)
    assert mean.device.type == var.device.type == "meta"
    assert bit_budget._signal(layer.weight, layer, mean, var).device.type == "meta"


def test_half_precision_gains_are_measured_in_float32():
    """fp16 gains underflowed to 0 with a small head, and the input bits differed from fp32's."""
    bits = {}
    for dtype in (torch.float32, torch.float16):
        report = vq.quantize_model(_five(small_head=True).to(dtype), 4, 4, mixed_precision="all",
                                   probe_shape=(32, 3, 16, 16))
        bits[dtype] = [r.act_bits for r in report.layers]
    assert bits[torch.float16] == bits[torch.float32]
    model = _five(small_head=True).half()
    layers = quantizable_layers(model)
    gains = output_gains(model, layers[1:5], torch.rand(8, 3, 16, 16).half())
    assert all(bool((g > 0).all()) and g.dtype == torch.float32 for g in gains.values())


def test_a_linear_after_flatten_is_left_out_of_the_input_budget():
    """BatchNorm channels (8) that are not the Linear's inputs (288) crashed the cost."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    report = vq.quantize_model(net, 4, 4, mixed_precision="all", probe_shape=(4, 3, 8, 8))
    assert report.layers[2].act_bits == 4 and report.bit_budget["act_elements"] == 8 * 6 * 6


def test_all_without_any_batchnorm_fed_input_is_refused():
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="no layer input can take part in the input budget"):
        vq.quantize_model(net, 4, 4, mixed_precision="all", probe_shape=(8, 16))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and not vq.is_quantized(net)


class _KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _five()

    def forward(self, x):
        for i, m in enumerate(self.net):
            x = m(input=x) if i == 3 else m(x)  # the second conv called by keyword
        return x


def test_a_layer_called_by_keyword_and_a_fixed_size_model():
    """A keyword-called layer gave an IndexError; under 'weights' a model built for 16x16 failed
    in a 224x224 forward that only 'all' needs."""
    with pytest.warns(UserWarning, match="mixed precision, weights: exact_fill found no moves") as caught:
        report = vq.quantize_model(_KeywordCall().eval(), 4, 4, mixed_precision="all", probe_shape=(8, 3, 16, 16))
    assert caught[0].filename == __file__  # the warning points at the caller, not into torch
    assert report.layers[1].name == "net.3" and report.layers[1].act_bits is None  # input float, and said so
    assert "input float" in report.layers[1].note and report.bit_budget["act_average"] == 4
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10)).eval()
    with pytest.warns(UserWarning, match="exact_fill found no moves"):  # two layers: 216 and 20480 parameters
        assert vq.quantize_model(fixed, 4, None, mixed_precision="weights").num_layers == 2  # no 224 x 224 forward
    vq.restore_model(fixed)
    with pytest.raises(ValueError, match=r"pass probe_shape= the input shape the model takes"):
        vq.quantize_model(fixed, 4, 4, mixed_precision="all")


def test_each_modules_train_flag_is_kept():
    for mixed in ("weights", "all"):
        net = _five().train()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # frozen BatchNorm inside a training model
        before = [m.training for m in net.modules()]
        vq.quantize_model(net, 4, 4, mixed_precision=mixed, probe_shape=(8, 3, 16, 16))
        assert [m.training for m in net.modules()] == before, mixed


def test_the_report_names_the_probe_the_allocation_used():
    report = vq.quantize_model(_five(), 4, 4, mixed_precision="all", probe_seed=2, probe_shape=(64, 3, 16, 16))
    assert report.probe == {"seed": 2, "shape": [32, 3, 16, 16]} and report.to_dict()["probe"] == report.probe
