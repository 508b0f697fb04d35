"""Low-label evaluation protocol: label fractions x seeds for every downstream protocol.

For each label fraction (e.g. 1 %, 10 %, 100 %) and seed, a stratified subset of the training split is drawn
with :func:`medssl.data.splits.stratified_fraction` (at least ``min_per_class`` samples per class), a
protocol (linear probe, kNN, ...) is fit on that subset and scored on the full test split. The validation
split, used only to choose hyper-parameters, is subsampled with the same fraction and seed by default: a
1 % setting that tuned on a fully labelled validation set would not be a 1 % setting.

Protocols live in the :data:`PROTOCOLS` registry (:mod:`medssl.eval.registry`). A protocol is a callable
``fn(data, train_subset, seed, *, val_subset, **options) -> ProtocolOutput`` where ``data`` is the
:class:`FeatureSet` (entries registered with ``inputs="features"``) or an
:class:`~medssl.eval.images.ImageTask` (``inputs="images"``: fine-tuning, segmentation) — any object exposing
``train_y`` for stratification, ``val_y`` and ``multilabel`` —, ``train_subset`` indexes the training split,
and ``val_subset`` indexes the validation split (``None`` without one). Register new ones with
:func:`register_protocol` and the facts callers ask about (``inputs``, ``needs_labels``, ``deterministic``,
``trains``, ``help``). This module registers ``linear``, ``knn`` and ``collapse``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.data.splits import stratified_fraction
from medssl.engine.logging import TaskProgress
from medssl.errors import ConfigError, DataError
from medssl.eval import registry as _registry
from medssl.eval.bootstrap import DEFAULT_N_BOOT, classification_ci
from medssl.eval.features import extract_features
from medssl.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_predict
from medssl.eval.linear import check_features, check_labels, fit_linear_probe
from medssl.eval.metrics import classification_metrics_with_notes, per_class_metrics


@dataclass
class FeatureSet:
    """Frozen features and labels of the train / (val) / test splits of one encoder.

    Attributes:
        train_x: ``(n_train, D)`` training features.
        train_y: ``(n_train,)`` class ids or ``(n_train, K)`` 0/1 labels.
        test_x: ``(n_test, D)`` test features.
        test_y: Test labels, same layout as ``train_y``.
        val_x: Optional ``(n_val, D)`` validation features (hyper-parameter choice only).
        val_y: Validation labels.
        multilabel: Multi-label task.
        num_classes: Number of classes (multi-class / binary: 2) or labels.
        class_names: Optional class names used in notes.
        test_groups: Optional ``(n_test,)`` patient ids of the test items: bootstrap CIs resample patients.

    Raises:
        DataError: Inconsistent shapes or labels (checked on construction).
        ConfigError: Only one of ``val_x`` / ``val_y`` given.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    multilabel: bool = False
    num_classes: int = 2
    class_names: Sequence[str] | None = None
    test_groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.test_groups is not None and len(self.test_groups) != len(self.test_x):
            raise DataError(
                f"FeatureSet: test_groups has {len(self.test_groups)} ids for {len(self.test_x)} test items"
            )
        if (self.val_x is None) != (self.val_y is None):
            raise ConfigError("FeatureSet: pass both val_x and val_y, or neither")
        if self.num_classes < (1 if self.multilabel else 2):
            raise ConfigError(
                f"FeatureSet: num_classes must be >= 2 (>= 1 if multilabel), got {self.num_classes}"
            )
        dim = check_features("train_x", self.train_x, dtype=None).shape[1]
        check_labels("train_y", self.train_y, len(self.train_x), self.num_classes, self.multilabel)
        check_features("test_x", self.test_x, dim, dtype=None)
        check_labels("test_y", self.test_y, len(self.test_x), self.num_classes, self.multilabel)
        if self.val_x is not None and self.val_y is not None:
            check_features("val_x", self.val_x, dim, dtype=None)
            check_labels("val_y", self.val_y, len(self.val_x), self.num_classes, self.multilabel)


