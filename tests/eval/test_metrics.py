"""Metrics against scikit-learn as an independent reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    jaccard_score,
    recall_score,
    roc_auc_score,
)

from medssl.errors import DataError
from medssl.eval.metrics import (
    BINARY_METRIC_NAMES,
    METRIC_NAMES,
    average_precision,
    classification_metrics,
    classification_metrics_with_notes,
    dice_jaccard,
    per_class_metrics,
    roc_auc,
    segmentation_metrics_with_notes,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    y = rng.integers(0, 2, n)
    # Informative, quantised scores so ties occur.
    p1 = np.clip(np.round(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, n), 1), 0, 1)
    score = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, score)
    pred = score.argmax(axis=1)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    assert m["ap_macro"] == pytest.approx(average_precision_score(y, p1), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert list(m) == list(METRIC_NAMES) + list(BINARY_METRIC_NAMES)
    assert all(isinstance(v, float) for v in m.values())
    # Binary: micro equals the binary value (scikit-learn ignores `average` for binary targets).
    assert m["auc_micro"] == pytest.approx(roc_auc_score(y, p1, average="micro"), abs=1e-12)
    assert m["ap_micro"] == pytest.approx(average_precision_score(y, p1, average="micro"), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1), abs=1e-12)
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 300, 4
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.0
    score = _softmax(logits)
    m = classification_metrics(y, score)
    pred = score.argmax(axis=1)
    onehot = np.eye(k)[y]
    assert m["auc_macro"] == pytest.approx(
        roc_auc_score(y, score, multi_class="ovr", average="macro"), abs=1e-12
    )
    assert m["ap_macro"] == pytest.approx(average_precision_score(onehot, score, average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert m["auc_micro"] == pytest.approx(roc_auc_score(onehot, score, average="micro"), abs=1e-12)
    assert m["ap_micro"] == pytest.approx(average_precision_score(onehot, score, average="micro"), abs=1e-12)
    assert list(m) == list(METRIC_NAMES)  # no sensitivity / specificity beyond two classes
    per = per_class_metrics(y, score, class_names=["a", "b", "c", "d"])
    assert list(per["auc"]) == ["a", "b", "c", "d"]
    ref_auc = roc_auc_score(onehot, score, average=None)
    ref_ap = average_precision_score(onehot, score, average=None)
    np.testing.assert_allclose(list(per["auc"].values()), ref_auc, atol=1e-12)
    np.testing.assert_allclose(list(per["ap"].values()), ref_ap, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 250, 5
    y = (rng.random((n, k)) < rng.uniform(0.1, 0.6, k)).astype(np.int64)
    score = 1 / (1 + np.exp(-(2.0 * (y - 0.5) + rng.normal(0, 1.2, (n, k)))))
    m = classification_metrics(y, score, multilabel=True)
    pred = (score >= 0.5).astype(np.int64)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, score, average="macro"), abs=1e-12)
    assert m["ap_macro"] == pytest.approx(average_precision_score(y, score, average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)  # subset accuracy
    per_label_bal = np.mean([balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(k)])
    assert m["balanced_accuracy"] == pytest.approx(per_label_bal, abs=1e-12)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert m["auc_micro"] == pytest.approx(roc_auc_score(y, score, average="micro"), abs=1e-12)
    assert m["ap_micro"] == pytest.approx(average_precision_score(y, score, average="micro"), abs=1e-12)
    per = per_class_metrics(y, score, multilabel=True)
    np.testing.assert_allclose(list(per["auc"].values()), roc_auc_score(y, score, average=None), atol=1e-12)
    np.testing.assert_allclose(
        list(per["ap"].values()), average_precision_score(y, score, average=None), atol=1e-12
    )


def test_binary_ap_and_auc_helpers_with_all_ties() -> None:
    y = np.array([0, 1, 1, 0, 1])
    s = np.full(5, 0.3)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    assert roc_auc(y, s) == pytest.approx(0.5)
    assert average_precision(y, s) == pytest.approx(0.6)  # prevalence


def test_multiclass_absent_class_is_left_out_with_a_note() -> None:
    rng = np.random.default_rng(3)
    n, k = 120, 4
    y = rng.choice([0, 1, 3], n)  # class 2 absent from y_true
    score = _softmax(rng.normal(0, 1, (n, k)) + 1.5 * np.eye(k)[y])
    m, notes = classification_metrics_with_notes(y, score, class_names=["a", "b", "c", "d"])
    present = [0, 1, 3]
    ref_auc = np.mean([roc_auc_score(y == c, score[:, c]) for c in present])
    ref_ap = np.mean([average_precision_score(y == c, score[:, c]) for c in present])
    assert m["auc_macro"] == pytest.approx(ref_auc, abs=1e-12)
    assert m["ap_macro"] == pytest.approx(ref_ap, abs=1e-12)
    assert any("auc_macro" in note and "class 2 ('c')" in note for note in notes)
    assert any("ap_macro" in note and "class 2" in note for note in notes)
    # Micro averages stay defined and equal scikit-learn on the one-hot matrix with the empty column.
    onehot = np.eye(k)[y]
    assert m["auc_micro"] == pytest.approx(roc_auc_score(onehot, score, average="micro"), abs=1e-12)
    assert m["ap_micro"] == pytest.approx(average_precision_score(onehot, score, average="micro"), abs=1e-12)
    # Per class: the absent class is NaN (scikit-learn warns and returns NaN or fails for it).
    per = per_class_metrics(y, score)
    assert math.isnan(per["auc"]["2"]) and math.isnan(per["ap"]["2"])
    assert per["auc"]["3"] == pytest.approx(roc_auc_score(y == 3, score[:, 3]), abs=1e-12)


def test_single_class_in_y_true_gives_nan_and_reason() -> None:
    y = np.ones(10, dtype=np.int64)
    p1 = np.linspace(0.1, 0.9, 10)
    score = np.stack([1 - p1, p1], axis=1)
    m, notes = classification_metrics_with_notes(y, score)
    assert math.isnan(m["auc_macro"])
    assert any("auc_macro is NaN" in note for note in notes)
    assert m["ap_macro"] == pytest.approx(1.0)  # positives only: every threshold has precision 1
    pred = score.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert math.isnan(m["specificity"])  # no negatives
    assert any("specificity is NaN" in note and "no negatives" in note for note in notes)

    # Only negatives: AUC and AP are both undefined.
    m0, notes0 = classification_metrics_with_notes(np.zeros(10, dtype=np.int64), score)
    assert math.isnan(m0["auc_macro"]) and math.isnan(m0["ap_macro"])
    assert any("ap_macro is NaN" in note for note in notes0)
    assert math.isnan(m0["sensitivity"]) and any("sensitivity is NaN" in note for note in notes0)

    # Multi-class with a single class present: every one-vs-rest AUC is undefined.
    m3, notes3 = classification_metrics_with_notes(np.zeros(6, dtype=np.int64), np.full((6, 3), 1 / 3))
    assert math.isnan(m3["auc_macro"])
    assert any("auc_macro is NaN" in note for note in notes3)


def test_constant_scores_do_not_crash() -> None:
    y = np.array([0, 1, 2, 1, 0, 2, 2])
    score = np.full((7, 3), 1 / 3)
    m, notes = classification_metrics_with_notes(y, score)
    assert m["auc_macro"] == pytest.approx(0.5)
    prevalence = np.bincount(y) / len(y)
    assert m["ap_macro"] == pytest.approx(prevalence.mean())
    pred = score.argmax(axis=1)  # all class 0
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert notes == []


def test_multilabel_one_sided_label_is_left_out() -> None:
    rng = np.random.default_rng(0)
    n = 60
    y = (rng.random((n, 3)) < 0.4).astype(np.int64)
    y[:, 1] = 0  # label 1 has no positive: AUC, AP and F1 undefined for it when never predicted
    score = rng.random((n, 3))
    score[:, 1] = 0.1
    m, notes = classification_metrics_with_notes(y, score, multilabel=True)
    pred = (score >= 0.5).astype(np.int64)
    assert m["auc_macro"] == pytest.approx(np.mean([roc_auc_score(y[:, j], score[:, j]) for j in (0, 2)]))
    assert m["ap_macro"] == pytest.approx(
        np.mean([average_precision_score(y[:, j], score[:, j]) for j in (0, 2)])
    )
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=np.nan))
    assert sum("label 1" in note for note in notes) == 3


def test_multilabel_all_labels_one_sided_is_nan() -> None:
    y = np.zeros((5, 2), dtype=np.int64)
    m, notes = classification_metrics_with_notes(y, np.full((5, 2), 0.2), multilabel=True)
    assert math.isnan(m["auc_macro"]) and math.isnan(m["ap_macro"]) and math.isnan(m["f1_macro"])
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0
    assert math.isnan(m["auc_micro"]) and math.isnan(m["ap_micro"])
    assert len(notes) == 4 and any("auc_micro and ap_micro are NaN" in note for note in notes)


@pytest.mark.parametrize(
    ("y", "score", "multilabel"),
    [
        (np.array([0, 1]), np.array([0.2, 0.8]), False),  # 1-D scores
        (np.array([0, 1, 0]), np.full((2, 2), 0.5), False),  # length mismatch
        (np.array([0, 3]), np.full((2, 2), 0.5), False),  # id outside the columns
        (np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), False),  # non-finite
        (np.zeros((0,), dtype=int), np.zeros((0, 2)), False),  # empty
        (np.array([[0, 2]]), np.full((1, 2), 0.5), True),  # not 0/1
    ],
)
def test_malformed_inputs_raise_data_error(y: np.ndarray, score: np.ndarray, multilabel: bool) -> None:
    with pytest.raises(DataError):
        classification_metrics(y, score, multilabel=multilabel)


def test_dice_jaccard_by_hand() -> None:
    # Image 0 (2x3): class 1 predicted on 3 pixels, true on 2, overlap 1 -> Dice 2/5, Jaccard 1/4.
    # Class 2 only in image 1: exact there, absent from both maps in image 0 -> NaN.
    pred = np.array([[[1, 1, 0], [1, 0, 0]], [[2, 2, 0], [0, 0, 1]]])
    true = np.array([[[1, 0, 0], [0, 1, 0]], [[2, 2, 0], [0, 0, 0]]])
    dice, jac = dice_jaccard(pred, true, 3)
    assert dice[0, 1] == pytest.approx(2 / 5) and jac[0, 1] == pytest.approx(1 / 4)
    assert dice[0, 0] == pytest.approx(2 * 2 / (3 + 4)) and jac[0, 0] == pytest.approx(2 / 5)  # bg: 3 vs 4 px, 2 shared
    assert math.isnan(dice[0, 2]) and math.isnan(jac[0, 2])
    assert dice[1, 2] == 1.0 and jac[1, 2] == 1.0
    assert dice[1, 1] == 0.0 and jac[1, 1] == 0.0  # predicted where the truth has none: a miss, not NaN
    # Against scikit-learn's per-image Jaccard where defined.
    for i in range(2):
        ref = jaccard_score(true[i].ravel(), pred[i].ravel(), labels=[0, 1, 2], average=None, zero_division=0)
        ok = ~np.isnan(jac[i])
        np.testing.assert_allclose(jac[i][ok], ref[ok])
    metrics, per_class, notes = segmentation_metrics_with_notes(dice, jac, class_names=["bg", "a", "b"])
    assert per_class["dice"]["a"] == pytest.approx((2 / 5 + 0) / 2)
    assert per_class["dice"]["b"] == pytest.approx(1.0)  # only image 1 defines class 2
    assert metrics["dice"] == pytest.approx(((2 / 5) / 2 + 1.0) / 2)
    assert metrics["jaccard"] == pytest.approx(((1 / 4) / 2 + 1.0) / 2)
    assert any("class 2 ('b')" in note and "1 of 2 images" in note for note in notes)


def test_dice_all_background_prediction_is_zero_and_errors() -> None:
    true = np.zeros((3, 4, 4), dtype=np.int64)
    true[:, 1:3, 1:3] = 1
    dice, jac = dice_jaccard(np.zeros_like(true), true, 2)
    metrics, _, _ = segmentation_metrics_with_notes(dice, jac)
    assert metrics == {"dice": 0.0, "jaccard": 0.0}
    # A class in no map at all: NaN with the reason.
    empty = np.zeros((2, 4, 4), dtype=np.int64)
    m, _, notes = segmentation_metrics_with_notes(*dice_jaccard(empty, empty, 2))
    assert math.isnan(m["dice"]) and any("neither the ground truth nor the prediction of any" in n for n in notes)
    with pytest.raises(DataError):
        dice_jaccard(np.zeros((2, 4, 4), dtype=np.int64), np.zeros((2, 4, 5), dtype=np.int64), 2)
    with pytest.raises(DataError):
        dice_jaccard(np.full((1, 2, 2), 2), np.zeros((1, 2, 2), dtype=np.int64), 2)
    with pytest.raises(DataError):
        dice_jaccard(np.zeros((1, 2, 2), dtype=np.float32), np.zeros((1, 2, 2), dtype=np.int64), 2)
