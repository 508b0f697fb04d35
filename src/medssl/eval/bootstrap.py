"""Percentile bootstrap confidence intervals of test metrics, resampling patients where there are patient ids.

A test metric computed on a few hundred images is itself uncertain. The percentile bootstrap (Efron &
Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13) resamples the test items with replacement
``n_boot`` times, recomputes the metric on every resample and reports the ``(1 − level) / 2`` and
``(1 + level) / 2`` quantiles of the replicates as the interval.

Images of one patient are correlated, so when patient ids exist the *patients* are resampled (the cluster
bootstrap, Field & Welsh, JRSS-B 2007): a drawn patient brings all of its images, and the interval reflects
the number of patients rather than the number of images.

A resample is represented by its *count vector* ``w`` (how many times each item was drawn; with patients,
every item gets its patient's count), so every metric here is computed for all replicates at once as a
weighted metric with integer weights, which equals the metric on the resample with the items repeated:

* ROC AUC: Mann-Whitney over tie groups of the scores, ``Σ w⁺ (W⁻_below + ½ W⁻_tied) / (W⁺ W⁻)``;
* AP: ``Σ_groups (TP_g / P) · precision_g`` over distinct thresholds from the highest score down;
* accuracy, balanced accuracy, F1, sensitivity, specificity: weighted confusion counts;
* segmentation: weighted means of the per-image Dice / Jaccard values.

Replicates where a metric is undefined (e.g. a resample without positives) are left out of the quantiles;
:func:`percentile_ci` gives ``NaN`` when fewer than half of the replicates are defined.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from medssl.errors import ConfigError, DataError
from medssl.eval.metrics import check_classification_inputs, metric_names

DEFAULT_N_BOOT = 1000
"""Bootstrap replicates used by the evaluation protocols."""

DEFAULT_LEVEL = 0.95
"""Coverage of the intervals."""

_CHUNK_ELEMENTS = 1 << 22
"""Replicates are processed in chunks of about this many weight entries (memory bound)."""


def resample_counts(
    n: int, n_boot: int, seed: int, groups: Sequence[object] | np.ndarray | None = None
) -> np.ndarray:
    """How many times each of ``n`` items is drawn in each of ``n_boot`` bootstrap resamples.

    Args:
        n: Number of items.
        n_boot: Number of resamples.
        seed: Seed (the counts are a pure function of ``(n, n_boot, seed, groups)``).
        groups: Optional ``(n,)`` cluster ids (patient ids): clusters are drawn with replacement and every item
            gets the count of its cluster, so a patient's items are always drawn together.

    Returns:
        ``(n_boot, n)`` int64 counts; each row sums to ``n`` (without groups) or to the number of items of the
        drawn clusters.

    Raises:
        ConfigError: ``n_boot < 1``.
        DataError: ``n < 1`` or ``groups`` of the wrong length.
    """
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if n < 1:
        raise DataError("cannot bootstrap an empty test set")
    rng = np.random.default_rng([int(seed), 0xB007])
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.int64)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise DataError(f"groups must have one id per item ({n}), got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    m = int(inverse.max()) + 1
    cluster_counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot)
    return cluster_counts[:, inverse].astype(np.int64)


def percentile_ci(replicates: np.ndarray, level: float = DEFAULT_LEVEL) -> list[float]:
    """``[lo, hi]``: the two-sided percentile interval of the defined (non-NaN) replicates.

    ``[NaN, NaN]`` when fewer than half of the replicates are defined (the metric is mostly undefined on
    resamples of this test set, so an interval would mislead).
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must lie in (0, 1), got {level}")
    r = np.asarray(replicates, dtype=np.float64).ravel()
    ok = r[~np.isnan(r)]
    if ok.size == 0 or ok.size < 0.5 * r.size:
        return [math.nan, math.nan]
    lo, hi = np.quantile(ok, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(lo), float(hi)]


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    groups: Sequence[object] | np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> list[float]:
    """Percentile interval of any statistic of the items, one call per replicate (slow but general).

    Args:
        statistic: Maps an index array into the items (a resample, with repeats) to a float (``NaN`` allowed).
        n: Number of items.
        groups: Optional cluster ids (see :func:`resample_counts`).
        n_boot: Replicates.
        seed: Seed; the same ``(n, n_boot, seed, groups)`` draw the same resamples as the vectorised
            :func:`classification_ci` and :func:`segmentation_ci`.
        level: Coverage.

    Returns:
        ``[lo, hi]`` (see :func:`percentile_ci`).
    """
    counts = resample_counts(n, n_boot, seed, groups)
    items = np.arange(n)
    values = np.array([statistic(np.repeat(items, row)) for row in counts], dtype=np.float64)
    return percentile_ci(values, level)


