"""Linear probe: quality on separable data, shapes with missing classes, C selection."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medssl.errors import ConfigError, DataError
from medssl.eval.linear import DEFAULT_C, DEFAULT_C_GRID, fit_linear_probe, linear_probe


def _blobs(
    n_per_class: int, num_classes: int, dim: int, seed: int, sep: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, sep, (num_classes, dim))
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centers[y] + rng.normal(0, 1, (len(y), dim))
    return x, y


def test_beats_chance_on_separable_blobs() -> None:
    x, y = _blobs(40, 3, 8, seed=0)
    # A held-out test set around the same centres (same seed -> same centres, fresh noise below).
    centers = np.random.default_rng(0).normal(0, 3.0, (3, 8))
    test_y = np.repeat(np.arange(3), 30)
    test_x = centers[test_y] + np.random.default_rng(5).normal(0, 1, (90, 8))
    probs = linear_probe(x, y, test_x, num_classes=3, seed=0)
    assert probs.shape == (90, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert np.mean(probs.argmax(axis=1) == test_y) > 0.9  # chance is 1/3
    assert roc_auc_score(test_y, probs, multi_class="ovr") > 0.95


def test_missing_class_in_train_subset_gives_full_width_output() -> None:
    x, y = _blobs(10, 4, 5, seed=1)
    keep = y != 2
    test_x = x[::3]
    probs = linear_probe(x[keep], y[keep], test_x, num_classes=4)
    assert probs.shape == (len(test_x), 4)
    assert np.all(probs[:, 2] == 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    result = fit_linear_probe(x[keep], y[keep], test_x, num_classes=4, class_names=["a", "b", "c", "d"])
    assert any("class 2 ('c')" in note and "absent" in note for note in result.notes)


def test_binary_subset_of_multiclass_and_single_class() -> None:
    x, y = _blobs(10, 3, 4, seed=2)
    keep = y != 1
    probs = linear_probe(x[keep], y[keep], x, num_classes=3)
    assert probs.shape == (30, 3) and np.all(probs[:, 1] == 0)
    only = y == 2
    const = linear_probe(x[only], y[only], x, num_classes=3)
    np.testing.assert_array_equal(const, np.tile([0.0, 0.0, 1.0], (30, 1)))


def test_multilabel_one_lr_per_label() -> None:
    rng = np.random.default_rng(3)
    n, dim, k = 150, 6, 3
    x = rng.normal(size=(n, dim))
    y = (x[:, :k] + 0.3 * rng.normal(size=(n, k)) > 0).astype(np.int64)
    y[:, 2] = 0  # constant label in train
    probs = linear_probe(x[:100], y[:100], x[100:], multilabel=True, num_classes=k)
    assert probs.shape == (50, k)
    assert np.all(probs[:, 2] == 0)
    for j in range(2):
        assert roc_auc_score(y[100:, j], probs[:, j]) > 0.9


def test_c_selected_on_validation_and_scaler_fit_on_train_only() -> None:
    x, y = _blobs(30, 2, 10, seed=4, sep=0.6)
    vx, vy = _blobs(20, 2, 10, seed=4, sep=0.6)
    res = fit_linear_probe(x, y, x[:5], num_classes=2, val_x=vx, val_y=vy)
    assert res.params["c_selection"] == "val_auc_macro"
    assert res.params["C"] in DEFAULT_C_GRID
    aucs = res.params["val_auc_macro"]
    assert set(aucs) == {f"{c:g}" for c in DEFAULT_C_GRID}
    # The chosen C reaches the best validation AUC; among ties, the one closest to the default in log scale.
    best = max(aucs.values())
    tied = [float(c) for c, a in aucs.items() if a == best]
    assert res.params["C"] == min(tied, key=lambda c: (abs(np.log(c / DEFAULT_C)), c))
    # Same C without validation data -> default C.
    res_default = fit_linear_probe(x, y, x[:5], num_classes=2)
    assert res_default.params == {"C": DEFAULT_C, "c_selection": "default"}
    # Single-class validation labels -> default as well, with the reason in the notes.
    res_one = fit_linear_probe(x, y, x[:5], num_classes=2, val_x=vx[:3], val_y=np.zeros(3, dtype=int))
    assert res_one.params["c_selection"] == "default"
    assert any("single class" in note for note in res_one.notes)


def test_validation_ties_prefer_default_c() -> None:
    # A perfectly separable validation pair gives AUC 1 for every C: the default C must win the tie.
    x, y = _blobs(20, 2, 4, seed=8, sep=5.0)
    res = fit_linear_probe(x, y, x, num_classes=2, val_x=x[[0, 25]], val_y=y[[0, 25]])
    assert set(res.params["val_auc_macro"].values()) == {1.0}
    assert res.params["C"] == DEFAULT_C


def test_deterministic() -> None:
    x, y = _blobs(15, 3, 6, seed=5)
    a = linear_probe(x, y, x, num_classes=3, seed=1, val_x=x, val_y=y)
    b = linear_probe(x, y, x, num_classes=3, seed=1, val_x=x, val_y=y)
    np.testing.assert_array_equal(a, b)


def test_bad_arguments() -> None:
    x, y = _blobs(5, 2, 3, seed=6)
    with pytest.raises(ConfigError):
        linear_probe(x, y, x, num_classes=2, val_x=x)
    with pytest.raises(ConfigError):
        linear_probe(x, y, x, num_classes=2, c_grid=[0.0])
    with pytest.raises(DataError):
        linear_probe(x, y, x[:, :2], num_classes=2)
    with pytest.raises(DataError):
        linear_probe(x, y + 5, x, num_classes=2)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError):
        linear_probe(bad, y, x, num_classes=2)
