"""run_protocol: one row per fraction x seed, subset sizes, determinism, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from medssl.errors import ConfigError, DataError
from medssl.eval.metrics import METRIC_NAMES
from medssl.eval.protocol import (
    PROTOCOLS,
    FeatureSet,
    ProtocolOutput,
    features_from_dataset,
    register_protocol,
    run_protocol,
)


def _features(multilabel: bool = False, n_train: int = 200, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    k, dim = 3, 8
    centers = rng.normal(0, 2.0, (k, dim))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        if multilabel:
            y = (rng.random((n, k)) < 0.4).astype(np.int64)
            return y @ centers + rng.normal(0, 1, (n, dim)), y
        y = rng.integers(0, k, n)
        return centers[y] + rng.normal(0, 1, (n, dim)), y

    tx, ty = draw(n_train)
    vx, vy = draw(60)
    sx, sy = draw(90)
    return FeatureSet(tx, ty, sx, sy, val_x=vx, val_y=vy, multilabel=multilabel, num_classes=k)


@pytest.mark.parametrize("protocol", ["linear", "knn"])
def test_rows_fractions_seeds_and_determinism(protocol: str) -> None:
    fs = _features()
    fractions, seeds = [0.05, 0.5, 1.0], [0, 1]
    rows = run_protocol(fs, protocol, fractions, seeds, encoder_name="enc")
    assert len(rows) == len(fractions) * len(seeds)
    assert [(r["label_fraction"], r["seed"]) for r in rows] == [(f, s) for f in fractions for s in seeds]
    n = len(fs.train_y)
    for r in rows:
        assert r["encoder"] == "enc" and r["protocol"] == protocol
        assert set(r["metrics"]) == set(METRIC_NAMES)
        assert isinstance(r["notes"], list)
        # Stratified subset: about fraction * n, topped up by at most one per class.
        assert abs(r["n_train"] - r["label_fraction"] * n) <= fs.num_classes
        assert r["n_train"] >= fs.num_classes
    assert all(r["n_train"] == n for r in rows if r["label_fraction"] == 1.0)
    # Above chance on clearly separated blobs with the full training set.
    assert all(r["metrics"]["auc_macro"] > 0.8 for r in rows if r["label_fraction"] == 1.0)
    again = run_protocol(fs, protocol, fractions, seeds, encoder_name="enc")
    assert again == rows
    # Different seeds draw different subsets at a small fraction -> (almost surely) different metrics.
    small = [r for r in rows if r["label_fraction"] == 0.05]
    assert small[0]["metrics"] != small[1]["metrics"]


def test_linear_subsamples_validation_and_reports_c() -> None:
    fs = _features()
    rows = run_protocol(fs, "linear", [0.1, 1.0], [3])
    assert rows[0]["params"]["n_val"] == pytest.approx(6, abs=fs.num_classes)
    assert rows[1]["params"]["n_val"] == 60
    assert "C" in rows[0]["params"] and "encoder" not in rows[0]
    full = run_protocol(fs, "linear", [0.1], [3], subsample_val=False)
    assert full[0]["params"]["n_val"] == 60


def test_multilabel_knn() -> None:
    fs = _features(multilabel=True)
    rows = run_protocol(fs, "knn", [0.2], [0, 1, 2], k=5, temperature=0.1)
    assert len(rows) == 3
    assert rows[0]["params"] == {"k": 5, "temperature": 0.1}


def test_user_errors() -> None:
    fs = _features()
    with pytest.raises(ConfigError, match="unknown evaluation protocol"):
        run_protocol(fs, "nope", [1.0], [0])
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        run_protocol(fs, "knn", [0.0], [0])
    with pytest.raises(ConfigError):
        run_protocol(fs, "knn", [1.5], [0])
    with pytest.raises(ConfigError):
        run_protocol(fs, "knn", [1.0], [])
    with pytest.raises(ConfigError, match="unknown option"):
        run_protocol(fs, "knn", [1.0], [0], c_grid=[1.0])
    with pytest.raises(DataError):
        FeatureSet(np.zeros((4, 2)), np.zeros(3, dtype=int), np.zeros((2, 2)), np.zeros(2, dtype=int))


def test_registry_accepts_new_protocols() -> None:
    seen: list[np.ndarray] = []

    @register_protocol("_test_constant")
    def constant(
        data: FeatureSet,
        train_subset: np.ndarray,
        seed: int,
        *,
        val_subset: np.ndarray | None = None,
        value: float = 0.5,
    ) -> ProtocolOutput:
        seen.append(train_subset)
        return ProtocolOutput({"dice": value}, ["a note"], {"value": value})

    try:
        rows = run_protocol(_features(), "_test_constant", [0.1], [0, 1], value=0.25)
        assert [r["metrics"] for r in rows] == [{"dice": 0.25}] * 2
        assert rows[0]["n_train"] == len(seen[0])
        with pytest.raises(ConfigError, match="unknown option"):
            run_protocol(_features(), "_test_constant", [0.1], [0], other=1)
        with pytest.raises(ConfigError, match="already registered"):
            register_protocol("_test_constant")(constant)
    finally:
        PROTOCOLS.pop("_test_constant", None)


class FakeLabelledDataset(Dataset):
    """Minimal medssl-style dataset: 2-D images whose mean depends on the class."""

    def __init__(self, n: int = 40) -> None:
        rng = np.random.default_rng(0)
        self.labels = np.arange(n, dtype=np.int64) % 2
        self.multilabel = False
        self.num_classes = 2
        self.class_names = ["benign", "malignant"]
        self.splits = np.array(["train", "train", "val", "test"] * (n // 4))
        self._noise = rng.random((n, 1, 4, 4)).astype(np.float32) * 0.2

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        image = torch.from_numpy(self._noise[i] + np.float32(0.5 * self.labels[i]))
        return {"image": image, "index": i, "label": torch.tensor(self.labels[i])}


def test_features_from_dataset_end_to_end() -> None:
    ds = FakeLabelledDataset()
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    fs = features_from_dataset(encoder, ds, batch_size=7)
    assert fs.train_x.shape == (20, 4) and fs.test_x.shape == (10, 4) and fs.val_x is not None
    np.testing.assert_array_equal(fs.train_y, ds.labels[ds.indices("train")])
    assert fs.class_names == ["benign", "malignant"]
    rows = run_protocol(fs, "linear", [1.0], [0])
    assert rows[0]["n_train"] == 20


def test_identical_subsets_across_seeds_are_not_refitted(monkeypatch):
    from medssl.eval import protocol as proto

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.repeat(np.arange(2), 30)
    fs = proto.FeatureSet(train_x=x, train_y=y, test_x=x, test_y=y, num_classes=2)
    calls = []
    original = proto.PROTOCOLS["knn"]

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(proto.PROTOCOLS, "knn", counting)
    rows = proto.run_protocol(fs, "knn", [0.5, 1.0], [0, 1, 2])
    assert len(calls) == 3 + 1  # three different 50 % subsets, one 100 % subset shared by all seeds
    full = [r for r in rows if r["label_fraction"] == 1.0]
    assert all(r["metrics"] == full[0]["metrics"] for r in full)
    assert any("reused" in n for n in full[1]["notes"])
