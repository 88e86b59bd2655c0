"""The Python API refuses a wrong type or an unknown choice as a config is made, naming the parameter
(`depthcut.pipeline.options.check_fields`), instead of a TypeError deep inside (`prune_to(drop="two")`
ended in `'<=' not supported between instances of 'int' and 'str'`)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from depthcut.errors import DepthcutError, OptionTypeError, OptionValueError
from depthcut.pipeline import configs
from depthcut.pipeline.options import _arms

CONFIGS = [configs.AnalyzeConfig, configs.PruneConfig, configs.ShrinkConfig, configs.HealConfig, configs.EvalConfig,
           configs.SweepConfig, configs.GenerateConfig, configs.ReportConfig]
WRONG = {int: "two", float: "x", str: 5, bool: "yes"}


def _required(config_class) -> dict:
    hints = typing.get_type_hints(config_class)
    return {f.name: (("x",) if typing.get_origin(hints[f.name]) is tuple else "x")
            for f in dataclasses.fields(config_class) if f.default is dataclasses.MISSING and f.init}


def _cases():
    for config_class in CONFIGS:
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            kinds = [arm for arm in _arms(hints[field.name]) if arm is not type(None)]
            if len(kinds) != 1:
                continue
            kind = kinds[0]
            wrong = 5 if typing.get_origin(kind) is tuple else WRONG.get(kind)
            if wrong is not None:
                yield pytest.param(config_class, field.name, wrong, id=f"{config_class.__name__}.{field.name}")


@pytest.mark.parametrize(("config_class", "name", "wrong"), list(_cases()))
def test_every_field_refuses_a_wrong_type_naming_it(config_class, name, wrong):
    base = _required(config_class)
    config_class(**base)  # the base itself is accepted
    with pytest.raises(OptionTypeError, match=rf"{config_class.__name__}: {name} expects .*got {wrong!r}"):
        config_class(**{**base, name: wrong})


def test_friendly_values_are_taken_as_the_field_holds_them():
    config = configs.ShrinkConfig(model=Path("/tmp/m"), out=Path("o"), drop=2, repairs="lstsq, cosine",
                                  validate=["c4", Path("w.txt")], margin=3)
    assert config.model == "/tmp/m" and config.out == "o" and config.repairs == ("lstsq", "cosine")
    assert config.validate == ("c4", "w.txt") and config.margin == 3.0 and isinstance(config.margin, float)


def test_choices_and_unknown_names_are_refused_as_the_config_is_made():
    with pytest.raises(OptionValueError, match="strategy must be one of angular, block-influence, deepest"):
        configs.PruneConfig(model="m", out="o", strategy="nosuch")
    with pytest.raises(OptionTypeError, match="PruneConfig: out expects a string, got None"):
        configs.PruneConfig(model="m", out=None)
    from depthcut.pipeline import prune_to, shrink_to

    with pytest.raises(OptionTypeError, match="has no setting 'dorp'; did you mean 'drop'"):
        prune_to(model="m", dorp=2, out="o")
    with pytest.raises(OptionTypeError, match="drop expects an integer or None, got 1.5"):
        shrink_to(model="m", drop=1.5, out="o")
    assert issubclass(OptionTypeError, TypeError) and issubclass(OptionValueError, ValueError)
    assert issubclass(OptionTypeError, DepthcutError)  # the CLI prints it as one line


def test_load_texts_names_what_it_expects():
    from depthcut.io.data import load_texts

    with pytest.raises(OptionTypeError, match=r"load_texts: data expects a path.*got 5 \(int\)"):
        load_texts(5)
