"""`medssl evaluate --protocol finetune / segment --epochs 1` from the CLI on a tiny pretraining run."""

from __future__ import annotations

import csv
import json

import pytest

from medssl.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "run"
    assert main(["pretrain", "--method", "mocov2", "--data", "phantom2d:96", "--image-size", "32", "--batch-size", "16",
                 "--max-steps", "2", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "metric"), [("finetune", "auc_macro"), ("segment", "dice")])
def test_cli_image_protocols(tiny_run, tmp_path, protocol: str, metric: str) -> None:
    out = tmp_path / protocol
    assert main(["evaluate", "--run", str(tiny_run), "--data", "phantom2d:96", "--protocol", protocol,
                 "--label-fractions", "0.5", "--seeds", "0", "--epochs", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    row = res["rows"][0]
    assert row["protocol"] == protocol and row["params"]["epochs"] == 1 and row["params"]["epochs_run"] == 1
    assert metric in row["metrics"] and metric in row["ci"]
    with open(out / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert any(r["metric"] == metric and r["protocol"] == protocol for r in lines)
    assert "[" in (out / "results.md").read_text()  # one seed: the CI is shown


def test_epochs_needs_an_image_protocol(tmp_path, capsys) -> None:
    code = main(["evaluate", "--init", "random", "--data", "phantom2d:64", "--image-size", "32", "--protocol", "linear",
                 "--epochs", "2", "--out", str(tmp_path / "x")])
    assert code != 0
    assert "--epochs applies to --protocol finetune / segment" in capsys.readouterr().err
