"""Evaluations save their test predictions; the metrics recomputed from the files with scikit-learn match the rows,
and the HTML report draws ROC / PR curves from them (one per encoder and label fraction)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medssl.api import evaluate
from medssl.eval.protocol import predictions_path
from medssl.report.html import _first_seed_only, build_report
from tests.test_compare import _run


def test_predictions_files_reproduce_the_reported_auc(tmp_path):
    run = _run(tmp_path / "run", 1)
    res = evaluate("phantom2d:80", tmp_path / "ev", run=run, init="random", protocol="linear",
                   label_fractions=[0.5, 1.0], seeds=[0, 1], device="cpu", progress=False)
    assert len(res["rows"]) == 2 * 2 * 2
    for row in res["rows"]:
        path = predictions_path(tmp_path / "ev" / "predictions", row["encoder"], row["label_fraction"], row["seed"])
        with np.load(path) as z:
            y, scores = z["y_true"], z["scores"]
            assert str(z["encoder"]) == row["encoder"] and float(z["label_fraction"]) == row["label_fraction"]
            assert int(z["seed"]) == row["seed"] and str(z["protocol"]) == "linear"
        assert scores.shape == (len(y), 4) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-5)
        present = np.unique(y)
        onehot = (y[:, None] == present[None, :]).astype(int)
        ref = roc_auc_score(onehot, scores[:, present], average="macro")
        assert row["metrics"]["auc_macro"] == pytest.approx(ref, abs=1e-5)


def test_report_draws_one_roc_pr_figure_per_encoder_and_fraction(tmp_path):
    run = _run(tmp_path / "run", 2)
    evaluate("phantom2d:80", run / "eval", run=run, protocol="knn", label_fractions=[0.5, 1.0], seeds=[0, 1, 2],
             device="cpu", progress=False)
    files = sorted((run / "eval" / "predictions").glob("*.npz"))
    assert len(files) == 6
    assert [f.name for f in _first_seed_only(files)] == [f.name for f in files if f.stem.endswith("_seed0")]
    html = build_report([run]).read_text()
    roc = html[html.index("ROC / PR curves"):]
    assert roc.count("data:image/png;base64") == 2
    assert json.loads((run / "eval" / "results.json").read_text())["rows"]
