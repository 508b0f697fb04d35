"""Patient-level splits and stratified label fractions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medssl.data.splits import assign_patient_splits, stratified_fraction


def _patients(n_patients: int, per_patient: int, rng: np.random.Generator) -> np.ndarray:
    ids = np.repeat([f"P{i:04d}" for i in range(n_patients)], per_patient)
    return ids[rng.permutation(len(ids))]


def test_patient_splits_are_disjoint_and_follow_fractions() -> None:
    ids = _patients(100, 3, np.random.default_rng(1))
    splits = assign_patient_splits(ids, (0.7, 0.1, 0.2), seed=3)
    assert splits.shape == ids.shape
    for patient in np.unique(ids):
        assert len(set(splits[ids == patient])) == 1
    per_patient = {s: len(np.unique(ids[splits == s])) for s in ("train", "val", "test")}
    assert per_patient == {"train": 70, "val": 10, "test": 20}


def test_patient_splits_are_deterministic_and_order_independent() -> None:
    ids = _patients(40, 2, np.random.default_rng(0))
    a = assign_patient_splits(ids, seed=5)
    assert np.array_equal(a, assign_patient_splits(ids, seed=5))
    perm = np.random.default_rng(7).permutation(len(ids))
    b = assign_patient_splits(ids[perm], seed=5)
    assert np.array_equal(a[perm], b)
    assert not np.array_equal(a, assign_patient_splits(ids, seed=6))


def test_small_datasets_get_every_split() -> None:
    splits = assign_patient_splits(["a", "b", "c"], (0.7, 0.1, 0.2), seed=0)
    assert sorted(splits) == ["test", "train", "val"]
    only_train = assign_patient_splits(["a", "b"], (1.0, 0.0, 0.0))
    assert list(only_train) == ["train", "train"]


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (0.8, 0.3, -0.1), (1.0, 0.0)])
def test_bad_fractions_raise(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        assign_patient_splits(["a", "b"], fractions)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    patients=st.lists(st.integers(0, 30), min_size=1, max_size=120),
    seed=st.integers(0, 2**16),
)
def test_split_properties(patients: list[int], seed: int) -> None:
    ids = np.array([f"p{p}" for p in patients])
    splits = assign_patient_splits(ids, seed=seed)
    assert set(splits) <= {"train", "val", "test"}
    mapping: dict[str, str] = {}
    for pid, s in zip(ids, splits, strict=True):
        assert mapping.setdefault(pid, s) == s
    n_patients = len(set(patients))
    n_train = len({p for p, s in mapping.items() if s == "train"})
    if n_patients >= 3:
        assert set(splits) == {"train", "val", "test"}
        assert abs(n_train - 0.7 * n_patients) <= 2


def test_stratified_fraction_classes_against_hand_computed_counts() -> None:
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    idx = stratified_fraction(labels, 0.1, seed=0)
    assert np.array_equal(np.bincount(labels[idx]), [60, 30, 10])
    assert np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, stratified_fraction(labels, 0.1, seed=0))
    assert not np.array_equal(idx, stratified_fraction(labels, 0.1, seed=1))


def test_stratified_fraction_keeps_rare_classes() -> None:
    labels = np.array([0] * 990 + [1] * 8 + [2] * 2)
    idx = stratified_fraction(labels, 0.01, seed=4, min_per_class=3)
    counts = np.bincount(labels[idx], minlength=3)
    assert counts[1] == 3 and counts[2] == 2  # min(min_per_class, class size)
    assert counts[0] == 10  # round(0.01 * 1000) shared out proportionally: 990 -> 10
    assert len(idx) == len(np.unique(idx))


def test_stratified_fraction_one_returns_everything() -> None:
    labels = np.arange(10) % 3
    assert np.array_equal(stratified_fraction(labels, 1.0, seed=3), np.arange(10))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_stratified_fraction_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        stratified_fraction(np.zeros(10, dtype=int), fraction, seed=0)


def test_stratified_fraction_multilabel_keeps_positives() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((500, 4)) < np.array([0.5, 0.2, 0.02, 0.0])).astype(np.int64)
    labels[:3, 2] = 1
    idx = stratified_fraction(labels, 0.02, seed=1, min_per_class=2)
    positives = labels[idx].sum(axis=0)
    assert np.all(positives[:3] >= 2)
    assert positives[3] == 0
    assert abs(len(idx) - 10) <= 3
    assert np.array_equal(idx, stratified_fraction(labels, 0.02, seed=1, min_per_class=2))


def test_stratified_fraction_multilabel_follows_combination_frequencies() -> None:
    labels = np.array([[1, 0]] * 400 + [[0, 1]] * 400 + [[1, 1]] * 200)
    idx = stratified_fraction(labels, 0.1, seed=2, min_per_class=1)
    rows = [tuple(r) for r in labels[idx]]
    assert len(idx) == 100
    assert rows.count((1, 0)) == 40 and rows.count((0, 1)) == 40 and rows.count((1, 1)) == 20


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=6),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 1000),
    minimum=st.integers(0, 3),
)
def test_stratified_fraction_properties(counts: list[int], fraction: float, seed: int, minimum: int) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    idx = stratified_fraction(labels, fraction, seed=seed, min_per_class=minimum)
    assert len(np.unique(idx)) == len(idx)
    assert np.all((idx >= 0) & (idx < len(labels)))
    chosen = np.bincount(labels[idx], minlength=len(counts)) if len(idx) else np.zeros(len(counts))
    for c, n_c in enumerate(counts):
        assert chosen[c] >= min(minimum, n_c)
    n = len(labels)
    assert len(idx) >= round(fraction * n)
    assert len(idx) <= round(fraction * n) + minimum * len(counts) + (n if fraction == 1.0 else 0)
