"""Plots of a run for the HTML report, as PNG bytes (matplotlib's object-oriented API on the Agg canvas: no
display, no change of the global backend)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure(width: float = 5.2, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def read_metrics_csv(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a run's ``metrics.csv`` as float arrays (empty cells are ``NaN``)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    cols: dict[str, np.ndarray] = {}
    for name in rows[0]:
        vals = []
        for r in rows:
            try:
                vals.append(float(r.get(name) or "nan"))
            except ValueError:
                vals.append(math.nan)
        cols[name] = np.asarray(vals, dtype=np.float64)
    return cols


def line_plot(x: np.ndarray, series: Mapping[str, np.ndarray], *, title: str, xlabel: str = "step",
              ylabel: str = "", logy: bool = False) -> bytes | None:
    """Lines of ``series`` against ``x`` (NaNs skipped); ``None`` when no series has a finite value."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for name, y in series.items():
        ok = np.isfinite(y) & np.isfinite(x)
        if logy:
            ok &= y > 0
        if not ok.any():
            continue
        ax.plot(x[ok], y[ok], marker="o" if ok.sum() < 3 else None, markersize=3, linewidth=1.2, label=name)
        drawn += 1
    if not drawn:
        return None
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def roc_pr_plot(y_true: np.ndarray, scores: np.ndarray, *, title: str,
                class_names: Sequence[str] | None = None) -> bytes:
    """ROC and precision-recall curves (scikit-learn): the positive class for binary tasks, one curve per class
    (one-vs-rest) for multi-class and multi-label ones; the legend carries each curve's AUC / AP."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = np.stack([1 - s, s], axis=1)
    k = s.shape[1]
    if y.ndim == 1:
        onehot = np.zeros((y.size, k), dtype=np.int64)
        onehot[np.arange(y.size), y.astype(np.int64)] = 1
    else:
        onehot = y.astype(np.int64)
    classes = [1] if (y.ndim == 1 and k == 2) else list(range(k))
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    fig = _figure(9.0, 3.6)
    ax_roc, ax_pr = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for c in classes:
        t = onehot[:, c]
        if t.min() == t.max():  # a class absent from (or alone in) the test split: no curve
            continue
        fpr, tpr, _ = roc_curve(t, s[:, c])
        prec, rec, _ = precision_recall_curve(t, s[:, c])
        ax_roc.plot(fpr, tpr, linewidth=1.2, label=f"{names[c]} (AUC {auc(fpr, tpr):.3f})")
        ax_pr.plot(rec, prec, linewidth=1.2, label=f"{names[c]} (AP {average_precision_score(t, s[:, c]):.3f})")
    ax_roc.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {title}")
    ax_pr.set(xlabel="recall", ylabel="precision", title=f"PR: {title}")
    for ax in (ax_roc, ax_pr):
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _png(fig)
