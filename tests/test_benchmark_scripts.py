"""The benchmark scripts run and print the fields docs/benchmarks.md relies on (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


TINY = ["--steps", "1", "--warmup", "0", "--batch-size", "4", "--image-size", "16", "--threads", "1", "--json"]
TINY_MAE = ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--backbone", "vit_tiny_patch16_224"]


def _throughput(args: list[str], hide_lightly: bool = False) -> dict:
    """Run benchmarks/throughput.py in a fresh interpreter (optionally as if lightly were not installed)."""
    script = str(ROOT / "benchmarks" / "throughput.py")
    block = "sys.modules['lightly'] = None; " if hide_lightly else ""  # find_spec('lightly') is then None
    code = f"import runpy, sys; {block}sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_core(res: dict) -> None:
    for key in ("images_per_s", "floor_images_per_s", "overhead_ratio", "peak_memory_mb"):
        assert res[key] > 0
    # the ratio is the one the two throughputs imply (both come from the same medians)
    assert res["overhead_ratio"] == pytest.approx(res["floor_images_per_s"] / res["images_per_s"], rel=1e-9)
    assert res["images_per_s"] == pytest.approx(res["batch_size"] / res["step_s"]["medssl"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "mae"])
def test_throughput_json_without_lightly(method):
    res = _throughput(["--method", method, *TINY, *(TINY_MAE if method == "mae" else [])], hide_lightly=True)
    _check_core(res)
    assert res["lightly_installed"] is False
    assert "lightly_images_per_s" not in res and "ratio_vs_lightly" not in res
    assert "lightly_transform_ms_per_batch" not in res and res["medssl_views_ms_per_batch"] > 0
    assert res["model_overhead_ratio"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "mae"])
def test_throughput_json_side_by_side_with_lightly(method):
    pytest.importorskip("lightly")
    extra = [*TINY_MAE, "--mask0"] if method == "mae" else []
    res = _throughput(["--method", method, *TINY, *extra])
    _check_core(res)
    assert res["lightly_installed"] is True
    assert res["ratio_vs_lightly"] == pytest.approx(res["step_s"]["lightly"] / res["step_s"]["medssl_model"], rel=1e-9)
    assert res["lightly_images_per_s"] > 0 and res["lightly_transform_ms_per_batch"] > 0
    if method == "mae":
        assert res["mask_cost_ratio"] > 0 and res["lightly_mask_cost_ratio"] > 0


@pytest.mark.slow
def test_throughput_dino_against_floor_and_lightly():
    pytest.importorskip("lightly")
    res = _throughput(["--method", "dino", *TINY, "--image-size", "32"])
    _check_core(res)
    assert res["ratio_vs_lightly"] == pytest.approx(res["step_s"]["lightly"] / res["step_s"]["medssl_model"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["medmoco", "gravis", "cnnmim", "cass", "mocov3", "simmim"])
def test_throughput_json_other_methods_against_their_floor(method):
    res = _throughput(["--method", method, *TINY, "--image-size", "32"])
    _check_core(res)
    assert "ratio_vs_lightly" not in res


def test_throughput_markdown_table_lists_the_ratios():
    spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = {"method": "mocov2", "backbone": "resnet18", "image_size": 64, "batch_size": 64, "threads": 1,
           "images_per_s": 20.0, "floor_images_per_s": 21.0, "overhead_ratio": 1.05, "peak_memory_mb": 900.0,
           "ratio_vs_lightly": 1.1, "lightly_images_per_s": 18.2, "medssl_views_ms_per_batch": 12.5}
    lines = mod.markdown(res).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    cells = dict(zip(header, row, strict=True))
    assert cells["overhead"] == "1.050" and cells["medssl ÷ lightly"] == "1.100" and cells["lightly img/s"] == "18.2"
    assert "model overhead" not in cells  # absent fields make no column
    assert lines[-1] == "augmentation, ms per batch: medssl_views 12.5"


@pytest.mark.slow
def test_quality_tiny_budget_table():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--data", "phantom2d:64", "--methods", "mocov2",
         "--images-seen", "8", "--batch-size", "8", "--image-size", "16", "--seeds", "0", "1",
         "--fractions", "0.5", "1.0", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["images_seen"] == 8 and res["fractions"] == [0.5, 1.0]
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["mocov2", "random init (resnet18)", "random init (vit_tiny)"]
    moco = res["rows"][0]
    assert moco["steps"] == 1 and moco["pretrain_s"] > 0
    fractions = sorted(s["label_fraction"] for s in moco["summary"])
    assert fractions == [0.5, 1.0]
    for s in moco["summary"]:
        assert s["n_seeds"] == 2 and 0.0 <= s["metrics"]["auc_macro"]["mean"] <= 1.0


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
        # waiting for the loader is part of the pass: reading alone is at least as fast as the whole pass
        assert r["nocache_read_per_s"] >= r["nocache_per_s"] and r["cached_read_per_s"] >= r["cached_per_s"]
        assert r["speedup_cached_read"] == pytest.approx(r["cached_read_per_s"] / r["nocache_read_per_s"], rel=1e-9)


@pytest.mark.slow
def test_dataloading_3d_patch_path_json_fields():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dataloading.py"), "--only3d", "--volumes3d", "2",
         "--volume3d-shape", "6x24x24", "--spacing", "2", "--patch", "8", "--batch-size", "4", "--workers", "0",
         "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rows"] == [] and {r["samples_per_volume"] for r in res["rows_3d"]} == {1, 4}
    for r in res["rows_3d"]:
        assert r["volumes"] == 2 and r["crops"] == 2 * r["samples_per_volume"]
        assert r["cold_crops_per_s"] == pytest.approx(r["cold_volumes_per_s"] * r["samples_per_volume"], rel=1e-9)
        assert r["step_s"] > 0 and isinstance(r["loading_bounds_step_cached"], bool)


@pytest.mark.slow
def test_fidelity_pair_runs_and_writes_json_and_markdown(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--pairs", "queue", "--steps", "1", "--seeds", "0",
         "--fractions", "1.0", "--data", "phantom2d:96", "--image-size", "16", "--batch-size", "8", "--decorrelation",
         "--decorrelation-images", "16", "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "fidelity.json").read_text())
    assert [r["variant"].split(":")[0] for r in res["rows"]] == ["before", "after"]
    assert res["rows"][0]["overrides"][0] == "method.mask_own_keys=false"
    assert set(res["decorrelation"]) >= {"raw", "zca groups of 64, pooled stats", "zca one group, feature-map stats"}
    md = (tmp_path / "fidelity.md").read_text()
    assert "| queue | mocov2 | before" in md and "AUC @ 1" in md
