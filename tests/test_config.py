"""QuantConfig is the one list of settings: quantize_model, the callback and the CLI follow it."""
import copy
import dataclasses
import inspect
import typing

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl.config import QuantConfig
from vquant_pl.methods.table import METHODS

from helpers import NON_DEFAULTS

# the callback's documented differences from QuantConfig: None is the float baseline
CALLBACK_DEFAULTS = {"weight_bits": 4}


def test_the_shared_non_default_values_cover_every_field():
    for settings in NON_DEFAULTS:
        assert list(settings) == QuantConfig.field_names(), "add the new QuantConfig field to tests/helpers NON_DEFAULT"
        QuantConfig(**settings)
    configs = [QuantConfig(**settings) for settings in NON_DEFAULTS]
    missing = [k for k in QuantConfig.field_names() if all(getattr(c, k) == getattr(QuantConfig(), k) for c in configs)]
    assert not missing, f"no config of tests/helpers NON_DEFAULTS sets {missing}"


def test_quantize_model_takes_every_setting_with_the_same_default_and_type():
    params = inspect.signature(vq.quantize_model).parameters
    hints = typing.get_type_hints(QuantConfig)
    for f in dataclasses.fields(QuantConfig):
        assert f.name in params, f"quantize_model lacks the setting {f.name}"
        assert params[f.name].default == f.default, f.name
        assert params[f.name].annotation == hints[f.name], f.name
    assert list(params)[:7] == ["model", "weight_bits", "act_bits", "rounding", "act_range", "sigma", "probe"]


def test_callback_takes_every_setting_in_order_with_the_same_default_type_and_help():
    params = list(inspect.signature(vq.VQuantCallback.__init__).parameters.values())[1:]
    hints = typing.get_type_hints(vq.VQuantCallback.__init__)
    config_hints = typing.get_type_hints(QuantConfig)
    names = QuantConfig.field_names()
    assert [p.name for p in params[:len(names)]] == names, "the callback's first arguments are QuantConfig's fields"
    for f, p in zip(dataclasses.fields(QuantConfig), params):
        assert p.default == CALLBACK_DEFAULTS.get(f.name, f.default), f.name
        if f.name not in ("weight_bits", "probe_shape"):
            assert hints[f.name] == config_hints[f.name], f.name
        assert f"        {f.name}: " in vq.VQuantCallback.__doc__, f"no Args help for {f.name}"
    assert "{settings}" not in vq.VQuantCallback.__doc__


@pytest.mark.parametrize("settings", NON_DEFAULTS, ids=lambda s: s["act_range"])
def test_every_setting_reaches_the_callbacks_run_and_quantize_model(settings):
    cb = vq.VQuantCallback(**settings)
    assert cb.config == QuantConfig(**settings)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    batches = [torch.rand(2, 3, 8, 8)] * 4 if METHODS[settings["act_range"]].calibrated else None
    report = vq.quantize_model(net, **settings, calibration=batches)
    assert report.config == QuantConfig(**settings)


