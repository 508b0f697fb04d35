"""Patient-level splits and stratified label fractions.

Two rules keep low-label evaluation honest:

* **Patient-level splits.** Every image of a patient lands in the same split, so a model is never tested
  on a patient it was trained on (images of one patient are strongly correlated; image-level splitting
  inflates every metric).
* **Stratified label fractions.** The 1 % / 10 % label budgets of the low-label protocol draw a subset of
  the training split that keeps every class present (at least ``min_per_class`` examples, or positives
  for multi-label tasks) and otherwise follows the class distribution. Both functions are deterministic
  given their seed, so the subset used for every reported number can be reproduced (and is written to
  the run directory by the evaluation code).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")


def _largest_remainder(weights: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Integer allocation of ``total`` proportional to ``weights`` (Hamilton's largest-remainder method).

    Ties between equal remainders are broken at random with ``rng`` so no group is systematically
    favoured.

    Args:
        weights: Non-negative weights, shape ``(G,)``; at least one must be positive when ``total > 0``.
        total: Number of units to distribute.
        rng: Random generator used for tie-breaking.

    Returns:
        ``(G,)`` int64 counts summing to ``total``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    quota = weights / weights.sum() * total
    counts = np.floor(quota).astype(np.int64)
    rest = int(total - counts.sum())
    if rest > 0:
        remainder = quota - counts
        tie_break = rng.random(len(weights))
        order = np.lexsort((tie_break, -remainder))
        counts[order[:rest]] += 1
    return counts


def assign_patient_splits(
    patient_ids: Sequence[str] | np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> np.ndarray:
    """Assigns every item to ``train``/``val``/``test`` so that no patient spans two splits.

    The distinct patient ids are sorted, shuffled with ``seed`` and cut into consecutive groups whose
    sizes follow ``fractions`` (largest-remainder rounding, counted in patients, not images). When there
    are at least as many patients as splits with a positive fraction, each such split receives at least
    one patient, so a tiny dataset never ends up with an empty validation split.

    Args:
        patient_ids: ``(N,)`` patient id per item (any values convertible to ``str``).
        fractions: Fractions of patients for train, val and test; non-negative, summing to 1.
        seed: Seed of the patient shuffle; the result is a pure function of ``(patient_ids, fractions,
            seed)`` and does not depend on the order of the items.

    Returns:
        ``(N,)`` array of ``str`` split names, aligned with ``patient_ids``.

    Raises:
        ValueError: If ``fractions`` is not three non-negative numbers summing to 1.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or np.any(fr < 0) or not np.isfinite(fr).all() or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    ids = np.asarray(patient_ids).astype(str)
    if ids.ndim != 1:
        raise ValueError(f"patient_ids must be one-dimensional, got shape {ids.shape}")
    out = np.empty(len(ids), dtype="<U5")
    if len(ids) == 0:
        return out
    unique, inverse = np.unique(ids, return_inverse=True)
    n_patients = len(unique)
    rng = np.random.default_rng([int(seed), 0x5B17])
    counts = _largest_remainder(fr, n_patients, rng)
    positive = np.flatnonzero(fr > 0)
    if n_patients >= len(positive):
        for k in positive:
            if counts[k] == 0:
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[k] += 1
    order = rng.permutation(n_patients)
    patient_split = np.empty(n_patients, dtype="<U5")
    start = 0
    for name, count in zip(SPLIT_NAMES, counts, strict=True):
        patient_split[order[start : start + count]] = name
        start += int(count)
    out[:] = patient_split[inverse.reshape(-1)]
    return out


def _check_fraction(fraction: float) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < value <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return value


def stratified_fraction(
    labels: np.ndarray,
    fraction: float,
    seed: int,
    min_per_class: int = 1,
) -> np.ndarray:
    """Draws a stratified subset of about ``round(fraction * N)`` items.

    * Class labels ``(N,)``: each class gets its proportional share (largest-remainder rounding of the
      target size), raised to ``min(min_per_class, class size)``; the subset can therefore be slightly
      larger than ``round(fraction * N)`` when rare classes need topping up.
    * Multi-label ``(N, K)`` 0/1 labels: first, for every label (rarest first) that has positives, enough
      positives are drawn to reach ``min(min_per_class, positives)``; the remaining budget is then spread
      over the distinct label combinations (label-powerset strata) in proportion to their size.

    The subsets are not nested across fractions (a 1 % subset is not guaranteed to be inside the 10 %
    subset of the same seed).

    Args:
        labels: ``(N,)`` integer class labels or ``(N, K)`` 0/1 multi-label matrix.
        fraction: Fraction of items to keep, ``0 < fraction <= 1``; ``1`` returns every index.
        seed: Seed; the result is a pure function of ``(labels, fraction, seed, min_per_class)``.
        min_per_class: Minimum number of items (or positives) per class present.

    Returns:
        Sorted ``(M,)`` int64 indices into ``labels``.

    Raises:
        ValueError: If ``fraction`` is outside ``(0, 1]``, ``min_per_class`` is negative or ``labels``
            is not 1-D or 2-D.
    """
    frac = _check_fraction(fraction)
    if int(min_per_class) < 0:
        raise ValueError(f"min_per_class must be >= 0, got {min_per_class}")
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2):
        raise ValueError(f"labels must have shape (N,) or (N, K), got {labels.shape}")
    n = labels.shape[0]
    if frac == 1.0 or n == 0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0x57A7])
    target = int(round(frac * n))
    if labels.ndim == 1:
        return _stratified_classes(labels, target, rng, int(min_per_class))
    return _stratified_multilabel(labels, target, rng, int(min_per_class))


