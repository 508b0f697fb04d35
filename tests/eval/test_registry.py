"""The protocol registry: facts on the entries, and evaluate / compare / the CLI asking the registry, not names."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.api import evaluate
from medssl.cli import build_parser
from medssl.data.phantoms import MARGIN_NAMES
from medssl.errors import ConfigError
from medssl.eval.protocol import SUBSET_DETERMINED, FeatureSet, ProtocolOutput, check_options, run_protocol
from medssl.eval.registry import PROTOCOLS, protocol_entry, protocol_names, register_protocol

EVAL = dict(init="random", image_size=16, label_fractions=[1.0], seeds=[0], device="cpu", progress=False)


@pytest.fixture
def temporary():
    """Names registered by a test, removed afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        PROTOCOLS.pop(n, None)


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def _option(parser, flag: str):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_builtin_facts():
    # what the entry points relied on by name before: image protocols train, collapse and segment need no labels,
    # linear / knn / collapse are subset-determined
    facts = {e.name: (e.inputs, e.needs_labels, e.deterministic, e.trains) for e in PROTOCOLS.entries()}
    assert facts == {"linear": ("features", True, True, False), "knn": ("features", True, True, False),
                     "collapse": ("features", False, True, False), "finetune": ("images", True, False, True),
                     "segment": ("images", False, False, True)}
    assert set(SUBSET_DETERMINED) == {"linear", "knn", "collapse"}
    assert protocol_entry("collapse").whole_dataset is not None
    assert all(e.help for e in PROTOCOLS.entries())


def test_replacing_a_callable_keeps_the_facts_and_bad_registrations_fail(temporary):
    entry = protocol_entry("knn")
    PROTOCOLS["knn"] = lambda *a, **k: None
    try:
        assert protocol_entry("knn").deterministic and protocol_entry("knn").forwards_to is entry.forwards_to
    finally:
        PROTOCOLS["knn"] = entry.fn
    assert protocol_entry("knn") == entry
    with pytest.raises(ConfigError, match="unknown evaluation protocol 'nope'; available: .*linear"):
        protocol_entry("nope")
    with pytest.raises(ConfigError, match="inputs must be one of"):
        register_protocol("_bad", inputs="pixels")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="already registered"):
        register_protocol("linear")(entry.fn)


def test_options_are_checked_against_the_forwarded_function():
    check_options("linear", {"c_grid": (1.0,), "n_boot": 0})
    check_options("knn", {"k": 3, "temperature": 0.1})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['k'\] for evaluation protocol 'linear'"):
        check_options("linear", {"k": 3})
    with pytest.raises(ConfigError, match="unknown option"):
        check_options("finetune", {"c_grid": (1.0,)})


def test_a_new_protocol_reaches_evaluate_and_the_cli_through_its_facts(tmp_path, temporary):
    seen: dict[str, object] = {}

    @register_protocol("_test_images", inputs="images", needs_labels=True, deterministic=False, trains=True,
                       help="test protocol on images")
    def on_images(data, train_subset, seed, *, val_subset=None, epochs=20):
        seen["images"] = (type(data).__name__, epochs)
        return ProtocolOutput({"dice": 0.5}, [], {"epochs": epochs})

    @register_protocol("_test_features", inputs="features", needs_labels=True, deterministic=True,
                       help="test protocol on features")
    def on_features(data, train_subset, seed, *, val_subset=None):
        seen["features"] = (type(data).__name__, list(data.class_names))
        return ProtocolOutput({"dice": 0.25}, [], {})

    temporary += ["_test_images", "_test_features"]
    res = evaluate("phantom2d:60", tmp_path / "a", protocol="_test_images", epochs=3, **EVAL)
    assert seen["images"] == ("ImageTask", 3) and res["rows"][0]["metrics"] == {"dice": 0.5}
    evaluate("phantom2d:60", tmp_path / "b", protocol="_test_features", **EVAL)
    assert seen["features"] == ("FeatureSet", MARGIN_NAMES)  # the class names reach the FeatureSet
    with pytest.raises(ConfigError, match="--epochs applies to --protocol finetune / segment / _test_images, not "
                                          "_test_features"):
        evaluate("phantom2d:60", tmp_path / "c", protocol="_test_features", epochs=3, **EVAL)
    ev = _subparser("evaluate")
    assert list(_option(ev, "--protocol").choices) == protocol_names()
    assert "_test_images" in _option(ev, "--protocol").choices
    assert "test protocol on images" in _option(ev, "--protocol").help
    assert "_test_features" in _option(_subparser("compare"), "--protocol").choices


def test_a_whole_dataset_protocol_is_handed_every_image(tmp_path, temporary):
    calls = []

    def whole(encoders, dataset, out_dir, *, batch_size, device, meta, progress):
        calls.append((len(dataset), [n for n, _ in encoders], meta["data"]))
        return {"rows": [], "summary": [], "table": ""}

    register_protocol("_test_whole", needs_labels=False, whole_dataset=whole)(lambda *a, **k: None)
    temporary.append("_test_whole")
    evaluate("phantom2d:24", tmp_path / "w", protocol="_test_whole", **EVAL)
    assert calls == [(24, ["random-init"], "phantom2d:24")]


def test_evaluate_linear_rows_name_the_classes(tmp_path):
    res = evaluate("phantom2d:80", tmp_path / "e", protocol="linear", **EVAL)
    assert set(res["rows"][0]["per_class"]["auc"]) == set(MARGIN_NAMES)


def test_deterministic_fact_drives_reuse(temporary):
    calls = []

    def constant(data, train_subset, seed, *, val_subset=None):
        calls.append(seed)
        return ProtocolOutput({"dice": 1.0}, [], {})

    register_protocol("_test_det", deterministic=True)(constant)
    temporary.append("_test_det")
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = np.repeat([0, 1], 10)
    fs = FeatureSet(train_x=x, train_y=y, test_x=x, test_y=y)
    rows = run_protocol(fs, "_test_det", [1.0], [0, 1, 2])
    assert calls == [0] and all("reused" in r["notes"][-1] for r in rows[1:])