def test_a_keyword_given_with_config_wins_even_when_it_equals_the_default():
    """Issue 18 item 7: `act_bits=4` beside `config=QuantConfig(act_bits=6)` was dropped (4 is the default)."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    report = vq.quantize_model(net, act_bits=4, config=QuantConfig(act_bits=6, weight_bits=8), probe_shape=(8, 4))
    assert report.config.act_bits == 4 and report.config.weight_bits == 8
    assert [r.act_bits for r in report.layers] == [None, 8]  # the last layer's input: 8 bits (rule 4)
    vq.restore_model(net)
    report = vq.quantize_model(net, 4, config=QuantConfig(weight_bits=6), probe_shape=(8, 4))
    assert report.config.weight_bits == 4


def test_act_range_table_has_one_entry_per_choice():
    assert tuple(METHODS) == typing.get_args(vq.config.ActRange)


def test_unknown_and_conflicting_settings():
    with pytest.raises(TypeError, match="unknown quantization setting"):
        QuantConfig.from_kwargs(act_bitz=4)
    with pytest.raises(TypeError, match="act_bitz"):
        vq.quantize_model(nn.Linear(2, 2), act_bitz=6)
    with pytest.raises(TypeError, match="config must be a vquant_pl.QuantConfig"):
        vq.quantize_model(nn.Linear(2, 2), config={"act_bits": 6})
    with pytest.raises(ValueError, match="percentile must be in"):
        QuantConfig(percentile=101)
    with pytest.raises(ValueError, match="probe_shape must be a batch shape"):
        QuantConfig(probe_shape=(0, 3))


def test_config_and_keywords_give_the_same_run():
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    b = copy.deepcopy(a)
    ra = vq.quantize_model(a, 6, 6, probe_shape=(8, 4), probe_seed=3)
    rb = vq.quantize_model(b, config=QuantConfig(weight_bits=6, act_bits=6, probe_shape=(8, 4), probe_seed=3))
    assert ra.config == rb.config and vq.activation_ranges(a) == vq.activation_ranges(b)
    x = torch.rand(3, 4)
    assert torch.equal(a(x), b(x))
    assert ra.to_dict()["config"]["sigma"] == 14.0  # resolved, not None


@pytest.mark.parametrize("settings", NON_DEFAULTS, ids=lambda s: s["act_range"])
def test_cli_quant_group_has_every_setting_and_reaches_the_callback(settings):
    import warnings

    from vquant_pl.cli.app import make_cli

    def cli_value(v):
        if v is None:
            return "null"
        return str(v).lower() if isinstance(v, bool) else f"[{','.join(map(str, v))}]" if isinstance(v, tuple) else str(v)

    overrides = {name: cli_value(v) for name, v in settings.items()}
    assert set(overrides) == set(QuantConfig.field_names()), "a QuantConfig field has no CLI override here"
    args = ["--config", "quickstart/w8a8", "--model.pretrained", "false"]
    for name, value in overrides.items():
        args += [f"--quant.{name}", value]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = make_cli(args, run=False)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, vq.VQuantCallback))
    assert cb.config == QuantConfig(**settings)


@pytest.mark.parametrize("settings, name", [
    (dict(act_range="sigma", bn_k=1.0), "bn_k"),
    (dict(act_range="bn-mse", bn_k=1.0), "bn_k"),
    (dict(act_range="aciq-laplace", bn_k=1.0), "bn_k"),
    (dict(act_bits=None, bn_k=1.0), "bn_k"),
    (dict(act_range="sigma", aciq_stats="bn"), "aciq_stats"),
    (dict(act_range="bn", aciq_stats="bn"), "aciq_stats"),
    (dict(act_range="bn", percentile=50.0), "percentile"),
    (dict(act_range="max", percentile=50.0), "percentile"),
    (dict(act_range="bn", calib_batches=1), "calib_batches"),
    (dict(act_range="aciq-gauss", sigma=3.0), "sigma"),
    (dict(act_range="none", sigma=3.0), "sigma"),
    (dict(equalize_alpha=0.0), "equalize_alpha"),
    (dict(equalize_k=1.0), "equalize_k"),
    (dict(mixed_min_bits=8), "mixed_min_bits"),
])
def test_a_setting_nothing_reads_is_refused(settings, name):
    """Each of these gave the very output of the defaults: accepted, then ignored."""
    with pytest.raises(ValueError, match=f"^{name}=.* would be ignored: only .* reads it"):
        QuantConfig(**settings)


def test_the_settings_read_are_accepted_and_range_checked():
    QuantConfig(act_range="bn", bn_k=2.0, sigma=3.0)
    QuantConfig(act_range="percentile", percentile=99.0, calib_batches=None)
    QuantConfig(act_range="aciq-gauss", aciq_stats="bn")
    QuantConfig(equalize=True, equalize_alpha=0.0, equalize_k=1.0)
    QuantConfig(mixed_precision="weights", mixed_min_bits=2)
    with pytest.raises(ValueError, match="mixed_min_bits must be an integer in 2..8, got 99"):
        QuantConfig(mixed_min_bits=99)  # checked even without mixed_precision


def test_without_equalize_and_without_activations_stay_consistent():
    config = QuantConfig(act_range="bn", bn_k=4.0, sigma=9.0, equalize=True, equalize_k=2.0, mixed_precision="all")
    assert config.without_equalize() == config.replace(equalize=False, equalize_k=4.0, equalize_alpha=0.5)
    weights = config.without_activations()
    assert weights.act_bits is None and weights.bn_k is None and weights.sigma is None
    assert weights.mixed_precision == "weights" and weights.equalize_k == 2.0


def test_mixed_precision_settings_that_cannot_hold():
    """mixed_min_bits above the average was lowered silently; ACIQ's approximate per-channel
    budget made the reported averages differ from the applied ones (3.9778 vs 3.9701)."""
    with pytest.raises(ValueError, match="mixed_min_bits=6 is above weight_bits=4"):
        QuantConfig(mixed_precision="weights", mixed_min_bits=6)
    with pytest.raises(ValueError, match="mixed_min_bits=4 is above act_bits=2"):
        QuantConfig(weight_bits=8, act_bits=2, mixed_precision="all", mixed_min_bits=4)
    QuantConfig(weight_bits=2, act_bits=2, mixed_precision="all")  # the default 3 gives way to the average
    with pytest.raises(ValueError, match="needs bit_allocation_rule='exact'"):
        QuantConfig(mixed_precision="weights", bit_allocation=True)
    QuantConfig(mixed_precision="weights", bit_allocation=True, bit_allocation_rule="exact")


def test_a_probe_beside_probe_seed_or_shape_is_refused_by_the_config():
    """The check the callback can run when it is built (it holds a probe beside a QuantConfig)."""
    probe = torch.rand(2, 4)
    for config in (QuantConfig(probe_seed=5), QuantConfig(probe_shape=(2, 4))):
        with pytest.raises(ValueError, match=r"probe= is given, so probe_(seed|shape)=.* would be ignored"):
            config.refuse_probe_beside(probe)
    with pytest.raises(ValueError, match=r"probe= is given, so probe_seed=0 would be ignored"):
        QuantConfig().refuse_probe_beside(vq.Probe(), given=["probe_seed"])  # named by the caller, at the default
    QuantConfig().refuse_probe_beside(probe)
    QuantConfig(probe_seed=5).refuse_probe_beside(None)
