"""Weighted kNN against a brute-force loop written from the InstDisc definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl.errors import ConfigError, DataError
from medssl.eval.knn import knn_predict


def _brute_force(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    k: int,
    t: float,
    multilabel: bool,
) -> np.ndarray:
    out = np.zeros((len(test_x), num_classes))
    for i, q in enumerate(test_x):
        sims = []
        for j, x in enumerate(train_x):
            sims.append((float(q @ x) / (math.sqrt(q @ q) * math.sqrt(x @ x)), j))
        sims.sort(reverse=True)
        total = 0.0
        for s, j in sims[:k]:
            w = math.exp(s / t)
            total += w
            if multilabel:
                out[i] += w * train_y[j]
            else:
                out[i, train_y[j]] += w
        out[i] /= total
    return out


@pytest.mark.parametrize("k", [1, 3, 7])
def test_matches_brute_force_multiclass(k: int) -> None:
    rng = np.random.default_rng(k)
    train_x = rng.normal(size=(15, 6))
    train_y = rng.integers(0, 3, 15)
    test_x = rng.normal(size=(9, 6))
    got = knn_predict(train_x, train_y, test_x, num_classes=3, k=k, temperature=0.1)
    ref = _brute_force(train_x, train_y, test_x, 3, k, 0.1, False)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)


def test_matches_brute_force_multilabel_and_chunking() -> None:
    rng = np.random.default_rng(7)
    train_x = rng.normal(size=(20, 5))
    train_y = (rng.random((20, 4)) < 0.5).astype(np.int64)
    test_x = rng.normal(size=(11, 5))
    ref = _brute_force(train_x, train_y, test_x, 4, 5, 0.5, True)
    for chunk in (None, 1, 4):
        got = knn_predict(
            train_x, train_y, test_x, num_classes=4, k=5, temperature=0.5, multilabel=True, chunk_size=chunk
        )
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_k_larger_than_train_and_small_temperature_stay_finite() -> None:
    rng = np.random.default_rng(1)
    train_x = rng.normal(size=(4, 3))
    train_y = np.array([0, 1, 1, 2])
    test_x = rng.normal(size=(5, 3))
    got = knn_predict(train_x, train_y, test_x, num_classes=4, k=50, temperature=0.001)
    assert got.shape == (5, 4)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(got[:, 3] == 0)  # class 3 has no training sample
    # With T -> 0 the nearest neighbour takes (almost) all the weight.
    ref = _brute_force(train_x, train_y, test_x, 4, 1, 1.0, False)
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_exact_neighbour_dominates() -> None:
    train_x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    train_y = np.array([0, 1, 2])
    got = knn_predict(train_x, train_y, np.array([[2.0, 0.1]]), num_classes=3, k=3, temperature=0.07)
    assert got.argmax() == 0


def test_bad_arguments() -> None:
    x = np.ones((3, 2))
    with pytest.raises(ConfigError):
        knn_predict(x, np.array([0, 1, 0]), x, num_classes=2, k=0)
    with pytest.raises(ConfigError):
        knn_predict(x, np.array([0, 1, 0]), x, num_classes=2, temperature=0.0)
    with pytest.raises(DataError):
        knn_predict(x, np.array([0, 1, 5]), x, num_classes=2)
    with pytest.raises(DataError):
        knn_predict(x, np.array([0, 1, 0]), np.ones((3, 4)), num_classes=2)