# -- weighted metrics, vectorised over replicates ----------------------------------------------------------------
def _groups_of(sorted_scores: np.ndarray) -> np.ndarray:
    """Start index of every run of tied values in a sorted 1-D array."""
    return np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]


def weighted_roc_auc(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one binary problem under each row of ``weights`` (ties count ½).

    Args:
        y_true: ``(n,)`` bool / 0-1 labels.
        y_score: ``(n,)`` scores.
        weights: ``(B, n)`` non-negative item weights (bootstrap counts).

    Returns:
        ``(B,)`` AUCs; ``NaN`` where a row gives no weight to positives or to negatives.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    starts = _groups_of(s[order])
    ws = w[:, order]
    ys = y[order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)
    neg = np.add.reduceat(ws * ~ys, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    denom = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), np.nan)


def weighted_average_precision(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision of one binary problem under each row of ``weights``.

    Returns:
        ``(B,)`` APs; ``NaN`` where a row gives no weight to positives.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    starts = _groups_of(s[order])
    ws = w[:, order]
    tp = np.add.reduceat(ws * y[order], starts, axis=1)
    tot = np.add.reduceat(ws, starts, axis=1)
    ctp, ctot = np.cumsum(tp, axis=1), np.cumsum(tot, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(ctot > 0, ctp / np.where(ctot > 0, ctot, 1.0), 0.0)
        n_pos = tp.sum(axis=1)
        ap = (tp * precision).sum(axis=1) / np.where(n_pos > 0, n_pos, 1.0)
    return np.where(n_pos > 0, ap, np.nan)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _f1_macro(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Macro F1 over the classes with ``2tp + fp + fn > 0`` in each replicate; ``(B, K)`` counts in."""
    return _nanmean(_ratio(2 * tp, 2 * tp + fp + fn), axis=1)


def _classification_replicates(
    y: np.ndarray, s: np.ndarray, multilabel: bool, w: np.ndarray, names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    from medssl.eval.metrics import MULTILABEL_THRESHOLD

    n, k = s.shape
    out: dict[str, np.ndarray] = {}
    onehot = y if multilabel else np.eye(k, dtype=bool)[y]
    if not multilabel and k == 2:
        out["auc_macro"] = out["auc_micro"] = weighted_roc_auc(y == 1, s[:, 1], w)
        out["ap_macro"] = out["ap_micro"] = weighted_average_precision(y == 1, s[:, 1], w)
    else:
        aucs = np.stack([weighted_roc_auc(onehot[:, c], s[:, c], w) for c in range(k)], axis=1)
        aps = np.stack([weighted_average_precision(onehot[:, c], s[:, c], w) for c in range(k)], axis=1)
        out["auc_macro"], out["ap_macro"] = _nanmean(aucs, 1), _nanmean(aps, 1)
        wf = np.repeat(w, k, axis=1)  # item i's weight for each of its k entries (row-major flattening)
        out["auc_micro"] = weighted_roc_auc(onehot.ravel(), s.ravel(), wf)
        out["ap_micro"] = weighted_average_precision(onehot.ravel(), s.ravel(), wf)
    total = w.sum(axis=1)
    if multilabel:
        pred = s >= MULTILABEL_THRESHOLD
        out["accuracy"] = _ratio(w @ np.all(pred == y, axis=1).astype(np.float64), total)
        pos_rec = _ratio(w @ (pred & y).astype(np.float64), w @ y.astype(np.float64))
        neg_rec = _ratio(w @ (~pred & ~y).astype(np.float64), w @ (~y).astype(np.float64))
        out["balanced_accuracy"] = _nanmean(_nanmean(np.stack([pos_rec, neg_rec]), axis=0), axis=1)
        tp = w @ (pred & y).astype(np.float64)
        fp = w @ (pred & ~y).astype(np.float64)
        fn = w @ (~pred & y).astype(np.float64)
    else:
        pred_1h = np.eye(k, dtype=bool)[np.argmax(s, axis=1)]
        out["accuracy"] = _ratio(w @ (np.argmax(s, axis=1) == y).astype(np.float64), total)
        tp = w @ (pred_1h & onehot).astype(np.float64)
        fp = w @ (pred_1h & ~onehot).astype(np.float64)
        fn = w @ (~pred_1h & onehot).astype(np.float64)
        recall = _ratio(tp, tp + fn)  # NaN for classes absent from the replicate
        out["balanced_accuracy"] = _nanmean(recall, axis=1)
        if k == 2:
            out["sensitivity"], out["specificity"] = recall[:, 1], recall[:, 0]
    out["f1_macro"] = _f1_macro(tp, fp, fn)
    return {name: out[name] for name in names}


def classification_replicates(
    y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray, multilabel: bool = False
) -> dict[str, np.ndarray]:
    """Every metric of :func:`medssl.eval.metrics.classification_metrics` under each row of ``weights``.

    With a row of ones the values equal the point metrics; with integer counts they equal the metrics of the
    resample with repeated items.

    Returns:
        Metric name -> ``(B,)`` values (``NaN`` where undefined in a replicate).
    """
    y, s = check_classification_inputs(y_true, y_score, multilabel)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != s.shape[0]:
        raise DataError(f"weights must be (B, {s.shape[0]}), got shape {w.shape}")
    names = metric_names(s.shape[1], multilabel)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, s.size))
    parts = [_classification_replicates(y, s, multilabel, w[i : i + chunk], names) for i in range(0, len(w), chunk)]
    return {name: np.concatenate([p[name] for p in parts]) for name in names}


def classification_ci(
    y_true: np.ndarray,
    y_score: np.ndarray,
    multilabel: bool = False,
    *,
    groups: Sequence[object] | np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every classification metric on a test set.

    Args:
        y_true: ``(N,)`` class ids or ``(N, K)`` 0/1 labels.
        y_score: ``(N, K)`` scores.
        multilabel: Multi-label task.
        groups: Optional ``(N,)`` patient ids: patients are resampled instead of images.
        n_boot: Replicates (1000 by default; all computed at once, a fraction of a second for ~1000 items).
        seed: Seed of the resampling.
        level: Coverage (0.95).

    Returns:
        Metric name -> ``[lo, hi]`` (``[NaN, NaN]`` when the metric is undefined on most resamples).
    """
    n = int(np.asarray(y_score).shape[0]) if np.asarray(y_score).ndim == 2 else 0
    counts = resample_counts(n, n_boot, seed, groups)
    reps = classification_replicates(y_true, y_score, counts, multilabel)
    return {name: percentile_ci(v, level) for name, v in reps.items()}


def segmentation_ci(
    dice: np.ndarray,
    jaccard: np.ndarray,
    foreground: Sequence[int] | None = None,
    *,
    groups: Sequence[object] | np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of mean foreground Dice and Jaccard over test images.

    Each replicate recomputes :func:`medssl.eval.metrics.segmentation_metrics_with_notes`' definition (per
    class the mean over images where it is defined, then the mean over foreground classes) with the images'
    bootstrap counts as weights.

    Args:
        dice: ``(N, K)`` per-image Dice (``NaN`` = undefined).
        jaccard: ``(N, K)`` per-image Jaccard.
        foreground: Classes averaged (default all but 0).
        groups: Optional ``(N,)`` patient ids.
        n_boot: Replicates.
        seed: Seed.
        level: Coverage.

    Returns:
        ``{"dice": [lo, hi], "jaccard": [lo, hi]}``.
    """
    d = np.asarray(dice, dtype=np.float64)
    j = np.asarray(jaccard, dtype=np.float64)
    if d.ndim != 2 or d.shape != j.shape:
        raise DataError(f"dice and jaccard must be (N, K) arrays of one shape, got {d.shape} and {j.shape}")
    fg = list(range(1, d.shape[1])) if foreground is None else [int(c) for c in foreground]
    w = resample_counts(d.shape[0], n_boot, seed, groups).astype(np.float64)
    out = {}
    for name, v in (("dice", d[:, fg]), ("jaccard", j[:, fg])):
        ok = ~np.isnan(v)
        per_class = _ratio(w @ np.where(ok, v, 0.0), w @ ok.astype(np.float64))  # (B, F)
        out[name] = percentile_ci(_nanmean(per_class, axis=1), level)
    return out
