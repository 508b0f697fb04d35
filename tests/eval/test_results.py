"""summarize / write_results / format_table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medssl.errors import DataError
from medssl.eval.results import format_table, summarize, write_results


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for encoder in ("mocov2", "random-init"):
        for fraction in (0.01, 1.0):
            for seed in (0, 1, 2):
                rows.append(
                    {
                        "encoder": encoder,
                        "protocol": "linear",
                        "label_fraction": fraction,
                        "seed": seed,
                        "n_train": 10 if fraction == 0.01 else 1000,
                        "metrics": {
                            "auc_macro": float(rng.random()),
                            "ap_macro": float(rng.random()),
                            "accuracy": float(rng.random()),
                            "balanced_accuracy": float(rng.random()),
                            "f1_macro": float(rng.random()),
                        },
                        "notes": ["class 2 absent"] if fraction == 0.01 else [],
                        "params": {"C": 0.1},
                    }
                )
    # One undefined AUC: NaN-aware statistics.
    rows[0]["metrics"]["auc_macro"] = math.nan
    return rows


def test_summary_statistics_match_numpy() -> None:
    rows = _rows()
    summary = summarize(rows)
    assert len(summary) == 4
    for entry in summary:
        members = [
            r
            for r in rows
            if r["encoder"] == entry["encoder"] and r["label_fraction"] == entry["label_fraction"]
        ]
        assert entry["n_seeds"] == 3 and entry["seeds"] == [0, 1, 2]
        assert entry["n_train"] == members[0]["n_train"]
        for name, stat in entry["metrics"].items():
            values = np.array([r["metrics"][name] for r in members])
            values = values[~np.isnan(values)]
            assert stat["n"] == len(values)
            assert stat["mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert stat["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    first = summary[0]
    assert first["encoder"] == "mocov2" and first["label_fraction"] == 0.01
    assert first["metrics"]["auc_macro"]["n"] == 2


def test_single_seed_std_zero_and_all_nan() -> None:
    rows = [
        {
            "protocol": "knn",
            "label_fraction": 0.1,
            "seed": 0,
            "n_train": 5,
            "metrics": {"auc_macro": 0.7, "ap_macro": math.nan},
        },
    ]
    (entry,) = summarize(rows)
    assert "encoder" not in entry
    assert entry["metrics"]["auc_macro"] == {"mean": 0.7, "std": 0.0, "n": 1}
    assert math.isnan(entry["metrics"]["ap_macro"]["mean"]) and entry["metrics"]["ap_macro"]["n"] == 0
    table = format_table([entry])
    assert "0.700 ± 0.000" in table and "n/a" in table and "Encoder" not in table


def test_write_results_json_with_null_and_markdown(tmp_path: Path) -> None:
    rows = _rows()
    out = tmp_path / "eval" / "run1"
    write_results(rows, out, meta={"dataset": "phantom2d", "checkpoint": Path("/x/encoder.safetensors")})
    text = (out / "results.json").read_text()
    assert "NaN" not in text
    data = json.loads(text)  # strict JSON parse
    assert set(data) == {"meta", "rows", "summary"}
    assert data["rows"][0]["metrics"]["auc_macro"] is None
    assert len(data["rows"]) == len(rows) and len(data["summary"]) == 4
    assert data["meta"]["checkpoint"] == "/x/encoder.safetensors"
    md = (out / "results.md").read_text()
    assert "±" in md
    assert "| Encoder | Protocol | Labels | n_train | Seeds | AUC | AP | Acc. | Bal. acc. | F1 |" in md
    table_lines = [
        line for line in md.splitlines() if line.startswith("| mocov2") or line.startswith("| random")
    ]
    assert len(table_lines) == 4
    # Encoders side by side: per protocol and fraction the two encoders are adjacent.
    assert [line.split("|")[1].strip() for line in table_lines] == ["mocov2", "random-init"] * 2
    assert "(2/3)" in md  # AUC defined for 2 of 3 seeds
    assert "class 2 absent (×3 seeds)" in md
    mean_auc = data["summary"][0]["metrics"]["auc_macro"]["mean"]
    assert f"{mean_auc:.3f} ±" in md


def test_missing_keys_raise() -> None:
    with pytest.raises(DataError):
        summarize([{"protocol": "linear", "seed": 0, "metrics": {}}])


def test_results_csv_and_single_seed_ci(tmp_path) -> None:
    import csv

    from medssl.eval.results import write_results

    rows = [
        {"encoder": "a", "protocol": "linear", "label_fraction": 0.1, "seed": 0, "n_train": 10,
         "metrics": {"auc_macro": 0.8, "f1_macro": float("nan")},
         "ci": {"auc_macro": [0.7, 0.9], "f1_macro": [float("nan"), float("nan")]},
         "per_class": {"auc": {"x": 0.75, "y": 0.85}}},
    ]
    write_results(rows, tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [r["metric"] for r in lines] == ["auc_macro", "f1_macro", "auc[x]", "auc[y]"]
    assert lines[0]["encoder"] == "a" and float(lines[0]["value"]) == 0.8
    assert (float(lines[0]["ci_low"]), float(lines[0]["ci_high"])) == (0.7, 0.9)
    assert lines[1]["value"] == "" and lines[1]["ci_low"] == ""
    md = (tmp_path / "results.md").read_text()
    assert "0.800 [0.700, 0.900]" in md
    # Several seeds: mean ± std, no CI in the table.
    two = [rows[0], {**rows[0], "seed": 1, "metrics": {"auc_macro": 0.6}, "ci": {"auc_macro": [0.5, 0.7]}}]
    write_results(two, tmp_path)
    assert "0.700 ± 0.141" in (tmp_path / "results.md").read_text()