def _stratified_classes(
    labels: np.ndarray, target: int, rng: np.random.Generator, minimum: int
) -> np.ndarray:
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    counts = _largest_remainder(sizes.astype(np.float64), target, rng)
    counts = np.maximum(counts, np.minimum(minimum, sizes))
    chosen = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        chosen.append(rng.permutation(members)[: counts[c]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _stratified_multilabel(
    labels: np.ndarray, target: int, rng: np.random.Generator, minimum: int
) -> np.ndarray:
    positive = labels > 0
    n = len(labels)
    chosen = np.zeros(n, dtype=bool)
    pos_counts = positive.sum(axis=0)
    for k in np.argsort(pos_counts, kind="stable"):
        if pos_counts[k] == 0:
            continue
        need = min(minimum, int(pos_counts[k])) - int((chosen & positive[:, k]).sum())
        if need > 0:
            candidates = np.flatnonzero(positive[:, k] & ~chosen)
            chosen[rng.permutation(candidates)[:need]] = True
    budget = target - int(chosen.sum())
    if budget > 0:
        free = np.flatnonzero(~chosen)
        _, stratum, sizes = np.unique(positive[free], axis=0, return_inverse=True, return_counts=True)
        stratum = stratum.reshape(-1)
        counts = _largest_remainder(sizes.astype(np.float64), min(budget, len(free)), rng)
        for s, count in enumerate(counts):
            if count:
                members = free[stratum == s]
                chosen[rng.permutation(members)[:count]] = True
    return np.flatnonzero(chosen).astype(np.int64)


# -- split manifests ------------------------------------------------------------------------------------
def write_split_manifest(
    dataset: Any, path: str | Path, subsets: dict[str, np.ndarray] | None = None
) -> Path:
    """Write which item went into which split (and label-fraction subset) as a CSV.

    Columns: ``index, source, patient_id, split`` plus one 0/1 column per entry of ``subsets`` (e.g.
    ``subset:0.01:seed0`` for the 1 % training subset of seed 0). The file is what ``--splits FILE``
    (``data.splits``) reads back, so a run's exact splits can be reused by another run or another tool.

    Args:
        dataset: An :class:`~medssl.data.base.ImageDataset`.
        path: Output CSV.
        subsets: ``{column name: dataset indices in that subset}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = dict(subsets or {})
    member = {name: np.zeros(len(dataset), dtype=np.int8) for name in cols}
    for name, idx in cols.items():
        member[name][np.asarray(idx, dtype=np.int64)] = 1
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "source", "patient_id", "split", *cols])
        for i in range(len(dataset)):
            w.writerow([i, dataset.sources[i], dataset.patient_ids[i], dataset.splits[i],
                        *(int(member[c][i]) for c in cols)])
    os.replace(tmp, path)
    return path


def read_split_manifest(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Read a manifest written by :func:`write_split_manifest`.

    Returns:
        ``(sources, patient_ids, splits, subsets)`` with ``subsets`` as ``{column: (N,) bool}``.

    Raises:
        DataError: missing file, missing columns, unknown split names.
    """
    from medssl.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"split manifest not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    missing = [c for c in ("source", "split") if c not in header]
    if missing:
        raise DataError(f"{path}: not a split manifest (missing column(s) {', '.join(missing)}; "
                        "expected index, source, patient_id, split)")
    if not rows:
        raise DataError(f"{path}: empty split manifest")
    splits = np.array([r["split"].strip() for r in rows])
    bad = sorted(set(splits) - set(SPLIT_NAMES))
    if bad:
        raise DataError(f"{path}: unknown split name(s) {', '.join(map(repr, bad))}; valid: {', '.join(SPLIT_NAMES)}")
    subsets = {c: np.array([r[c].strip() in ("1", "true", "True") for r in rows]) for c in header
               if c.startswith("subset:")}
    patients = np.array([(r.get("patient_id") or "").strip() for r in rows])
    return [r["source"] for r in rows], patients, splits, subsets


def apply_split_manifest(dataset: Any, path: str | Path) -> Any:
    """Replace ``dataset.splits`` by the assignment of a split manifest, matching items by ``source``.

    Every item of the dataset must appear in the manifest (a missing item would otherwise silently land in
    no split); extra manifest rows (items dropped since) are ignored. The result must still be
    patient-level.

    Raises:
        DataError: items missing from the manifest, or a patient in two splits.
    """
    from medssl.errors import DataError

    sources, _, splits, _ = read_split_manifest(path)
    lookup = dict(zip(sources, splits, strict=True))
    missing = [s for s in dataset.sources if s not in lookup]
    if missing:
        raise DataError(f"{path}: {len(missing)} item(s) of {dataset.name} are not in the split manifest "
                        f"(first: {missing[0]}); was it written for another dataset?")
    new = np.array([lookup[s] for s in dataset.sources])
    check_patient_level(dataset.patient_ids, new, where=str(path))
    dataset.splits = new
    return dataset


def check_patient_level(patient_ids: np.ndarray, splits: np.ndarray, where: str = "") -> None:
    """Raise a :class:`DataError` naming the first patient that has items in two splits."""
    from medssl.errors import DataError

    seen: dict[str, str] = {}
    for pid, s in zip(np.asarray(patient_ids).astype(str), np.asarray(splits).astype(str), strict=True):
        prev = seen.setdefault(pid, s)
        if prev != s:
            raise DataError(f"{where + ': ' if where else ''}patient {pid!r} is in both {prev!r} and {s!r} splits; "
                            "splits must be patient-level")
