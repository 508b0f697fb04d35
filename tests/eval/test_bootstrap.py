"""Bootstrap CIs: vectorised replicates equal the metrics of explicit resamples; coverage, width, clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl.errors import ConfigError, DataError
from medssl.eval.bootstrap import (
    bootstrap_ci,
    classification_ci,
    classification_replicates,
    percentile_ci,
    resample_counts,
    segmentation_ci,
)
from medssl.eval.metrics import classification_metrics, dice_jaccard, segmentation_metrics_with_notes


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _task(kind: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    rng = np.random.default_rng(seed)
    if kind == "multilabel":
        y = (rng.random((n, 3)) < 0.3).astype(np.int64)
        s = 1 / (1 + np.exp(-(2.0 * (y - 0.5) + rng.normal(0, 1.5, (n, 3)))))
        return y, np.round(s, 2), True
    k = 2 if kind == "binary" else 4
    y = rng.integers(0, k, n)
    if kind == "absent":
        y = rng.choice([0, 1, 3], n)
    s = _softmax(rng.normal(0, 1, (n, k)) + 1.2 * np.eye(k)[y])
    return y, np.round(s, 2), False  # rounded: tied scores


@pytest.mark.parametrize("kind", ["binary", "multiclass", "absent", "multilabel"])
def test_replicates_equal_metrics_of_explicit_resamples(kind: str) -> None:
    y, s, ml = _task(kind, 60)
    counts = resample_counts(len(y), 25, seed=3)
    reps = classification_replicates(y, s, counts, multilabel=ml)
    for b, row in enumerate(counts):
        idx = np.repeat(np.arange(len(y)), row)
        ref = classification_metrics(y[idx], s[idx], multilabel=ml)
        assert set(reps) == set(ref)
        for name, value in ref.items():
            got = reps[name][b]
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, abs=1e-12), (name, b)
    # Unit weights give the point metrics.
    ones = classification_replicates(y, s, np.ones((1, len(y))), multilabel=ml)
    point = classification_metrics(y, s, multilabel=ml)
    for name, value in point.items():
        assert ones[name][0] == pytest.approx(value, abs=1e-12, nan_ok=True)


def test_undefined_replicates_are_nan_not_errors() -> None:
    # 2 positives in 40 items: some resamples have none, their AUC is NaN and left out of the quantiles.
    y = np.zeros(40, dtype=np.int64)
    y[:2] = 1
    p = np.linspace(0, 1, 40)
    s = np.stack([1 - p, p], axis=1)
    counts = resample_counts(40, 300, seed=0)
    reps = classification_replicates(y, s, counts)
    none = (counts[:, :2].sum(axis=1) == 0)
    assert none.any()
    assert np.all(np.isnan(reps["auc_macro"][none])) and np.all(~np.isnan(reps["auc_macro"][~none]))
    lo, hi = percentile_ci(reps["auc_macro"])
    assert lo <= hi


def test_ci_contains_point_estimate_and_narrows_with_n() -> None:
    widths = []
    for n in (50, 200, 800):
        y, s, _ = _task("binary", n, seed=1)
        point = classification_metrics(y, s)
        ci = classification_ci(y, s, n_boot=500, seed=0)
        for name in ("auc_macro", "ap_macro", "accuracy", "balanced_accuracy", "f1_macro", "sensitivity"):
            lo, hi = ci[name]
            assert lo <= point[name] <= hi, (n, name)
        widths.append(ci["auc_macro"][1] - ci["auc_macro"][0])
    assert widths[0] > widths[1] > widths[2]
    # Roughly 1/sqrt(n): 16x the items, about a quarter of the width.
    assert 0.15 < widths[2] / widths[0] < 0.45


def test_patient_resampling_keeps_a_patients_items_together() -> None:
    groups = np.repeat(np.array(["p3", "p1", "p2", "p0", "p4"]), [1, 2, 3, 4, 5])
    counts = resample_counts(len(groups), 200, seed=0, groups=groups)
    for g in np.unique(groups):
        member = counts[:, groups == g]
        assert np.all(member == member[:, :1])  # drawn together, the same number of times
    # Five patients drawn per resample: per-patient counts sum to 5.
    per_patient = np.stack([counts[:, groups == g][:, 0] for g in np.unique(groups)], axis=1)
    assert np.all(per_patient.sum(axis=1) == 5)
    assert not np.all(counts.sum(axis=1) == len(groups))  # item totals vary with the patients drawn
    plain = resample_counts(len(groups), 200, seed=0)
    assert np.all(plain.sum(axis=1) == len(groups))


def test_patient_ci_is_wider_when_patients_are_correlated() -> None:
    # 20 patients x 10 near-identical images: the patient bootstrap sees 20 units, the item bootstrap 200.
    rng = np.random.default_rng(0)
    patient_y = rng.integers(0, 2, 20)
    patient_s = np.clip(0.5 + 0.25 * (patient_y - 0.5) + rng.normal(0, 0.25, 20), 0, 1)
    y = np.repeat(patient_y, 10)
    p = np.repeat(patient_s, 10) + rng.normal(0, 1e-3, 200)
    s = np.stack([1 - p, p], axis=1)
    groups = np.repeat(np.arange(20), 10)
    item = classification_ci(y, s, n_boot=400, seed=1)["auc_macro"]
    patient = classification_ci(y, s, groups=groups, n_boot=400, seed=1)["auc_macro"]
    assert patient[1] - patient[0] > 2 * (item[1] - item[0])


def test_segmentation_ci_equals_the_loop_bootstrap() -> None:
    rng = np.random.default_rng(0)
    true = (rng.random((30, 8, 8)) < 0.3).astype(np.int64)
    pred = np.where(rng.random((30, 8, 8)) < 0.8, true, 1 - true)
    pred[:3] = 0
    true[:3] = 0  # three images with the class in neither map: NaN, left out
    dice, jac = dice_jaccard(pred, true, 2)
    groups = np.repeat(np.arange(10), 3)
    fast = segmentation_ci(dice, jac, groups=groups, n_boot=200, seed=5)

    def stat(name: str):
        def f(idx: np.ndarray) -> float:
            return segmentation_metrics_with_notes(dice[idx], jac[idx])[0][name]
        return f

    for name in ("dice", "jaccard"):
        slow = bootstrap_ci(stat(name), 30, groups=groups, n_boot=200, seed=5)
        assert fast[name] == pytest.approx(slow, abs=1e-12)
        point = segmentation_metrics_with_notes(dice, jac)[0][name]
        assert fast[name][0] <= point <= fast[name][1]


def test_fast_enough_and_errors() -> None:
    import time

    y, s, _ = _task("multiclass", 1000)
    t0 = time.perf_counter()
    ci = classification_ci(y, s, n_boot=1000, seed=0)
    assert time.perf_counter() - t0 < 5.0
    assert all(lo <= hi for lo, hi in ci.values())
    assert percentile_ci(np.full(10, np.nan)) == [pytest.approx(np.nan, nan_ok=True)] * 2
    with pytest.raises(ConfigError):
        resample_counts(10, 0, seed=0)
    with pytest.raises(DataError):
        resample_counts(10, 5, seed=0, groups=np.arange(3))
    with pytest.raises(DataError):
        classification_replicates(y, s, np.ones((2, 5)))
