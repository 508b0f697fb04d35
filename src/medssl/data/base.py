"""The dataset contract every reader implements.

A :class:`ImageDataset` is a map-style ``torch`` dataset whose items are dicts of tensors (no strings, so
the default collate works) plus per-item metadata held as arrays on the dataset itself:

* ``image`` -- float32 in ``[0, 1]``, shape ``(C, S, S)`` (2D) or ``(C, S, S, S)`` (3D);
* ``index`` -- the item's position in the dataset (to look up ``patient_ids[i]``, ``sources[i]`` ...);
* ``label`` -- int64 scalar (multi-class) or ``(K,)`` float32 0/1 vector (multi-label), only when labelled;
* ``mask`` -- int64 segmentation mask of the image's spatial shape, only when the dataset has masks.

Subclasses fill the metadata in ``__init__`` (via :meth:`ImageDataset._set_metadata`) and implement
:meth:`ImageDataset._load`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medssl.errors import DataError

from .splits import SPLIT_NAMES

#: The most classes a dataset may define (a sanity cap: more is almost always an id column or a corrupt label
#: such as 2**40, which would otherwise allocate one class name per value).
MAX_CLASSES = 10_000


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resizes a channel-first 2D or 3D image so every spatial side equals ``size``.

    2D images use bilinear interpolation with antialiasing (a proper low-pass when shrinking). 3D
    volumes use area averaging when every side shrinks (the antialiased choice for volumes) and
    trilinear interpolation otherwise. The output is clamped to ``[0, 1]``.

    Args:
        image: float tensor ``(C, H, W)`` or ``(C, D, H, W)``.
        size: Target side length.

    Returns:
        float32 tensor ``(C, size, size)`` or ``(C, size, size, size)``; the input itself when it
        already has that shape.
    """
    spatial = tuple(image.shape[1:])
    target = (size,) * len(spatial)
    if spatial == target:
        return image
    x = image.unsqueeze(0).to(torch.float32)
    if len(spatial) == 2:
        out = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
    elif all(t <= s for t, s in zip(target, spatial, strict=True)):
        out = F.interpolate(x, size=target, mode="area")
    else:
        out = F.interpolate(x, size=target, mode="trilinear", align_corners=False)
    return out[0].clamp_(0.0, 1.0)