@dataclass
class ProtocolOutput:
    """What one protocol run (one fraction, one seed) reports.

    Attributes:
        metrics: Metric name -> value (``NaN`` allowed).
        notes: Human-readable caveats (missing classes, undefined metrics, ...).
        params: Hyper-parameters chosen or used (e.g. ``C`` of the linear probe, ``k`` of kNN).
        ci: Optional metric name -> ``[lo, hi]`` bootstrap 95 % interval on the test split
            (:mod:`medssl.eval.bootstrap`).
        per_class: Optional per-class values, ``{"auc": {class: v}, "ap": {...}}`` (classification) or
            ``{"dice": {...}, "jaccard": {...}}`` (segmentation).
        predictions: Optional test labels and scores ``(y_true, scores)`` the metrics were computed from
            (classification protocols), for ROC / PR curves and the user's own analysis.
    """

    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    ci: dict[str, list[float]] | None = None
    per_class: dict[str, dict[str, float]] | None = None
    predictions: tuple[np.ndarray, np.ndarray] | None = None


PROTOCOLS = _registry.PROTOCOLS
"""The protocol registry (:mod:`medssl.eval.registry`): name -> callable, with the facts of each entry."""

register_protocol = _registry.register_protocol

_FILLED_FROM_FEATURES = frozenset({"train_x", "train_y", "test_x", "multilabel", "num_classes", "seed", "val_x",
                                   "val_y", "class_names"})
"""Arguments of :func:`~medssl.eval.linear.fit_linear_probe` / :func:`~medssl.eval.knn.knn_predict` that the
``linear`` / ``knn`` protocols fill from the :class:`FeatureSet`; the rest of their keywords are options."""


