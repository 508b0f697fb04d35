"""benchmarks/quality_vs_lightly.py and prepare_real_data.py: the scorer against independent references, the
recipe mapping onto medssl's config keys, the digits preparation, and a run without training (pixels, random)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


qvl = _load("quality_vs_lightly")
prep = _load("prepare_real_data")


def test_weighted_knn_matches_a_written_out_loop():
    rng = np.random.default_rng(0)
    ftr, fte = rng.normal(size=(40, 5)), rng.normal(size=(12, 5))
    ytr, yte = rng.integers(0, 3, 40), rng.integers(0, 3, 12)
    pred = []
    for f in fte:  # Wu et al. 2018, one test image at a time
        sims = np.array([f @ g / np.linalg.norm(f) / np.linalg.norm(g) for g in ftr])
        top = np.argsort(-sims)[:7]
        votes = {c: sum(np.exp(sims[i] / 0.1) for i in top if ytr[i] == c) for c in range(3)}
        pred.append(max(votes, key=votes.get))
    assert qvl.knn_accuracy(ftr, ytr, fte, yte, k=7, tau=0.1) == pytest.approx(np.mean(np.array(pred) == yte))


def test_label_subset_is_stratified_with_one_per_class():
    y = np.repeat(np.arange(4), [100, 50, 10, 3])
    sub = qvl.label_subset(y, 0.1, 0)
    assert [int((y[sub] == c).sum()) for c in range(4)] == [10, 5, 1, 1]
    assert len(np.unique(sub)) == len(sub)
    assert np.array_equal(qvl.label_subset(y, 1.0, 0), np.arange(len(y)))
    assert not np.array_equal(qvl.label_subset(y, 0.1, 0), qvl.label_subset(y, 0.1, 1))


def test_pair_auc_matches_sklearn_on_raw_pixels():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(20, 4, 4, 3), dtype=np.uint8)
    b = np.where(np.arange(20)[:, None, None, None] < 10, a, rng.integers(0, 256, size=a.shape)).astype(np.uint8)
    sim = (np.arange(20) < 10).astype(int)
    fa = (a.reshape(20, -1) / 255.0 - 0.5) / 0.5
    fb = (b.reshape(20, -1) / 255.0 - 0.5) / 0.5
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    got = qvl.pair_auc(lambda im: ((im - 0.5) / 0.5).flatten(1), {"a": a, "b": b, "similar": sim})
    assert got == pytest.approx(roc_auc_score(sim, cos))


def test_the_recipe_maps_onto_valid_medssl_keys():
    from medssl.config import build_config, parse_set

    a = qvl.main.__globals__["argparse"].Namespace(
        backbone="resnet18", stem="cifar", zero_init_last=False, image_size=32, batch_size=64, steps=10, lr=0.06,
        wd=5e-4, warmup_steps=3, schedule="constant", crop_min=0.3, jitter_p=0.8, brightness=0.4, contrast=0.4,
        blur_p=0.5, blur_sigma=[0.1, 0.5], tau=0.2, queue=1024, ema=0.99)
    cfg = build_config({"method": {"name": "mocov2"}}, parse_set(qvl.medssl_overrides(a)))
    assert cfg.optim.lr == 0.06 and cfg.optim.min_lr_ratio == 1.0 and cfg.optim.warmup_steps == 3
    assert cfg.views.crop_scale == (0.3, 1.0) and cfg.views.gamma == (1.0, 1.0) and cfg.views.blur_sigma == (0.1, 0.5)
    assert cfg.method["queue_size"] == 1024 and cfg.model.stem == "cifar" and cfg.model.zero_init_last is False


def test_prepare_digits_and_a_run_without_training(tmp_path, capsys):
    path = prep.prepare_digits(tmp_path, size=8)
    d = np.load(path)
    assert d["train_images"].shape[1:] == (8, 8) and d["train_images"].dtype == np.uint8
    n = sum(len(d[f"{s}_labels"]) for s in ("train", "val", "test"))
    assert n == 1797 and len(d["test_labels"]) == 540
    out = tmp_path / "r.jsonl"
    assert qvl.main(["--data", f"npz:{path}", "--image-size", "8", "--arms", "pixels", "--seeds", "0",
                     "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.open()]
    assert [r["arm"] for r in rows] == ["pixels"]
    assert set(rows[0]["scores"]) == {f"{p}@{f:g}" for p in ("knn", "linear") for f in (0.01, 0.1, 1.0)}
    assert rows[0]["scores"]["knn@1"] > 0.8  # raw pixels of digits: a real signal
    assert "| pixels | 1 |" in capsys.readouterr().out
    torch.set_num_threads(max(torch.get_num_threads(), 1))
