"""Classification metrics for downstream evaluation (binary, multi-class and multi-label).

All metrics are computed here in NumPy (no scikit-learn call) so that the definitions are explicit and the
tests can compare against scikit-learn as an independent reference. The definitions follow scikit-learn's
conventions exactly:

* **ROC AUC** of one binary problem is the Mann-Whitney statistic with average ranks for tied scores
  (Hanley & McNeil, 1982), i.e. ``sklearn.metrics.roc_auc_score``.
* **Average precision** is the step-wise area under the precision-recall curve,
  ``AP = sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds (no interpolation), i.e.
  ``sklearn.metrics.average_precision_score``.
* ``auc_macro`` / ``ap_macro``: binary (two score columns) -> the metric of the positive column (class 1);
  multi-class -> one-vs-rest mean over classes; multi-label -> mean over labels. A class whose metric is
  undefined in ``y_true`` (ROC AUC needs positives *and* negatives, AP needs positives) is left out of the
  mean and a note says so; when no class is defined the macro value is ``NaN``.
* ``accuracy``, ``balanced_accuracy``, ``f1_macro``: from ``argmax`` of the scores (multi-class / binary)
  or from ``score >= 0.5`` (multi-label). Multi-label accuracy is exact-match subset accuracy, balanced
  accuracy is the mean over labels of each label's balanced accuracy, F1 macro is the mean over labels
  with defined F1. Balanced accuracy averages recall over the classes present in ``y_true``; multi-class
  F1 macro averages over the classes present in ``y_true`` or in the predictions (scikit-learn's default
  label set).

* ``auc_micro`` / ``ap_micro``: multi-class and multi-label -> the metric of the flattened one-hot (or 0/1)
  label matrix against the flattened score matrix (scikit-learn's ``average="micro"`` on the indicator
  matrix); binary -> the binary value, as scikit-learn ignores ``average`` for binary targets.
* ``sensitivity`` / ``specificity`` (binary tasks only): recall of class 1 and of class 0, from ``argmax``.
* :func:`per_class_metrics`: ROC AUC and AP of every class (one-vs-rest) or label.
* :func:`dice_jaccard` / :func:`segmentation_metrics_with_notes`: Dice and Jaccard of label maps, per image
  and class, and their means over images and foreground classes.

Edge cases (a single class in ``y_true``, a class absent from ``y_true``, constant scores) never raise:
they produce ``NaN`` or a well-defined value plus a human-readable note from
:func:`classification_metrics_with_notes`. Malformed inputs (wrong shapes, labels outside the score
columns, non-finite scores, empty arrays) raise :class:`medssl.errors.DataError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from medssl.errors import DataError

METRIC_NAMES: tuple[str, ...] = (
    "auc_macro", "ap_macro", "auc_micro", "ap_micro", "accuracy", "balanced_accuracy", "f1_macro"
)
"""Keys of the dictionary returned by :func:`classification_metrics`, in display order."""

BINARY_METRIC_NAMES: tuple[str, ...] = ("sensitivity", "specificity")
"""Extra keys returned for binary (two-class, not multi-label) tasks, after :data:`METRIC_NAMES`."""

SEGMENTATION_METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard")
"""Keys of the dictionary returned by :func:`segmentation_metrics_with_notes`."""

MULTILABEL_THRESHOLD = 0.5
"""Probability at or above which a label counts as predicted positive in multi-label mode."""


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties replaced by their average rank (like ``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    _, inverse, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    starts = ends - counts
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of one binary problem via the Mann-Whitney U statistic.

    Args:
        y_true: ``(N,)`` booleans or 0/1, ``True`` for the positive class.
        y_score: ``(N,)`` scores, higher meaning more likely positive.

    Returns:
        The probability that a random positive scores higher than a random negative (ties count 1/2);
        ``NaN`` when ``y_true`` has no positive or no negative.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision (step-wise area under the precision-recall curve) of one binary problem.

    Args:
        y_true: ``(N,)`` booleans or 0/1, ``True`` for the positive class.
        y_score: ``(N,)`` scores, higher meaning more likely positive.

    Returns:
        ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds, from the highest score down; ``NaN`` when
        ``y_true`` has no positive.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    # Last position of every group of tied scores: one threshold per distinct score.
    threshold_idx = np.r_[np.flatnonzero(np.diff(s_sorted)), s.shape[0] - 1]
    tps = np.cumsum(y[order])[threshold_idx].astype(np.float64)
    precision = tps / (threshold_idx + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _name(class_names: Sequence[str] | None, c: int, kind: str) -> str:
    if class_names is not None and c < len(class_names):
        return f"{kind} {c} ({class_names[c]!r})"
    return f"{kind} {c}"


def _macro(
    values: list[float],
    skipped: list[int],
    metric: str,
    reason: str,
    kind: str,
    class_names: Sequence[str] | None,
    notes: list[str],
) -> float:
    """Mean of the defined per-class values; records a note for skipped classes or an all-NaN result."""
    defined = [v for v in values if not math.isnan(v)]
    if skipped:
        names = ", ".join(_name(class_names, c, kind) for c in skipped)
        if defined:
            notes.append(
                f"{metric}: {names} {reason}; left out of the macro mean "
                f"({len(defined)} of {len(values)} {kind}s averaged)"
            )
        else:
            notes.append(f"{metric} is NaN: undefined for every {kind} ({names} {reason})")
    return float(np.mean(defined)) if defined else math.nan


def _validate(y_true: np.ndarray, y_score: np.ndarray, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    y_score = np.asarray(y_score)
    if y_score.ndim != 2:
        raise DataError(f"y_score must have shape (N, K), got shape {y_score.shape}")
    n, k = y_score.shape
    if n == 0:
        raise DataError("cannot compute metrics on an empty evaluation set (N = 0)")
    if not np.issubdtype(y_score.dtype, np.number) or not np.all(np.isfinite(y_score)):
        raise DataError("y_score contains non-finite values (NaN or inf); the model's outputs are broken")
    y_true = np.asarray(y_true)
    if multilabel:
        if y_true.shape != (n, k):
            raise DataError(f"multi-label y_true must have shape {(n, k)} like y_score, got {y_true.shape}")
        if not np.all((y_true == 0) | (y_true == 1)):
            raise DataError("multi-label y_true must contain only 0 and 1")
        return y_true.astype(bool), y_score.astype(np.float64)
    if y_true.shape != (n,):
        raise DataError(
            f"y_true must have shape ({n},) (class ids matching y_score rows), got {y_true.shape}"
        )
    if k < 2:
        raise DataError(f"y_score needs at least 2 columns (binary: P(class 0), P(class 1)), got {k}")
    if y_true.dtype.kind == "f" and not np.all(np.mod(y_true, 1) == 0):
        raise DataError("y_true must contain integer class ids; got non-integer values")
    if y_true.dtype.kind not in "biuf":
        raise DataError(f"y_true must contain integer class ids, got dtype {y_true.dtype}")
    y_int = y_true.astype(np.int64)
    if y_int.min() < 0 or y_int.max() >= k:
        raise DataError(
            f"y_true has class ids in [{y_int.min()}, {y_int.max()}] but y_score has only {k} columns"
        )
    return y_int, y_score.astype(np.float64)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def _multiclass(
    y: np.ndarray, s: np.ndarray, class_names: Sequence[str] | None, notes: list[str]
) -> dict[str, float]:
    n, k = s.shape
    counts = np.bincount(y, minlength=k)
    out: dict[str, float] = {}
    if k == 2:
        auc = roc_auc(y == 1, s[:, 1])
        if math.isnan(auc):
            present = _name(class_names, int(y[0]), "class")
            notes.append(f"auc_macro is NaN: y_true contains only {present}, ROC AUC is undefined")
        ap = average_precision(y == 1, s[:, 1])
        if math.isnan(ap):
            notes.append(
                f"ap_macro is NaN: y_true contains no {_name(class_names, 1, 'class')} (the positive class)"
            )
        out["auc_macro"], out["ap_macro"] = auc, ap
        out["auc_micro"], out["ap_micro"] = auc, ap
    else:
        aucs = [roc_auc(y == c, s[:, c]) for c in range(k)]
        aps = [average_precision(y == c, s[:, c]) for c in range(k)]
        absent = [c for c in range(k) if counts[c] == 0]
        only = [c for c in range(k) if counts[c] == n]  # the single present class: no negatives
        out["auc_macro"] = _macro(
            aucs,
            sorted(absent + only),
            "auc_macro",
            "absent from y_true or its only class",
            "class",
            class_names,
            notes,
        )
        out["ap_macro"] = _macro(aps, absent, "ap_macro", "absent from y_true", "class", class_names, notes)
        onehot = np.eye(k, dtype=bool)[y]
        out["auc_micro"] = roc_auc(onehot.ravel(), s.ravel())  # every row has one positive: always defined
        out["ap_micro"] = average_precision(onehot.ravel(), s.ravel())

    pred = np.argmax(s, axis=1)
    out["accuracy"] = float(np.mean(pred == y))
    present = np.flatnonzero(counts)
    recalls = [np.mean(pred[y == c] == c) for c in present]
    out["balanced_accuracy"] = float(np.mean(recalls))
    labels = np.union1d(present, pred)
    tp = np.array([np.sum((pred == c) & (y == c)) for c in labels], dtype=np.float64)
    fp = np.array([np.sum((pred == c) & (y != c)) for c in labels], dtype=np.float64)
    fn = np.array([np.sum((pred != c) & (y == c)) for c in labels], dtype=np.float64)
    out["f1_macro"] = float(np.mean(_f1(tp, fp, fn)))
    if k == 2:
        for key, c, word in (("sensitivity", 1, "positives"), ("specificity", 0, "negatives")):
            if counts[c]:
                out[key] = float(np.mean(pred[y == c] == c))
            else:
                out[key] = math.nan
                notes.append(f"{key} is NaN: y_true has no {word} ({_name(class_names, c, 'class')})")
    return out


def _multilabel(
    y: np.ndarray, s: np.ndarray, class_names: Sequence[str] | None, notes: list[str]
) -> dict[str, float]:
    n, k = s.shape
    pos = y.sum(axis=0)
    out: dict[str, float] = {}
    aucs = [roc_auc(y[:, j], s[:, j]) for j in range(k)]
    aps = [average_precision(y[:, j], s[:, j]) for j in range(k)]
    one_sided = [j for j in range(k) if pos[j] == 0 or pos[j] == n]
    no_pos = [j for j in range(k) if pos[j] == 0]
    out["auc_macro"] = _macro(
        aucs,
        one_sided,
        "auc_macro",
        "has only positives or only negatives in y_true",
        "label",
        class_names,
        notes,
    )
    out["ap_macro"] = _macro(
        aps, no_pos, "ap_macro", "has no positive in y_true", "label", class_names, notes
    )
    out["auc_micro"] = roc_auc(y.ravel(), s.ravel())
    out["ap_micro"] = average_precision(y.ravel(), s.ravel())
    total = int(y.sum())
    if total == 0 or total == y.size:
        which = "no positive" if total == 0 else "no negative"
        undefined = "auc_micro and ap_micro are" if total == 0 else "auc_micro is"
        notes.append(f"{undefined} NaN: y_true has {which} label at all")

    pred = s >= MULTILABEL_THRESHOLD
    out["accuracy"] = float(np.mean(np.all(pred == y, axis=1)))
    bal = []
    for j in range(k):
        recalls = [np.mean(pred[y[:, j] == v, j] == v) for v in (False, True) if np.any(y[:, j] == v)]
        bal.append(np.mean(recalls))
    out["balanced_accuracy"] = float(np.mean(bal))
    tp = np.sum(pred & y, axis=0).astype(np.float64)
    fp = np.sum(pred & ~y, axis=0).astype(np.float64)
    fn = np.sum(~pred & y, axis=0).astype(np.float64)
    f1 = _f1(tp, fp, fn)
    undefined = [j for j in range(k) if math.isnan(f1[j])]
    out["f1_macro"] = _macro(
        list(f1),
        undefined,
        "f1_macro",
        "has no positive in y_true nor in the predictions",
        "label",
        class_names,
        notes,
    )
    return out


def classification_metrics_with_notes(
    y_true: np.ndarray,
    y_score: np.ndarray,
    multilabel: bool = False,
    class_names: Sequence[str] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Compute the classification metrics and explain every ``NaN`` or partial average.

    Args:
        y_true: ``(N,)`` integer class ids (binary / multi-class) or ``(N, K)`` 0/1 (multi-label).
        y_score: ``(N, K)`` probabilities (binary: two columns, column 1 the positive class).
        multilabel: Treat the problem as ``K`` independent binary labels.
        class_names: Optional names used in the notes.

    Returns:
        ``(metrics, notes)``: ``metrics`` maps each name in :data:`METRIC_NAMES` to a float (possibly
        ``NaN``); ``notes`` lists human-readable reasons for ``NaN`` values and for classes left out of a
        macro mean (empty when everything was defined).

    Raises:
        DataError: Shapes do not match, labels fall outside the score columns, scores are not finite or
            the evaluation set is empty.
    """
    y, s = _validate(y_true, y_score, multilabel)
    notes: list[str] = []
    metrics = _multilabel(y, s, class_names, notes) if multilabel else _multiclass(y, s, class_names, notes)
    names = metric_names(s.shape[1], multilabel)
    return {name: float(metrics[name]) for name in names}, notes


