"""`medssl inspect` and `medssl pretrain --skip-bad` through the CLI entry point."""

from __future__ import annotations

import csv
from pathlib import Path

from medssl.cli import main
from tests.data.test_isic import make_isic_tree
from tests.data.test_manifest import readers, write_png_manifest  # noqa: F401  (readers is a fixture)


def test_inspect_a_clean_manifest(tmp_path: Path, readers, capsys) -> None:  # noqa: F811
    csv_path = write_png_manifest(tmp_path, n=6)
    assert main(["inspect", "--data", f"csv:{csv_path}", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "items: 6  patients: 3" in out and "labels all: benign: 3, malignant: 3" in out
    assert "shapes (original): (1, 20, 30) x6" in out and "bit depths: 8 x6" in out
    assert "intensity range" in out and "all files readable" in out


def test_inspect_names_every_bad_file_and_exits_1(tmp_path: Path, readers, capsys) -> None:  # noqa: F811
    csv_path = write_png_manifest(tmp_path, n=4, broken=True)
    assert main(["inspect", "--data", f"csv:{csv_path}"]) == 1
    captured = capsys.readouterr()
    assert "unreadable or inconsistent files: 1" in captured.out and "broken.png" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_inspect_user_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["inspect", "--data", "nosuch:spec"]) == 2
    assert main(["inspect", "--data", f"csv:{tmp_path / 'missing.csv'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medssl: error:") and "missing.csv" in err and "Traceback" not in err


def test_inspect_in_memory_datasets_and_isic(tmp_path: Path, readers, capsys) -> None:  # noqa: F811
    assert main(["inspect", "--data", "phantom3d:6", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "items: 6" in out and "(1, 16, 16, 16) x6" in out
    assert main(["inspect", "--data", f"isic2017:{make_isic_tree(tmp_path / 'isic')}"]) == 0
    out = capsys.readouterr().out
    assert "items: 11" in out and "train 6" in out and "(3, 48, 64) x11" in out and "(1, 48, 64) x11" in out


def test_pretrain_skip_bad_writes_skipped_csv(tmp_path: Path, readers, capsys) -> None:  # noqa: F811
    csv_path = write_png_manifest(tmp_path, n=8, broken=True)
    run = tmp_path / "run"
    argv = ["pretrain", "--method", "mocov2", "--data", f"csv:{csv_path}", "--image-size", "32",
            "--batch-size", "2", "--max-steps", "1", "--out", str(run), "--quiet"]
    assert main([*argv, "--skip-bad"]) == 0
    with open(run / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["path"].endswith("broken.png") and rows[0]["reason"]
    assert "skip_bad: true" in (run / "config.yaml").read_text()
