"""Config: recipes, --set overrides, type coercion and unknown-key errors."""

from __future__ import annotations

import pytest
import yaml

from medssl.api import make_config
from medssl.config import build_config, load_config, parse_set, save_config
from medssl.errors import ConfigError


def test_set_overrides_are_typed_and_nested():
    assert parse_set(["a.b=3", "a.c=0.5", "d=true", "e=[1, 2]", "f=resnet50"]) == {
        "a": {"b": 3, "c": 0.5}, "d": True, "e": [1, 2], "f": "resnet50"}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_bad_set_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        parse_set([bad])


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        build_config({"method": {"name": "mocov2"}, "train": {"batch_sise": 4}})
    with pytest.raises(ConfigError, match="did you mean 'queue_size'"):
        build_config({"method": {"name": "mocov2", "queue_sise": 4}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.batch_size"):
        build_config({"method": "mocov2", "train": {"batch_size": "many"}})


def test_layers_flags_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": "mocov2", "queue_size": 512}, "train": {"batch_size": 8}}))
    cfg = make_config(config=recipe, batch_size=16, overrides=["method.temperature=0.1", "views.crop_scale=[0.3, 1.0]"])
    assert cfg.method["queue_size"] == 512 and cfg.method["temperature"] == 0.1
    assert cfg.train.batch_size == 16
    assert cfg.views.crop_scale == (0.3, 1.0)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_unknown_method_lists_available():
    with pytest.raises(ConfigError, match="unknown method 'mocov4'.*mocov2"):
        make_config(method="mocov4")


def test_epochs_clears_max_steps():
    cfg = make_config(method="mocov2", overrides=["train.max_steps=5"], epochs=3)
    assert cfg.train.max_steps == 5  # --set comes last and wins
    cfg = make_config(method="mocov2", epochs=3)
    assert cfg.train.max_steps is None and cfg.train.epochs == 3


def test_field_checks_name_the_section_path():
    """A __post_init__ range check reports section.field, the allowed range and the value."""
    from dataclasses import dataclass

    from medssl.checks import check_choice, check_range
    from medssl.config import build_dataclass

    @dataclass
    class Section:
        n: int = 1
        p: float = 0.5
        mode: str = "a"

        def __post_init__(self) -> None:
            check_range("n", self.n, ge=1)
            check_range("p", self.p, ge=0, lt=1)
            check_choice("mode", self.mode, ("a", "b"))

    with pytest.raises(ConfigError, match=r"^train\.n must be >= 1, got -4$"):
        build_dataclass(Section, {"n": -4}, where="train")
    with pytest.raises(ConfigError, match=r"^train\.p must be in \[0, 1\), got 1\.0$"):
        build_dataclass(Section, {"p": 1.0}, where="train")
    with pytest.raises(ConfigError, match=r"train\.p must be a finite number .*nan"):
        build_dataclass(Section, {"p": float("nan")}, where="train")
    with pytest.raises(ConfigError, match=r"^train\.mode must be one of a, b, got 'c'$"):
        build_dataclass(Section, {"mode": "c"}, where="train")
    assert build_dataclass(Section, {"n": 3}, where="train").n == 3
