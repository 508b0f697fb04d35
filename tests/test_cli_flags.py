"""One table of pretraining flags: it builds the argparse options and make_config's explicit layer."""

from __future__ import annotations

import pytest
import yaml

from medssl.api import PRETRAIN_FLAGS, flags_layer, make_config
from medssl.cli import build_parser
from medssl.config import PRECISIONS
from medssl.errors import ConfigError


def _pretrain_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["pretrain"]


def _parse(*argv: str) -> dict:
    ns = _pretrain_parser().parse_args(["--out", "x", *argv])
    return {f.name: getattr(ns, f.name) for f in PRETRAIN_FLAGS}


def test_every_flag_is_an_option_with_its_help():
    pre = _pretrain_parser()
    options = {s: a for a in pre._actions for s in a.option_strings}
    for f in PRETRAIN_FLAGS:
        action = options[f.option]
        assert action.dest == f.name and action.default is None and f.help and f.help in action.help
    assert {"--no-cache", "--skip-bad", "--image-size", "--max-steps"} <= set(options)


def test_cli_values_land_on_their_config_keys():
    flags = _parse("--image-size", "32", "--batch-size", "8", "--epochs", "3", "--lr", "0.1", "--seed", "7",
                   "--devices", "1", "--precision", "bf16-mixed", "--no-cache", "--skip-bad", "--backbone",
                   "resnet10t", "--splits", "s.csv")
    cfg = make_config(method="mocov2", data="phantom2d", **flags)
    assert (cfg.data.image_size, cfg.train.batch_size, cfg.train.epochs, cfg.train.max_steps) == (32, 8, 3, None)
    assert (cfg.optim.lr, cfg.train.seed, cfg.train.devices, cfg.train.precision) == (0.1, 7, 1, "bf16-mixed")
    assert (cfg.data.cache, cfg.data.skip_bad, cfg.model.backbone, cfg.data.splits) == (False, True, "resnet10t",
                                                                                          "s.csv")
    # nothing given: the defaults stay (switches are None, not False)
    assert all(v is None for v in _parse().values())
    assert make_config(method="mocov2", **_parse()).to_dict() == make_config(method="mocov2").to_dict()


def test_epochs_clears_a_recipe_max_steps_and_excludes_max_steps(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": "mocov2"}, "train": {"max_steps": 50}}))
    assert make_config(config=recipe).train.max_steps == 50
    cfg = make_config(config=recipe, epochs=4)
    assert (cfg.train.epochs, cfg.train.max_steps) == (4, None)
    with pytest.raises(ConfigError, match="give either --epochs or --max-steps, not both"):
        make_config(method="mocov2", epochs=1, max_steps=2)
    with pytest.raises(SystemExit):
        _pretrain_parser().parse_args(["--out", "x", "--epochs", "1", "--max-steps", "2"])
    with pytest.raises(ConfigError, match="unknown option"):
        flags_layer({"learning_rate": 1.0})


def test_choices_come_from_the_constants():
    pre = _pretrain_parser()
    precision = next(a for a in pre._actions if "--precision" in a.option_strings)
    assert tuple(precision.choices) == PRECISIONS
    for value in PRECISIONS:
        assert _parse("--precision", value)["precision"] == value
    with pytest.raises(SystemExit):
        _parse("--precision", "fp8")


def test_the_cli_hands_every_flag_to_pretrain(monkeypatch, tmp_path):
    import medssl.api
    from medssl.cli import main

    seen = {}

    def fake_pretrain(method, data, out, **kwargs):
        seen.update(kwargs, method=method, data=data)
        return tmp_path

    monkeypatch.setattr(medssl.api, "pretrain", fake_pretrain)
    assert main(["pretrain", "--method", "mocov2", "--out", str(tmp_path), "--lr", "0.5", "--no-cache"]) == 0
    assert {f.name for f in PRETRAIN_FLAGS} <= set(seen)
    assert (seen["lr"], seen["cache"], seen["skip_bad"], seen["method"]) == (0.5, False, None, "mocov2")
    assert len({f.name for f in PRETRAIN_FLAGS}) == len({f.option for f in PRETRAIN_FLAGS}) == len(PRETRAIN_FLAGS)