def metric_names(num_classes: int, multilabel: bool) -> tuple[str, ...]:
    """The keys :func:`classification_metrics` returns for a task: :data:`METRIC_NAMES`, plus
    :data:`BINARY_METRIC_NAMES` for a binary (two-class, single-label) task."""
    return METRIC_NAMES + (BINARY_METRIC_NAMES if num_classes == 2 and not multilabel else ())


def check_classification_inputs(
    y_true: np.ndarray, y_score: np.ndarray, multilabel: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Validate metric inputs as :func:`classification_metrics` does.

    Returns:
        ``(y, s)``: int64 class ids ``(N,)`` (bool ``(N, K)`` for multi-label) and float64 scores ``(N, K)``.

    Raises:
        DataError: Malformed inputs (see :func:`classification_metrics_with_notes`).
    """
    return _validate(y_true, y_score, multilabel)


def class_label(class_names: Sequence[str] | None, c: int) -> str:
    """The name of class ``c`` used as a key of per-class results: its class name, else its index."""
    return str(class_names[c]) if class_names is not None and c < len(class_names) else str(c)


def per_class_metrics(
    y_true: np.ndarray,
    y_score: np.ndarray,
    multilabel: bool = False,
    class_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """ROC AUC and AP of every class (one-vs-rest for multi-class, each label for multi-label).

    Args:
        y_true: ``(N,)`` class ids or ``(N, K)`` 0/1 labels.
        y_score: ``(N, K)`` scores.
        multilabel: Multi-label task.
        class_names: Optional names used as keys (default: the class index as a string).

    Returns:
        ``{"auc": {class: value}, "ap": {class: value}}``; ``NaN`` where the class has no positive (AUC: or
        no negative) in ``y_true`` (:func:`classification_metrics_with_notes` explains those).

    Raises:
        DataError: Malformed inputs.
    """
    y, s = _validate(y_true, y_score, multilabel)
    k = s.shape[1]
    onehot = y if multilabel else np.eye(k, dtype=bool)[y]
    keys = [class_label(class_names, c) for c in range(k)]
    return {
        "auc": {keys[c]: roc_auc(onehot[:, c], s[:, c]) for c in range(k)},
        "ap": {keys[c]: average_precision(onehot[:, c], s[:, c]) for c in range(k)},
    }


def dice_jaccard(pred: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Dice and Jaccard of every image and class of integer label maps.

    For image ``i`` and class ``c`` with predicted region ``P`` and true region ``T``:
    ``Dice = 2|P ∩ T| / (|P| + |T|)`` and ``Jaccard = |P ∩ T| / |P ∪ T|``. When the class is absent from both
    the prediction and the ground truth the value is ``NaN`` (nothing to segment, nothing predicted: neither
    a success nor a failure); a class predicted where the ground truth has none scores 0.

    Args:
        pred: ``(N, *spatial)`` integer predicted labels in ``[0, num_classes)``.
        target: ``(N, *spatial)`` integer true labels, same shape.
        num_classes: ``K``, including the background class 0.

    Returns:
        ``(dice, jaccard)``, each ``(N, K)`` float64.

    Raises:
        DataError: Shapes differ, no images, or labels outside ``[0, num_classes)``.
    """
    p = np.asarray(pred)
    t = np.asarray(target)
    if p.shape != t.shape or p.ndim < 2:
        raise DataError(f"pred and target must be (N, *spatial) label maps of one shape, got {p.shape} and {t.shape}")
    if p.shape[0] == 0:
        raise DataError("cannot compute Dice on an empty set of images (N = 0)")
    if num_classes < 2:
        raise DataError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    for name, a in (("pred", p), ("target", t)):
        if not np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
            raise DataError(f"{name} must hold integer class labels, got dtype {a.dtype}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= num_classes):
            raise DataError(f"{name} has labels in [{int(a.min())}, {int(a.max())}], outside [0, {num_classes})")
    n, k = p.shape[0], int(num_classes)
    p = p.reshape(n, -1).astype(np.int64)
    t = t.reshape(n, -1).astype(np.int64)
    offset = np.arange(n, dtype=np.int64)[:, None] * k
    size_p = np.bincount((offset + p).ravel(), minlength=n * k).reshape(n, k).astype(np.float64)
    size_t = np.bincount((offset + t).ravel(), minlength=n * k).reshape(n, k).astype(np.float64)
    same = p == t
    inter = np.bincount((offset + t)[same], minlength=n * k).reshape(n, k).astype(np.float64)
    total = size_p + size_t
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * inter / total, np.nan)
        jaccard = np.where(total > 0, inter / (total - inter), np.nan)
    return dice, jaccard


def segmentation_metrics_with_notes(
    dice: np.ndarray,
    jaccard: np.ndarray,
    class_names: Sequence[str] | None = None,
    foreground: Sequence[int] | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]], list[str]]:
    """Mean Dice / Jaccard over images per class, and over the foreground classes.

    Args:
        dice: ``(N, K)`` per-image Dice from :func:`dice_jaccard` (``NaN`` = class in neither map).
        jaccard: ``(N, K)`` per-image Jaccard.
        class_names: Optional class names (keys of the per-class results; default the index).
        foreground: Classes averaged into ``dice`` / ``jaccard`` (default every class but 0, the background).

    Returns:
        ``(metrics, per_class, notes)``: ``metrics`` = ``{"dice", "jaccard"}``, the mean over foreground classes
        of each class's mean over the images where it is defined; ``per_class`` = ``{"dice": {class: v},
        "jaccard": {class: v}}`` for every class (background included); ``notes`` explain NaN values and
        images left out.
    """
    d = np.asarray(dice, dtype=np.float64)
    j = np.asarray(jaccard, dtype=np.float64)
    if d.ndim != 2 or d.shape != j.shape:
        raise DataError(f"dice and jaccard must be (N, K) arrays of one shape, got {d.shape} and {j.shape}")
    n, k = d.shape
    fg = list(range(1, k)) if foreground is None else [int(c) for c in foreground]
    defined = ~np.isnan(d)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        class_dice = np.nanmean(d, axis=0) if n else np.full(k, np.nan)
        class_jac = np.nanmean(j, axis=0) if n else np.full(k, np.nan)
    notes: list[str] = []
    for c in fg:
        name = _name(class_names, c, "class")
        n_def = int(defined[:, c].sum())
        if n_def == 0:
            notes.append(f"dice/jaccard of {name} are NaN: it is in neither the ground truth nor the prediction "
                         "of any image")
        elif n_def < n:
            notes.append(f"dice/jaccard of {name}: {n - n_def} of {n} images have it in neither the ground truth "
                         f"nor the prediction; averaged over the other {n_def}")
    fg_dice = [class_dice[c] for c in fg if not math.isnan(class_dice[c])]
    fg_jac = [class_jac[c] for c in fg if not math.isnan(class_jac[c])]
    metrics = {
        "dice": float(np.mean(fg_dice)) if fg_dice else math.nan,
        "jaccard": float(np.mean(fg_jac)) if fg_jac else math.nan,
    }
    keys = [class_label(class_names, c) for c in range(k)]
    per_class = {
        "dice": {keys[c]: float(class_dice[c]) for c in range(k)},
        "jaccard": {keys[c]: float(class_jac[c]) for c in range(k)},
    }
    return metrics, per_class, notes


def classification_metrics(
    y_true: np.ndarray, y_score: np.ndarray, multilabel: bool = False
) -> dict[str, float]:
    """Compute ``auc_macro``, ``ap_macro``, ``accuracy``, ``balanced_accuracy`` and ``f1_macro``.

    See the module docstring for the exact definitions and
    :func:`classification_metrics_with_notes` for the reasons behind ``NaN`` values.

    Args:
        y_true: ``(N,)`` integer class ids (binary / multi-class) or ``(N, K)`` 0/1 (multi-label).
        y_score: ``(N, K)`` probabilities (binary: two columns, column 1 the positive class).
        multilabel: Treat the problem as ``K`` independent binary labels.

    Returns:
        A dictionary of floats keyed by :data:`METRIC_NAMES`.

    Raises:
        DataError: Malformed inputs (see :func:`classification_metrics_with_notes`).
    """
    return classification_metrics_with_notes(y_true, y_score, multilabel)[0]
