"""Linear probe: L2-regularised logistic regression on standardised frozen features.

The standard linear evaluation of self-supervised encoders (e.g. Chen et al., 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", SimCLR, Appendix B.6; Kornblith et al., 2019, "Do Better
ImageNet Models Transfer Better?"): features are frozen, standardised with statistics of the training
subset only, and a logistic regression is fit with L-BFGS. The inverse regularisation strength ``C`` is
chosen on the validation split by macro ROC AUC from :data:`DEFAULT_C_GRID` (ties, frequent on tiny
validation subsets, go to the value closest to :data:`DEFAULT_C`); without usable validation labels
:data:`DEFAULT_C` is used. The model trained on the training subset with the chosen ``C`` is used as
is (no refit on train + val), so validation labels never enter the fit.

Low-label subsets can miss classes. The probe then fits only the classes it has seen and gives the missing
classes probability 0 (the returned rows are renormalised to sum to 1), so the output always has
``num_classes`` columns. A training subset with a single class yields constant probabilities (all mass on
that class); a multi-label column that is constant in the training subset yields that constant (0 or 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medssl.errors import ConfigError, DataError
from medssl.eval.metrics import classification_metrics

DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Inverse L2 strengths tried when validation labels are available (log-spaced, 5 values)."""

DEFAULT_C = 1.0
"""Inverse L2 strength used without usable validation labels (scikit-learn's default)."""

DEFAULT_MAX_ITER = 1000
"""L-BFGS iteration cap per fit."""


@dataclass
class LinearProbeResult:
    """Output of :func:`fit_linear_probe`.

    Attributes:
        probs: ``(n_test, num_classes)`` test probabilities.
        params: The chosen ``C`` and how it was chosen (``"val_auc_macro"`` or ``"default"``), and the
            validation AUC of every ``C`` tried.
        notes: Caveats: classes missing from the training subset, non-converged fits, why no selection.
    """

    probs: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_features(
    name: str, x: np.ndarray, dim: int | None = None, dtype: type[np.floating] | None = np.float64
) -> np.ndarray:
    """Validate a feature matrix: 2-D, non-empty, real, finite, optionally of width ``dim``.

    Args:
        name: Name used in error messages.
        x: Candidate ``(n, D)`` array.
        dim: Required feature width, if known.
        dtype: Floating type to return (no copy when ``x`` already has it); ``None`` keeps ``x``'s dtype.

    Returns:
        ``x`` as an array of ``dtype``.

    Raises:
        DataError: When any condition fails.
    """
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty (n, D) feature matrix, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DataError(f"{name} has {arr.shape[1]} feature dimensions but the training features have {dim}")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    # A float64 sum of float32/float64 features is finite iff every entry is (no overflow, NaN/inf propagate)
    # and needs no (n, D) temporary.
    if not np.isfinite(np.sum(arr, dtype=np.float64)):
        raise DataError(f"{name} contains non-finite values (NaN or inf)")
    return arr if dtype is None else arr.astype(dtype, copy=False)


def check_labels(name: str, y: np.ndarray, n: int, num_classes: int, multilabel: bool) -> np.ndarray:
    """Validate labels for ``n`` samples: ``(n,)`` ids in ``[0, num_classes)`` or ``(n, num_classes)`` 0/1.

    Args:
        name: Name used in error messages.
        y: Candidate labels.
        n: Expected number of samples.
        num_classes: Number of classes (multi-class) or labels (multi-label).
        multilabel: Which of the two layouts is expected.

    Returns:
        int64 class ids or a 0/1 int64 matrix.

    Raises:
        DataError: When shape or values do not fit.
    """
    arr = np.asarray(y)
    if multilabel:
        if arr.shape != (n, num_classes):
            raise DataError(f"{name} must have shape {(n, num_classes)} (multi-label 0/1), got {arr.shape}")
        if not np.all((arr == 0) | (arr == 1)):
            raise DataError(f"{name} must contain only 0 and 1 in multi-label mode")
        return arr.astype(np.int64)
    if arr.shape != (n,):
        raise DataError(f"{name} must have shape ({n},) (one class id per sample), got {arr.shape}")
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0)):
        raise DataError(f"{name} must contain integer class ids")
    ids = arr.astype(np.int64)
    if ids.min() < 0 or ids.max() >= num_classes:
        raise DataError(f"{name} has class ids in [{ids.min()}, {ids.max()}] but num_classes = {num_classes}")
    return ids


