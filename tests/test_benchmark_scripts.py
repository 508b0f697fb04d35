"""The benchmark scripts run and print the fields docs/benchmarks.md relies on (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_json_fields():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--steps", "1", "--warmup", "0",
         "--batch-size", "4", "--image-size", "32", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "floor_images_per_s", "overhead_ratio", "peak_memory_mb"):
        assert res[key] > 0


@pytest.mark.slow
def test_dataloading_json_fields():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dataloading.py"), "--n", "4", "--size", "64", "--image-size", "32",
         "--volume", "16x16x8", "--volume-size", "8", "--workers", "0", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    formats = {r["format"] for r in res["rows"]}
    assert {"PNG 8-bit", "DICOM 16-bit", "DICOM JPEG 2000"} <= formats
    for r in res["rows"]:
        assert r["nocache_per_s"] > 0 and r["cached_per_s"] > 0 and r["items"] > 0
