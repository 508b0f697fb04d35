"""Weighted k-nearest-neighbour classifier on frozen features.

Wu et al., 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (InstDisc),
Sec. 3.4: features are L2-normalised, the ``k`` training samples with the highest cosine similarity ``s_i``
vote with weight ``exp(s_i / T)``, and the score of class ``c`` is the summed weight of the neighbours of
class ``c``. Scores are normalised to probabilities (divided by the total weight). In multi-label mode the
prediction is the weighted mean of the neighbours' 0/1 label vectors.

Similarities are computed in chunks of test rows so memory stays bounded (about ``chunk_size x n_train``
floats at a time). Before exponentiating, each row's largest similarity is subtracted; this cancels in
the normalisation and keeps ``exp`` finite for small temperatures.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medssl.errors import ConfigError
from medssl.eval.linear import check_features, check_labels

DEFAULT_K = 20
"""Neighbours used by default (solo-learn's online kNN default; InstDisc used 200 on ImageNet)."""

DEFAULT_TEMPERATURE = 0.07
"""Temperature of the vote weights ``exp(s / T)`` (InstDisc)."""

_MAX_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    multilabel: bool = False,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Predict class probabilities with the temperature-weighted kNN of InstDisc.

    Args:
        train_x: ``(n_train, D)`` training features (any scale; they are L2-normalised here).
        train_y: ``(n_train,)`` class ids or ``(n_train, num_classes)`` 0/1 labels.
        test_x: ``(n_test, D)`` features to classify.
        num_classes: Number of classes / labels, i.e. output columns.
        k: Neighbours per query; ``min(k, n_train)`` are used.
        temperature: ``T`` in the vote weight ``exp(s / T)``.
        multilabel: Multi-label mode (weighted mean of neighbour label vectors).
        chunk_size: Test rows per similarity block; default keeps a block at about 16M floats.
        device: Where the similarity matrix is computed.

    Returns:
        ``(n_test, num_classes)`` float64 probabilities (multi-class rows sum to 1; multi-label entries
        are per-label probabilities in ``[0, 1]``).

    Raises:
        ConfigError: ``k < 1``, ``temperature <= 0``, ``num_classes < 1`` or ``chunk_size < 1``.
        DataError: Malformed features or labels.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    xtr_np = check_features("train_x", train_x, dtype=np.float32)
    xte_np = check_features("test_x", test_x, xtr_np.shape[1], dtype=np.float32)
    ytr_np = check_labels("train_y", train_y, xtr_np.shape[0], num_classes, multilabel)

    device = torch.device(device)
    n_train = xtr_np.shape[0]
    k_eff = min(k, n_train)
    xtr = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(xtr_np)).to(device), dim=1)
    xte = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(xte_np)).to(device), dim=1)
    if multilabel:
        ytr = torch.from_numpy(ytr_np).float().to(device)  # (n_train, K)
    else:
        ytr = torch.nn.functional.one_hot(torch.from_numpy(ytr_np).to(device), num_classes).float()
    rows = chunk_size or max(1, _MAX_CHUNK_ELEMENTS // n_train)

    out = torch.empty(xte.shape[0], num_classes, dtype=torch.float64)
    for start in range(0, xte.shape[0], rows):
        sim = xte[start : start + rows] @ xtr.T  # (b, n_train) cosine similarities
        top_sim, top_idx = sim.topk(k_eff, dim=1)  # sorted descending
        # (b, k) weights, the largest 1; votes and normalisation in float64 so rows sum to 1 exactly.
        weights = torch.exp((top_sim.double() - top_sim[:, :1].double()) / temperature)
        votes = torch.einsum("bk,bkc->bc", weights, ytr[top_idx].double())
        out[start : start + rows] = (votes / weights.sum(dim=1, keepdim=True)).cpu()
    return out.numpy()