class ImageDataset(Dataset):
    """Base class of all medssl datasets (2D or 3D, labelled or not).

    Attributes:
        name: The spec string the dataset was opened from (e.g. ``"phantom2d:500"``).
        spatial_dims: 2 or 3.
        in_chans: 1 (grayscale) or 3 (RGB).
        image_size: Side length ``S`` of every item (items are ``(C, S, S)`` or ``(C, S, S, S)``).
        labels: ``(N,)`` int64 class indices, ``(N, K)`` int64 0/1 multi-label matrix, or ``None``.
        class_names: One name per class (``[]`` when unlabelled).
        multilabel: Whether ``labels`` is a multi-label matrix.
        patient_ids: ``(N,)`` str patient id per item (the item's own id when the source has none).
        splits: ``(N,)`` str in ``{"train", "val", "test"}``; patient-level.
        sources: Where each item comes from (file path, or e.g. ``"phantom2d#17"``).
        task: Name of the chosen labelling task (``None`` when unlabelled).
        tasks: Names of the tasks this dataset offers.
        has_masks: Whether items carry a ``"mask"`` entry.
        open_errors: ``{index: reason}`` of the items found unreadable while the dataset was opened (e.g. a
            ``folder:`` image whose header Pillow cannot read). They stay in the dataset so that ``--skip-bad``
            and ``medssl inspect`` list them all; reading such an item raises its :class:`DataError`, and
            :meth:`check_open_errors` (called by ``open_from_config`` unless ``data.skip_bad``) stops a run
            before training.
    """

    name: str
    spatial_dims: int
    in_chans: int
    image_size: int
    labels: np.ndarray | None
    class_names: list[str]
    multilabel: bool
    patient_ids: np.ndarray
    splits: np.ndarray
    sources: list[str]
    task: str | None
    tasks: tuple[str, ...]
    has_masks: bool
    open_errors: dict[int, str] = {}  # noqa: RUF012  (replaced per instance, never mutated in place)

    def _set_metadata(
        self,
        *,
        name: str,
        spatial_dims: int,
        in_chans: int,
        image_size: int,
        labels: np.ndarray | None,
        class_names: list[str],
        multilabel: bool,
        patient_ids: np.ndarray,
        splits: np.ndarray,
        sources: list[str],
        task: str | None,
        tasks: tuple[str, ...],
        has_masks: bool,
    ) -> None:
        """Stores and cross-checks the metadata (called once by every subclass ``__init__``).

        Raises:
            ValueError: If the arrays disagree in length or hold invalid values (a reader bug, not a
                user error: readers validate user input themselves and raise :class:`DataError`).
        """
        n = len(patient_ids)
        if spatial_dims not in (2, 3) or in_chans not in (1, 3) or image_size < 1:
            raise ValueError(f"invalid geometry: dims={spatial_dims} chans={in_chans} size={image_size}")
        if len(splits) != n or len(sources) != n:
            raise ValueError("patient_ids, splits and sources must have the same length")
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            expected_ndim = 2 if multilabel else 1
            if labels.ndim != expected_ndim or len(labels) != n:
                raise ValueError(
                    f"labels of shape {labels.shape} do not fit {n} items (multilabel={multilabel})"
                )
            if multilabel and (labels.shape[1] != len(class_names) or not np.isin(labels, (0, 1)).all()):
                raise ValueError("multi-label matrix must be 0/1 with one column per class name")
            if not multilabel and n and (labels.min() < 0 or labels.max() >= len(class_names)):
                raise ValueError("class labels must index class_names")
        splits = np.asarray(splits).astype(str)
        if n and not np.isin(splits, SPLIT_NAMES).all():
            raise ValueError(f"splits must be in {SPLIT_NAMES}")
        self.name = name
        self.spatial_dims = int(spatial_dims)
        self.in_chans = int(in_chans)
        self.image_size = int(image_size)
        self.labels = labels
        self.class_names = list(class_names) if labels is not None else []
        self.multilabel = bool(multilabel) if labels is not None else False
        self.patient_ids = np.asarray(patient_ids).astype(str)
        self.splits = splits
        self.sources = list(sources)
        self.task = task if labels is not None else None
        self.tasks = tuple(tasks)
        self.has_masks = bool(has_masks)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns item ``index``'s image and mask.

        Args:
            index: Non-negative item index, already bounds-checked.

        Returns:
            ``(image, mask)``: float32 ``(C, S, S[, S])`` in ``[0, 1]`` that the caller may modify, and an
            int64 mask of the spatial shape (``None`` when the dataset has no masks).
        """
        raise NotImplementedError

    # -- caching ------------------------------------------------------------------------------------------
    _cache: Any = None

    def preprocessing(self) -> dict[str, Any]:
        """Everything besides the source bytes that shapes an item (part of the cache key).

        Subclasses with more settings (intensity mode, ROI crop ...) extend it.
        """
        return {"dataset": type(self).__name__, "spatial_dims": self.spatial_dims, "in_chans": self.in_chans,
                "image_size": self.image_size, "has_masks": self.has_masks}

    def enable_cache(self, root: Any) -> bool:
        """Cache decoded items under ``root`` (see :mod:`medssl.data.cache`).

        Only datasets read from files (those with ``item_files``) are cached; in-memory ones (phantoms, npz)
        gain nothing and return ``False``.
        """
        if not callable(getattr(self, "item_files", None)):
            return False
        from .cache import ItemCache

        self._cache = ItemCache(root, self.preprocessing())
        return True

    def check_open_errors(self) -> None:
        """Raise the first of :attr:`open_errors` (with how many more there are); nothing when there are none.

        Raises:
            DataError: one line naming the first unreadable file, the count and the ways out.
        """
        if not self.open_errors:
            return
        first = min(self.open_errors)
        more = len(self.open_errors) - 1
        also = f" (and {more} more unreadable file(s))" if more else ""
        raise DataError(f"{self.open_errors[first]}{also}; skip them with --skip-bad (data.skip_bad=true), "
                        f"list them with `medssl inspect --data {self.name}`")

    def _load_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_load` through the cache when one is enabled (an item in :attr:`open_errors` raises its error)."""
        if index in self.open_errors:
            raise DataError(self.open_errors[index])
        cache = self._cache
        if cache is None:
            return self._load(index)
        files = self.item_files(index)  # type: ignore[attr-defined]
        got = cache.get(files, self.has_masks)
        if got is not None:
            image = torch.from_numpy(np.array(got[0], dtype=np.float32))
            mask = None if got[1] is None else torch.from_numpy(np.array(got[1], dtype=np.int64))
            return image, mask
        image, mask = self._load(index)
        cache.put(files, image.numpy(), None if mask is None else mask.numpy())
        return image, mask

    @property
    def num_classes(self) -> int:
        """Number of classes (columns for multi-label); 0 when unlabelled."""
        return 0 if self.labels is None else len(self.class_names)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        """Returns item ``index`` as a dict (see the module docstring for the keys)."""
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self.name!r} with {n} items")
        image, mask = self._load_item(i)
        item: dict[str, torch.Tensor | int] = {"image": image, "index": i}
        if self.labels is not None:
            if self.multilabel:
                item["label"] = torch.from_numpy(self.labels[i].astype(np.float32))
            else:
                item["label"] = torch.tensor(int(self.labels[i]), dtype=torch.int64)
        if mask is not None:
            item["mask"] = mask
        return item

    def indices(self, split: str) -> np.ndarray:
        """Indices of the items in ``split``.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            Sorted ``(M,)`` int64 indices.

        Raises:
            DataError: If ``split`` is not one of the three split names.
        """
        if split not in SPLIT_NAMES:
            raise DataError(
                f"unknown split {split!r} for {self.name!r}; valid splits: {', '.join(SPLIT_NAMES)}"
            )
        return np.flatnonzero(self.splits == split).astype(np.int64)

    def _label_counts(self, idx: np.ndarray) -> dict[str, int]:
        assert self.labels is not None
        if self.multilabel:
            counts = self.labels[idx].sum(axis=0) if len(idx) else np.zeros(self.num_classes, dtype=np.int64)
        else:
            counts = np.bincount(self.labels[idx], minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def describe(self) -> dict[str, Any]:
        """Summarises the dataset with plain Python types (safe to dump to YAML / JSON).

        Returns:
            Dict with ``name``, ``spatial_dims``, ``in_chans``, ``image_size``, ``shape`` (of one item's
            image), ``num_items``, ``num_patients``, ``split_counts`` and ``split_patients`` (per split),
            ``task``, ``tasks``, ``multilabel``, ``num_classes``, ``class_names``, ``has_masks`` and
            ``label_counts`` (``{"all" | split: {class name: count}}``; positives per class for
            multi-label; ``None`` when unlabelled).
        """
        split_counts = {s: int((self.splits == s).sum()) for s in SPLIT_NAMES}
        split_patients = {s: int(len(np.unique(self.patient_ids[self.splits == s]))) for s in SPLIT_NAMES}
        label_counts: dict[str, dict[str, int]] | None = None
        if self.labels is not None:
            label_counts = {"all": self._label_counts(np.arange(len(self)))}
            for s in SPLIT_NAMES:
                label_counts[s] = self._label_counts(self.indices(s))
        return {
            "name": self.name,
            "spatial_dims": self.spatial_dims,
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "shape": [self.in_chans] + [self.image_size] * self.spatial_dims,
            "num_items": len(self),
            "num_patients": int(len(np.unique(self.patient_ids))),
            "split_counts": split_counts,
            "split_patients": split_patients,
            "task": self.task,
            "tasks": list(self.tasks),
            "multilabel": self.multilabel,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "has_masks": self.has_masks,
            "label_counts": label_counts,
        }

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in [self.in_chans] + [self.image_size] * self.spatial_dims)
        task = f", task={self.task!r}" if self.task else ""
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, shape={shape}{task})"
