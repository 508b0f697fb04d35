"""``medssl embed``: features.npy equals extract_features, index.csv agrees with the dataset."""

from __future__ import annotations

import csv

import numpy as np
from sklearn.decomposition import PCA

from medssl.cli import main
from medssl.data.specs import open_dataset
from medssl.embed import embed, pca_2d
from medssl.encoders import random_encoder
from medssl.eval.features import extract_features


def test_embed_random_init_matches_extract_features(tmp_path):
    res = embed("phantom2d:40", tmp_path / "e", init="random", backbone="resnet18", image_size=16, device="cpu",
                plot=True)
    feats = np.load(res["features"])
    ds = open_dataset("phantom2d:40", image_size=16)
    assert feats.dtype == np.float32 and feats.shape == (len(ds), 512) == res["shape"]
    enc = random_encoder("resnet18", in_chans=ds.in_chans, image_size=16, seed=0)
    np.testing.assert_allclose(feats, extract_features(enc, ds, np.arange(len(ds))), rtol=1e-5, atol=1e-6)
    with open(res["index"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["row"]) for r in rows] == list(range(len(ds)))
    assert [r["source"] for r in rows] == list(ds.sources)
    assert [int(r["label"]) for r in rows] == ds.labels.tolist()
    assert [r["label_name"] for r in rows] == [ds.class_names[k] for k in ds.labels]
    assert [r["patient_id"] for r in rows] == ds.patient_ids.tolist()
    assert [r["split"] for r in rows] == ds.splits.tolist()
    assert res["plot"].read_bytes().startswith(b"\x89PNG")


def test_embed_one_split_via_cli(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["embed", "--init", "random", "--data", "phantom2d:40", "--image-size", "16", "--split", "test",
                 "--device", "cpu", "--out", str(out)]) == 0
    ds = open_dataset("phantom2d:40", image_size=16)
    test_idx = ds.indices("test")
    feats = np.load(out / "features.npy")
    assert feats.shape == (len(test_idx), 512)
    with open(out / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(test_idx)
    assert {r["split"] for r in rows} == {"test"}
    assert f"{len(test_idx)} x 512 features" in capsys.readouterr().out


def test_pca_2d_matches_sklearn():
    x = np.random.default_rng(0).normal(size=(30, 6)) * np.arange(1, 7)
    ours = pca_2d(x)
    ref = PCA(n_components=2).fit_transform(x)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), rtol=1e-6, atol=1e-8)
