"""``medssl compare``: every run and baseline × protocol in one table, equal to separate evaluations."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from medssl.api import evaluate
from medssl.cli import main
from medssl.compare import compare, run_labels
from medssl.encoders import random_encoder
from medssl.export import save_encoder

EVAL = dict(label_fractions=[0.5, 1.0], seeds=[0, 1], device="cpu", progress=False)


def _run(root, seed):
    """A run directory as pretraining leaves it (config + encoder), with distinct weights per seed."""
    root.mkdir(parents=True)
    enc = random_encoder("resnet18", in_chans=1, image_size=16, seed=seed)
    save_encoder(enc.backbone, root / "encoder.safetensors",
                 {"model_name": "resnet18", "in_chans": 1, "image_size": 16, "stem": "default", "spatial_dims": 2})
    cfg = {"method": {"name": "mocov2"}, "model": {"backbone": "resnet18", "stem": "default"},
           "data": {"spec": "phantom2d", "image_size": 16}}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_run_labels_distinguish_runs_with_one_name(tmp_path):
    assert run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == ["a/run", "b/run", "c"]


def test_compare_table_equals_separate_evaluations(tmp_path):
    a, b = _run(tmp_path / "x" / "run", 1), _run(tmp_path / "y" / "run", 2)
    res = compare([a, b], "phantom2d:80", tmp_path / "cmp", inits=["random"], protocols=["knn", "linear"], **EVAL)
    encs = {"x/run", "y/run", "random-init"}
    assert {(s["encoder"], s["protocol"]) for s in res["summary"]} == {(e, p) for e in encs for p in ("knn", "linear")}
    assert len(res["summary"]) == 3 * 2 * 2
    # reference: evaluating run b alone with knn gives the same per-seed metrics
    ref = evaluate("phantom2d:80", tmp_path / "ref", run=b, protocol="knn", **EVAL)
    got = [r for r in res["rows"] if r["encoder"] == "y/run" and r["protocol"] == "knn"]
    assert [r["metrics"] for r in got] == [r["metrics"] for r in ref["rows"]]
    # summary.csv carries the summary of results.json; results.csv (long form) is written too
    assert (tmp_path / "cmp" / "results.csv").is_file()
    payload = json.loads((tmp_path / "cmp" / "results.json").read_text())
    with open(tmp_path / "cmp" / "summary.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(payload["summary"])
    for line, s in zip(lines, payload["summary"], strict=True):
        assert line["encoder"] == s["encoder"] and float(line["label_fraction"]) == s["label_fraction"]
        assert float(line["auc_macro_mean"]) == pytest.approx(s["metrics"]["auc_macro"]["mean"], rel=1e-5)
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "| x/run | knn | 50 % |" in md and "| random-init | linear | 100 % |" in md


def test_cli_compare_prints_the_table(tmp_path, capsys):
    a = _run(tmp_path / "moco", 1)
    assert main(["compare", str(a), "--init", "random", "--data", "phantom2d:60", "--protocol", "knn",
                 "--label-fractions", "1", "--seeds", "0", "--device", "cpu", "--quiet", "--out",
                 str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| moco | knn | 100 % |" in out and "| random-init | knn | 100 % |" in out
    # --epochs goes to the protocols that train, not to the feature probes beside them
    assert main(["compare", str(a), "--data", "phantom2d:60", "--protocol", "knn", "finetune", "--epochs", "1",
                 "--label-fractions", "1", "--seeds", "0", "--device", "cpu", "--quiet", "--out",
                 str(tmp_path / "cmp2")]) == 0
    out = capsys.readouterr().out
    assert "| moco | knn | 100 % |" in out and "| moco | finetune | 100 % |" in out
    assert main(["compare", "--data", "phantom2d:60", "--out", str(tmp_path / "none")]) == 2
