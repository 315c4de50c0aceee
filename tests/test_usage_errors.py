"""Every usage error is one line, names its option, and is found before a model loads or a file is touched."""

from __future__ import annotations

import pytest

from astcli.errors import ParameterError
from astcli.model.config import ModelConfig, ast_config
from astcli.train.models import architecture


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("depth", 0, "must be positive (got 0)"),
    ("depth", "x", "must be a whole number (got 'x')"),
    ("depth", 2.5, "must be a whole number"),
    ("dim", -64, "must be positive"),
    ("std", 0.0, "must be positive"),
    ("mean", float("nan"), "must be a finite number"),
    ("multi_label", "yes", "must be true or false"),
    ("family", 3, "must be text"),
    ("patch_size", 256, "is larger than num_mel_bins 128"),
    ("prefix_tokens", -1, "must be 0 or more"),
])
def test_model_config_refuses_values_naming_the_field(field, value, problem):
    with pytest.raises(ParameterError) as caught:
        ast_config("tiny", **{field: value})
    assert caught.value.parameter == field and problem in caught.value.problem


def test_model_config_takes_whole_floats_as_floats():
    assert ModelConfig(mean=-4, std=5).std == 5.0 and isinstance(ModelConfig(mean=-4).mean, float)


@pytest.mark.parametrize(("options", "problem"), [
    ({"depth": 0}, "depth=0: must be positive (got 0)"),
    ({"bogus": 3}, "has unknown key 'bogus' (valid keys: family, dim, depth,"),
    ({"heads": 5}, "heads=5: 5 does not divide dim 192"),
])
def test_model_options_name_the_option(options, problem):
    with pytest.raises(ParameterError) as caught:
        architecture("ast", "tiny", ["a", "b"], None, options)
    assert caught.value.parameter == "model_options" and problem in caught.value.problem
