"""benchmarks/cass_batch_size.py runs end to end at a tiny size and reports the fields the docs table uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cass_batch_size_json_fields(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cass_batch_size.py"), "--batch-sizes", "4,8", "--images", "8",
         "--data", "phantom2d:48", "--image-size", "32", "--cnn", "test_resnet", "--vit", "test_vit",
         "--protocol", "knn", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rows = res["rows"]
    pre = [(r["method"], r["encoder"], r["batch_size"], r["steps"]) for r in rows if r["method"] != "random-init"]
    assert pre == [("cass", "cass:cnn", 4, 2), ("cass", "cass:vit", 4, 2), ("cass", "cass:cnn", 8, 1),
                   ("cass", "cass:vit", 8, 1), ("mocov2", "mocov2", 4, 2), ("mocov2", "mocov2", 8, 1)]
    assert [r["encoder"] for r in rows if r["method"] == "random-init"] == ["test_resnet", "test_vit"]
    assert all(r["images"] in (0, 8) and 0.0 <= r["auc"] <= 1.0 for r in rows)
    assert (tmp_path / "cass_bs4" / "encoder_vit.safetensors").is_file()
    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cass_batch_size.py"), "--methods", "cass", "--batch-sizes", "4",
         "--images", "4", "--data", "phantom2d:48", "--image-size", "32", "--cnn", "test_resnet", "--vit", "test_vit",
         "--protocol", "knn", "--no-random"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    assert "| cass | cass:cnn | 4 | 1 |" in table and "| cass | cass:vit | 4 | 1 |" in table