def _val(data: FeatureSet, val_subset: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    if data.val_x is None or data.val_y is None or val_subset is None:
        return None, None
    return np.asarray(data.val_x)[val_subset], np.asarray(data.val_y)[val_subset]


def score_classification(
    test_y: np.ndarray,
    probs: np.ndarray,
    multilabel: bool,
    *,
    class_names: Sequence[str] | None = None,
    groups: np.ndarray | None = None,
    seed: int = 0,
    n_boot: int = DEFAULT_N_BOOT,
    notes: Sequence[str] = (),
    params: dict[str, Any] | None = None,
) -> ProtocolOutput:
    """Test metrics, per-class AUC / AP and bootstrap CIs (patients resampled when ``groups``) of predictions.

    ``n_boot=0`` skips the intervals (``ci`` stays ``None``).
    """
    metrics, metric_notes = classification_metrics_with_notes(test_y, probs, multilabel, class_names=class_names)
    ci = None
    if n_boot:
        ci = classification_ci(test_y, probs, multilabel, groups=groups, n_boot=n_boot, seed=seed)
    per_class = per_class_metrics(test_y, probs, multilabel, class_names)
    return ProtocolOutput(metrics, list(notes) + metric_notes, dict(params or {}), ci=ci, per_class=per_class,
                          predictions=(np.asarray(test_y), np.asarray(probs)))


def _score(
    data: FeatureSet, probs: np.ndarray, notes: list[str], params: dict[str, Any], seed: int = 0,
    n_boot: int = DEFAULT_N_BOOT,
) -> ProtocolOutput:
    return score_classification(data.test_y, probs, data.multilabel, class_names=data.class_names,
                                groups=data.test_groups, seed=seed, n_boot=n_boot, notes=notes, params=params)


@register_protocol("linear", inputs="features", needs_labels=True, deterministic=True,
                   help="logistic regression on the frozen features (C chosen on the budgeted validation labels)",
                   forwards_to=fit_linear_probe, filled=_FILLED_FROM_FEATURES)
def linear_protocol(
    data: FeatureSet,
    train_subset: np.ndarray,
    seed: int,
    *,
    val_subset: np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    **options: Any,
) -> ProtocolOutput:
    """Linear probe (:func:`medssl.eval.linear.fit_linear_probe`) on a training subset.

    Args:
        data: Features and labels.
        train_subset: Indices into the training split.
        seed: Solver seed.
        val_subset: Indices into the validation split used to choose ``C`` (``None``: default ``C``).
        n_boot: Bootstrap replicates of the test CIs (0: none).
        **options: ``c_grid``, ``default_c``, ``max_iter``.

    Returns:
        Test metrics, notes and the chosen ``C`` with the number of validation labels used (``n_val``).
    """
    val_x, val_y = _val(data, val_subset)
    result = fit_linear_probe(
        np.asarray(data.train_x)[train_subset],
        np.asarray(data.train_y)[train_subset],
        data.test_x,
        multilabel=data.multilabel,
        num_classes=data.num_classes,
        seed=seed,
        val_x=val_x,
        val_y=val_y,
        class_names=data.class_names,
        **options,
    )
    params = {**result.params, "n_val": 0 if val_x is None else len(val_x)}
    return _score(data, result.probs, result.notes, params, seed, n_boot)


@register_protocol("knn", inputs="features", needs_labels=True, deterministic=True,
                   help="temperature-weighted k-nearest neighbours on the frozen features (k=20, T=0.07)",
                   forwards_to=knn_predict, filled=_FILLED_FROM_FEATURES)
def knn_protocol(
    data: FeatureSet,
    train_subset: np.ndarray,
    seed: int,
    *,
    val_subset: np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    **options: Any,
) -> ProtocolOutput:
    """Weighted kNN (:func:`medssl.eval.knn.knn_predict`) with the training subset as memory bank.

    kNN is deterministic, so ``seed`` only matters through the subset; ``val_subset`` is unused (``k`` and
    ``T`` are fixed, not tuned).

    Args:
        data: Features and labels.
        train_subset: Indices into the training split.
        seed: Seed of the bootstrap CIs only (kNN itself is deterministic).
        val_subset: Unused.
        n_boot: Bootstrap replicates of the test CIs (0: none).
        **options: ``k``, ``temperature``, ``chunk_size``, ``device``.

    Returns:
        Test metrics, notes and the ``k`` / ``T`` used.
    """
    del val_subset
    train_y = np.asarray(data.train_y)[train_subset]
    probs = knn_predict(
        np.asarray(data.train_x)[train_subset],
        train_y,
        data.test_x,
        num_classes=data.num_classes,
        multilabel=data.multilabel,
        **options,
    )
    k = int(options.get("k", DEFAULT_K))
    notes = []
    if k > len(train_subset):
        notes.append(
            f"knn: k={k} exceeds the {len(train_subset)} training samples; k={len(train_subset)} used"
        )
    params = {
        "k": min(k, len(train_subset)),
        "temperature": float(options.get("temperature", DEFAULT_TEMPERATURE)),
    }
    return _score(data, probs, notes, params, seed, n_boot)


def _collapse_whole_dataset(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``evaluate --protocol collapse``: every image of the dataset once
    (:func:`~medssl.eval.collapse.evaluate_collapse`)."""
    from medssl.eval.collapse import evaluate_collapse

    return evaluate_collapse(*args, **kwargs)


@register_protocol("collapse", inputs="features", needs_labels=False, deterministic=True,
                   help="spectrum, effective rank and std of the features of every image, and a plot "
                   "(no labels needed)",
                   whole_dataset=_collapse_whole_dataset)
def collapse_protocol(
    data: FeatureSet,
    train_subset: np.ndarray,
    seed: int,
    *,
    val_subset: np.ndarray | None = None,
) -> ProtocolOutput:
    """Collapse diagnostics (:mod:`medssl.eval.collapse`) of the features; labels are not used.

    The features of the training subset, the validation split and the test split are measured together.

    Returns:
        Metrics ``eff_rank`` (effective rank), ``std`` (std of L2-normalised features × √d), ``dim``, ``n``;
        params ``spectrum`` (eigenvalues of the feature covariance, decreasing).
    """
    from medssl.eval.collapse import collapse_stats

    del seed, val_subset
    parts = [np.asarray(data.train_x)[train_subset], np.asarray(data.test_x)]
    if data.val_x is not None:
        parts.append(np.asarray(data.val_x))
    st = collapse_stats(np.concatenate(parts, axis=0))
    metrics = {"eff_rank": st.effective_rank, "std": st.std, "dim": float(st.dim), "n": float(st.num_samples)}
    return ProtocolOutput(metrics, [], {"spectrum": [float(v) for v in st.spectrum]})


_OWN_ARGS = frozenset({"data", "train_subset", "seed", "val_subset"})


def _keywords(fn: Any) -> tuple[set[str], bool]:
    """The named parameters of ``fn`` and whether it also takes ``**kwargs``."""
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_options(protocol: str, options: dict[str, Any]) -> None:
    """Reject options the protocol (or the function it forwards ``**options`` to, its entry's ``forwards_to``)
    does not accept.

    Raises:
        ConfigError: Unknown protocol, or the unknown options with the accepted ones.
    """
    entry = _registry.protocol_entry(protocol)
    own, takes_any = _keywords(entry.fn)
    own -= _OWN_ARGS
    if entry.forwards_to is not None:
        accepted = (_keywords(entry.forwards_to)[0] - entry.filled) | own
    elif takes_any:
        return
    else:
        accepted = own
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for evaluation protocol {protocol!r}; accepted: {sorted(accepted)}"
        )


SUBSET_DETERMINED = _registry.NamesWhere(PROTOCOLS, lambda e: e.deterministic)
"""Protocols whose output is a function of the train / validation subsets alone (entries registered with
``deterministic=True``: L-BFGS logistic regression and kNN are); results are reused across seeds that draw
identical subsets."""


def check_fractions_and_seeds(label_fractions: Sequence[float], seeds: Sequence[int]) -> tuple[list[float], list[int]]:
    """The label fractions as floats in ``(0, 1]`` and the seeds as distinct integers.

    Raises:
        ConfigError: No fractions, a fraction outside ``(0, 1]`` (or not finite), no seeds, or a repeated seed.
    """
    fractions = [float(f) for f in label_fractions]
    if not fractions:
        raise ConfigError("label_fractions is empty")
    bad = [f for f in fractions if not (math.isfinite(f) and 0.0 < f <= 1.0)]
    if bad:
        raise ConfigError(f"label fractions must lie in (0, 1] (e.g. 0.01 for 1 %), got {bad}")
    seed_list = [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("seeds is empty")
    if len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"seeds must be distinct, got {seed_list}")
    return fractions, seed_list


def draw_subsets(train_y: np.ndarray, val_y: np.ndarray | None, fraction: float, seed: int, min_per_class: int,
                 subsample_val: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions of the labelled training subset and of the validation subset for one (fraction, seed).

    Both are :func:`~medssl.data.splits.stratified_fraction` draws with the same fraction and seed; the validation
    subset is the whole validation split when ``subsample_val`` is false, ``None`` without a validation split.
    """
    train_subset = np.asarray(stratified_fraction(train_y, fraction, seed, min_per_class), dtype=np.int64)
    if val_y is None:
        return train_subset, None
    if not subsample_val:
        return train_subset, np.arange(len(val_y))
    return train_subset, np.asarray(stratified_fraction(val_y, fraction, seed, min_per_class), dtype=np.int64)


def _row(out: ProtocolOutput, encoder_name: str | None, protocol: str, fraction: float, seed: int, n_train: int,
         extra_notes: list[str]) -> dict[str, Any]:
    """One result row (see :func:`run_protocol`) of a protocol output, as plain floats."""
    row: dict[str, Any] = {} if encoder_name is None else {"encoder": encoder_name}
    row.update(protocol=protocol, label_fraction=fraction, seed=seed, n_train=n_train,
               metrics={k: float(v) for k, v in out.metrics.items()}, notes=list(out.notes) + extra_notes,
               params=dict(out.params))
    if out.ci is not None:
        row["ci"] = {k: [float(v) for v in lo_hi] for k, lo_hi in out.ci.items()}
    if out.per_class is not None:
        row["per_class"] = {k: {c: float(v) for c, v in d.items()} for k, d in out.per_class.items()}
    return row


def run_protocol(
    features: FeatureSet,
    protocol: str,
    label_fractions: Sequence[float],
    seeds: Sequence[int],
    *,
    encoder_name: str | None = None,
    min_per_class: int = 1,
    subsample_val: bool = True,
    predictions_dir: str | Path | None = None,
    progress: bool = False,
    **protocol_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run one protocol for every label fraction x seed.

    Args:
        features: Frozen features of train / (val) / test (an :class:`~medssl.eval.images.ImageTask` for the
            protocols registered with ``inputs="images"``).
        protocol: A name in :data:`PROTOCOLS` (built in: ``linear``, ``knn``, ``collapse``, ``finetune``,
            ``segment``).
        label_fractions: Fractions of the training labels, each in ``(0, 1]``.
        seeds: Seeds; each draws its own stratified subset and seeds the protocol.
        encoder_name: If given, stored as ``"encoder"`` in every row (so tables compare encoders).
        min_per_class: Minimum training samples per class in every subset.
        subsample_val: Draw the validation labels with the same fraction and seed (default); ``False``
            uses the whole validation split for hyper-parameter choice at every fraction.
        predictions_dir: If given, the test labels and scores of every (fraction, seed) of a classification
            protocol are written there as ``predictions_<encoder>_<fraction>_seed<seed>.npz`` (arrays
            ``y_true``, ``scores``, ``encoder``, ``protocol``, ``label_fraction``, ``seed`` and ``class_names``
            when known); ``medssl report`` draws ROC / PR curves from them.
        progress: a progress display over the fraction x seed grid
            (:class:`medssl.engine.logging.TaskProgress`).
        **protocol_kwargs: Options of the protocol, e.g. ``k=20, temperature=0.07`` for kNN or
            ``c_grid=(...)`` for the linear probe.

    Returns:
        One row per (fraction, seed), in that order:
        ``{"encoder" (if given), "protocol", "label_fraction", "seed", "n_train", "metrics", "notes",
        "params"}``; ``params`` holds the protocol's hyper-parameters (linear: chosen ``C`` and ``n_val``,
        the number of validation labels it was chosen on; kNN: ``k`` and ``temperature``). Rows also carry
        ``"ci"`` (metric -> bootstrap 95 % ``[lo, hi]`` on the test split) and ``"per_class"`` where the
        protocol reports them (linear, knn, finetune, segment).

    Raises:
        ConfigError: Unknown protocol or option, fractions outside ``(0, 1]``, no or duplicate seeds.
        DataError: Malformed features (checked when the :class:`FeatureSet` was built).
    """
    entry = _registry.protocol_entry(protocol)
    fractions, seed_list = check_fractions_and_seeds(label_fractions, seeds)
    if min_per_class < 0:
        raise ConfigError(f"min_per_class must be >= 0, got {min_per_class}")
    check_options(protocol, protocol_kwargs)
    train_y = np.asarray(features.train_y)
    val_y = None if features.val_y is None else np.asarray(features.val_y)
    rows: list[dict[str, Any]] = []
    # A protocol whose result depends only on the subsets (not on the seed) is not refitted when another seed
    # draws the very same subsets, as every seed does at 100 % labels.
    reuse: dict[tuple[bytes, bytes | None], tuple[int, ProtocolOutput]] = {}
    label = f"{protocol} {encoder_name}" if encoder_name else protocol
    with TaskProgress(label, len(fractions) * len(seed_list), enabled=progress, unit="fits") as bar:
        for fraction, seed in [(f, s) for f in fractions for s in seed_list]:
            train_subset, val_subset = draw_subsets(train_y, val_y, fraction, seed, min_per_class, subsample_val)
            key = (train_subset.tobytes(), None if val_subset is None else val_subset.tobytes())
            extra_notes: list[str] = []
            if entry.deterministic and key in reuse:
                first_seed, out = reuse[key]
                extra_notes.append(f"same subsets as seed {first_seed}: result reused, not refitted")
            else:
                out = PROTOCOLS[protocol](features, train_subset, seed, val_subset=val_subset, **protocol_kwargs)
                reuse[key] = (seed, out)
            rows.append(_row(out, encoder_name, protocol, fraction, seed, int(train_subset.size), extra_notes))
            if predictions_dir is not None and out.predictions is not None:
                save_predictions(Path(predictions_dir), out.predictions, encoder=encoder_name or "encoder",
                                 protocol=protocol, fraction=fraction, seed=seed,
                                 class_names=getattr(features, "class_names", None))
            bar.advance(1, info=f"labels {fraction:g} seed {seed}")
    return rows


def predictions_path(directory: Path, encoder: str, fraction: float, seed: int) -> Path:
    """``directory/predictions_<encoder>_<fraction>_seed<seed>.npz`` with a file-system-safe encoder name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder).strip("_") or "encoder"
    return directory / f"predictions_{safe}_{fraction:g}_seed{seed}.npz"


def save_predictions(directory: Path, predictions: tuple[np.ndarray, np.ndarray], *, encoder: str, protocol: str,
                     fraction: float, seed: int, class_names: Sequence[str] | None = None) -> Path:
    """Write one (fraction, seed)'s test labels and scores (see :func:`run_protocol`'s ``predictions_dir``)."""
    directory.mkdir(parents=True, exist_ok=True)
    y_true, scores = predictions
    arrays: dict[str, Any] = {"y_true": np.asarray(y_true), "scores": np.asarray(scores, dtype=np.float32),
                              "encoder": np.asarray(encoder), "protocol": np.asarray(protocol),
                              "label_fraction": np.asarray(float(fraction)), "seed": np.asarray(int(seed))}
    if class_names is not None:
        arrays["class_names"] = np.asarray([str(c) for c in class_names])
    path = predictions_path(directory, encoder, fraction, seed)
    np.savez_compressed(path, **arrays)
    return path


def features_from_dataset(
    encoder: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    splits: dict[str, np.ndarray] | None = None,
    progress: bool = False,
    window: tuple[int, ...] | None = None,
    overlap: float = 0.25,
) -> FeatureSet:
    """Extract a :class:`FeatureSet` from a medssl dataset's train / val / test splits.

    Args:
        encoder: Frozen encoder (see :func:`medssl.eval.features.extract_features`).
        dataset: A dataset with ``labels``, ``multilabel``, ``num_classes``, ``class_names`` and
            ``indices(split)``.
        batch_size: Images per forward pass.
        device: Where the encoder runs.
        num_workers: DataLoader workers.
        splits: ``{"train", "val", "test"}`` -> dataset indices; default ``dataset.indices(split)``.
        progress: a progress display per split (``features train`` ...).
        window, overlap: 3D sliding-window features (see :func:`medssl.eval.features.extract_features`).

    Returns:
        Features, labels, class names and the test items' patient ids; ``val_x`` / ``val_y`` are ``None`` when
        the validation split is empty.

    Raises:
        DataError: The dataset has no labels or an empty train or test split.
    """
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise DataError("the evaluation dataset has no labels; evaluation needs a labelled dataset")
    labels = np.asarray(labels)
    split_idx: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        idx = splits[split] if splits is not None else dataset.indices(split)  # type: ignore[attr-defined]
        split_idx[split] = np.asarray(idx, dtype=np.int64)
    for split in ("train", "test"):
        if split_idx[split].size == 0:
            raise DataError(f"the evaluation dataset has an empty {split!r} split")

    def embed(split: str) -> np.ndarray:
        return extract_features(
            encoder, dataset, split_idx[split], batch_size=batch_size, device=device, num_workers=num_workers,
            progress=f"features {split}" if progress else False, window=window, overlap=overlap,
        )

    has_val = split_idx["val"].size > 0
    class_names = getattr(dataset, "class_names", None)
    return FeatureSet(
        train_x=embed("train"),
        train_y=labels[split_idx["train"]],
        test_x=embed("test"),
        test_y=labels[split_idx["test"]],
        val_x=embed("val") if has_val else None,
        val_y=labels[split_idx["val"]] if has_val else None,
        multilabel=bool(getattr(dataset, "multilabel", False)),
        num_classes=int(dataset.num_classes),  # type: ignore[attr-defined]
        class_names=list(class_names) if class_names is not None else None,
        test_groups=_patient_ids(dataset, split_idx["test"]),
    )


def _patient_ids(dataset: Any, idx: np.ndarray) -> np.ndarray | None:
    """Patient ids of the items ``idx`` when the dataset has them (bootstrap clusters), else ``None``."""
    ids = getattr(dataset, "patient_ids", None)
    return None if ids is None else np.asarray(ids)[idx]