def _has_two_classes(y: np.ndarray, multilabel: bool) -> bool:
    if multilabel:
        pos = y.sum(axis=0)
        return bool(np.any((pos > 0) & (pos < y.shape[0])))
    return np.unique(y).size >= 2


def _fit_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    targets: list[np.ndarray],
    *,
    c: float,
    multilabel: bool,
    num_classes: int,
    seed: int,
    max_iter: int,
    notes: list[str],
) -> list[np.ndarray]:
    """Fit one (multinomial, or per-label binary) LR with strength ``c`` and predict every target matrix."""
    # sklearn is imported here, not at the top: the command line starts without it
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    outs = [np.zeros((t.shape[0], num_classes), dtype=np.float64) for t in targets]

    def fit(y: np.ndarray) -> LogisticRegression:
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(train_x, y)
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                notes.append(f"linear: L-BFGS did not converge in {max_iter} iterations (C={c:g})")
            else:
                warnings.warn(w.message, w.category, stacklevel=2)
        return model

    if multilabel:
        for j in range(num_classes):
            col = train_y[:, j]
            if col.min() == col.max():
                for out in outs:
                    out[:, j] = float(col[0])
                continue
            model = fit(col)
            for out, t in zip(outs, targets, strict=True):
                out[:, j] = model.predict_proba(t)[:, 1]
        return outs

    present = np.unique(train_y)
    if present.size == 1:
        for out in outs:
            out[:, present[0]] = 1.0
        return outs
    model = fit(train_y)
    for out, t in zip(outs, targets, strict=True):
        out[:, model.classes_] = model.predict_proba(t)
        out /= out.sum(axis=1, keepdims=True)
    return outs


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    multilabel: bool = False,
    num_classes: int,
    seed: int = 0,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    default_c: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
    class_names: Sequence[str] | None = None,
) -> LinearProbeResult:
    """Linear probe returning probabilities plus the chosen ``C`` and caveats.

    Same arguments as :func:`linear_probe`, plus ``class_names`` for readable notes.

    Returns:
        A :class:`LinearProbeResult`.

    Raises:
        ConfigError: Invalid ``num_classes``, ``c_grid``, ``default_c`` or only one of ``val_x`` / ``val_y``.
        DataError: Malformed features or labels.
    """
    if num_classes < (1 if multilabel else 2):
        raise ConfigError(
            f"num_classes must be >= 2 for classification (>= 1 label if multilabel), got {num_classes}"
        )
    if (val_x is None) != (val_y is None):
        raise ConfigError("pass both val_x and val_y, or neither")
    grid = [float(c) for c in c_grid]
    if not grid or any(not math.isfinite(c) or c <= 0 for c in grid + [float(default_c)]):
        raise ConfigError(
            f"C values must be finite and > 0; got c_grid={list(c_grid)}, default_c={default_c}"
        )
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")

    xtr = check_features("train_x", train_x)
    dim = xtr.shape[1]
    ytr = check_labels("train_y", train_y, xtr.shape[0], num_classes, multilabel)
    xte = check_features("test_x", test_x, dim)
    notes: list[str] = []

    def label(c: int) -> str:
        kind = "label" if multilabel else "class"
        if class_names is not None and c < len(class_names):
            return f"{kind} {c} ({class_names[c]!r})"
        return f"{kind} {c}"

    if multilabel:
        pos = ytr.sum(axis=0)
        constant = [c for c in range(num_classes) if pos[c] in (0, ytr.shape[0])]
        if constant:
            notes.append(
                "linear: "
                + ", ".join(label(c) for c in constant)
                + " constant in the training subset; predicted as that constant"
            )
    else:
        missing = np.setdiff1d(np.arange(num_classes), ytr)
        if missing.size:
            notes.append(
                "linear: "
                + ", ".join(label(int(c)) for c in missing)
                + " absent from the training subset; predicted with probability 0"
            )
        if np.unique(ytr).size == 1:
            notes.append(
                f"linear: the training subset has a single class; constant prediction of {label(int(ytr[0]))}"
            )

    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr)
    xtr_s, xte_s = scaler.transform(xtr), scaler.transform(xte)
    kwargs: dict[str, Any] = dict(
        multilabel=multilabel, num_classes=num_classes, seed=seed, max_iter=max_iter
    )

    reason = None
    if val_x is None or val_y is None:
        reason = "no validation split"
    else:
        xva = check_features("val_x", val_x, dim)
        yva = check_labels("val_y", val_y, xva.shape[0], num_classes, multilabel)
        if not _has_two_classes(yva, multilabel):
            reason = "the validation labels have a single class"
        elif not _has_two_classes(ytr, multilabel):
            reason = "the training subset has a single class"
    if reason is not None:
        (probs,) = _fit_predict(xtr_s, ytr, [xte_s], c=default_c, notes=notes, **kwargs)
        notes.append(f"linear: C={default_c:g} (default; not selected because {reason})")
        return LinearProbeResult(
            probs, {"C": float(default_c), "c_selection": "default"}, list(dict.fromkeys(notes))
        )

    xva_s = scaler.transform(xva)
    val_auc: dict[str, float] = {}
    fits: list[tuple[tuple[float, float, float], float, np.ndarray, list[str]]] = []
    for c in grid:
        fit_notes: list[str] = []
        pv, pt = _fit_predict(xtr_s, ytr, [xva_s, xte_s], c=c, notes=fit_notes, **kwargs)
        auc = classification_metrics(yva, pv, multilabel)["auc_macro"]
        val_auc[f"{c:g}"] = auc
        # Highest AUC; ties (common on tiny validation subsets) go to the C closest to default_c in
        # log scale, then to the smaller C.
        rank = (-math.inf if math.isnan(auc) else round(auc, 12), -abs(math.log(c / default_c)), -c)
        fits.append((rank, c, pt, fit_notes))
    _, c_best, probs, fit_notes = max(fits, key=lambda fit: fit[0])
    params = {"C": c_best, "c_selection": "val_auc_macro", "val_auc_macro": val_auc}
    # Convergence notes of the chosen C only; multi-label fits may repeat one note per label.
    return LinearProbeResult(probs, params, notes + list(dict.fromkeys(fit_notes)))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    multilabel: bool = False,
    num_classes: int,
    seed: int = 0,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    default_c: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
) -> np.ndarray:
    """Fit a logistic-regression probe on standardised frozen features and predict test probabilities.

    ``StandardScaler`` is fit on ``train_x`` only. ``C`` is chosen from ``c_grid`` by the validation macro
    ROC AUC when ``val_x`` / ``val_y`` are given and both the validation labels and the training subset have
    at least two classes (multi-label: at least one label with both values); ties go to the ``C`` closest to
    ``default_c`` (log scale), then to the smaller one.
    Otherwise ``default_c`` is used. Multi-label problems fit one binary LR per label with a shared ``C``.

    Args:
        train_x: ``(n_train, D)`` training features.
        train_y: ``(n_train,)`` class ids or ``(n_train, num_classes)`` 0/1 labels.
        test_x: ``(n_test, D)`` features to predict.
        multilabel: Multi-label mode.
        num_classes: Number of classes / labels, i.e. output columns.
        seed: ``random_state`` of the solver.
        val_x: Optional validation features for choosing ``C``.
        val_y: Labels of ``val_x``.
        c_grid: Candidate inverse regularisation strengths.
        default_c: ``C`` used when no selection is possible.
        max_iter: L-BFGS iteration cap.

    Returns:
        ``(n_test, num_classes)`` probabilities. Multi-class rows sum to 1 and classes absent from the
        training subset get 0; multi-label columns are independent per-label probabilities.

    Raises:
        ConfigError: Invalid hyper-parameters.
        DataError: Malformed features or labels.
    """
    return fit_linear_probe(
        train_x,
        train_y,
        test_x,
        multilabel=multilabel,
        num_classes=num_classes,
        seed=seed,
        val_x=val_x,
        val_y=val_y,
        c_grid=c_grid,
        default_c=default_c,
        max_iter=max_iter,
    ).probs
