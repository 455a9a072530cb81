"""The shipped YAML configs run what their names say."""
import re

import pytest
import yaml

from helpers import REPO
from vquant_pl.cli.recipes import load_recipe, recipe_names

METHOD_CONFIGS = sorted((REPO / "configs" / "methods").glob("lite0_*.yaml"))


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_method_configs_range_activations_as_their_names_say(path):
    method, bits = re.fullmatch(r"lite0_(.+)_w(\d)a\d", path.stem).groups()
    quant = yaml.safe_load(path.read_text())["quant"]
    first = method.split("+")[0].replace("aciq-recipe-", "aciq-")
    expected = "bn" if first == "vquant" else re.sub(r"-bn$", "", first)
    assert quant.get("act_range", "bn") == expected, f"{path.name} runs act_range {quant.get('act_range', 'bn')!r}"
    assert quant["weight_bits"] == int(bits)
    if first != "vquant":  # the method alone: no bias correction from BatchNorm unless the name says so
        assert quant.get("bn_bias_correction", "weights") is None


@pytest.mark.parametrize("name", ["bn", "bn-eq", "bn-mse", "squant"])
def test_recipes_without_correction_in_their_name_pin_none(name):
    assert name in recipe_names()
    assert load_recipe(name).get("bn_bias_correction", "weights") is None
