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

# the callback's documented differences from QuantConfig: None is the float baseline
CALLBACK_DEFAULTS = {"weight_bits": 4}


def test_quantize_model_takes_every_setting_with_the_same_default():
    params = inspect.signature(vq.quantize_model).parameters
    for f in dataclasses.fields(QuantConfig):
        assert f.name in params, f"quantize_model lacks the setting {f.name}"
        assert params[f.name].default == f.default, f.name


def test_callback_takes_every_setting_with_the_same_default_and_type():
    params = inspect.signature(vq.VQuantCallback.__init__).parameters
    hints = typing.get_type_hints(vq.VQuantCallback.__init__)
    config_hints = typing.get_type_hints(QuantConfig)
    for f in dataclasses.fields(QuantConfig):
        assert f.name in params, f"VQuantCallback lacks the setting {f.name}"
        assert params[f.name].default == CALLBACK_DEFAULTS.get(f.name, f.default), f.name
        if f.name not in ("weight_bits", "probe_shape"):
            assert hints[f.name] == config_hints[f.name], f.name
        assert f"        {f.name}: " in vq.VQuantCallback.__doc__, f"no Args help for {f.name}"


def test_every_callback_setting_reaches_the_run():
    changed = dict(weight_bits=6, act_bits=6, rounding="squant-k", act_range="aciq-laplace", sigma=9.0, bn_k=2.5,
                   aciq_stats="bn", bias_correction=True, bit_allocation=True, act_bit_allocation=True,
                   percentile=99.0, calib_batches=3, probe_seed=7, probe_shape=(2, 3, 8, 8), backend="torch",
                   bn_bias_correction="all", equalize=True, equalize_alpha=0.3, equalize_k=3.0, weight_clip=True)
    assert set(changed) == set(QuantConfig.field_names())
    cb = vq.VQuantCallback(**changed)
    assert cb.config == QuantConfig(**changed)


def test_act_range_table_has_one_entry_per_choice():
    assert tuple(METHODS) == typing.get_args(vq.config.ActRange)


def test_unknown_and_conflicting_settings():
    with pytest.raises(TypeError, match="unknown quantization setting"):
        QuantConfig.from_kwargs(act_bitz=4)
    with pytest.raises(TypeError, match="not both"):
        vq.quantize_model(nn.Linear(2, 2), act_bits=6, config=QuantConfig())
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


def test_cli_quant_group_has_every_setting_and_reaches_the_callback():
    import warnings

    from vquant_pl.cli.app import make_cli

    overrides = {"weight_bits": "6", "act_bits": "6", "rounding": "squant-c", "act_range": "bn", "sigma": "9.5",
                 "bn_k": "2.5", "aciq_stats": "bn", "bias_correction": "true", "bit_allocation": "true",
                 "act_bit_allocation": "true", "percentile": "99.5", "calib_batches": "3", "probe_seed": "7",
                 "probe_shape": "[2,3,8,8]", "backend": "torch", "bn_bias_correction": "all", "equalize": "true",
                 "equalize_alpha": "0.3", "equalize_k": "3.0", "weight_clip": "true"}
    assert set(overrides) == set(QuantConfig.field_names()), "a QuantConfig field has no CLI override here"
    args = ["--config", "quickstart/w8a8", "--model.pretrained", "false"]
    for name, value in overrides.items():
        args += [f"--quant.{name}", value]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = make_cli(args, run=False)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, vq.VQuantCallback))
    assert cb.config == QuantConfig(weight_bits=6, act_bits=6, rounding="squant-c", act_range="bn", sigma=9.5,
                                    bn_k=2.5, aciq_stats="bn", bias_correction=True, bit_allocation=True,
                                    act_bit_allocation=True, percentile=99.5, calib_batches=3, probe_seed=7,
                                    probe_shape=(2, 3, 8, 8), backend="torch", bn_bias_correction="all",
                                    equalize=True, equalize_alpha=0.3, equalize_k=3.0, weight_clip=True)
