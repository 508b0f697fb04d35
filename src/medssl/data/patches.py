"""Sub-volume sampling for 3D pretraining (``data.volume_mode: patches``, see docs/volumes.md).

Volumes are expensive to read, and resizing a whole CT or MR volume to a small cube throws away resolution and
distorts anatomy. In ``patches`` mode a volume is read once (at its resampled spacing, through the item cache)
and :func:`sample_patches` cuts ``samples_per_volume`` random crops of ``patch_size`` voxels from it; the method's
augmented views are then made from the crops as from any image.

* **Padding**: a volume smaller than a patch along an axis is zero-padded, centred, to the patch size first.
* **Foreground weighting**: with probability ``foreground_p`` a crop is centred on a voxel drawn uniformly from
  the foreground (the item's mask where the dataset has masks, else the voxels whose ``[0, 1]`` intensity, in any
  channel, exceeds ``foreground_threshold``), so crops are not mostly air; otherwise (and when a volume has no
  foreground) its corner is drawn uniformly among all positions. Crops centred near a border are shifted inside.
* **Determinism**: the crops of item ``i`` in epoch ``e`` come from ``numpy.random.default_rng([seed, e, i])``,
  independent of DataLoader workers, batch composition and of whether the run was resumed
  (:class:`EpochTagged` hands the epoch to the dataset with each index).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import ImageDataset

__all__ = ["EpochTagged", "PatchDataset", "PatchSampling", "sample_patches"]


@dataclass(frozen=True)
class PatchSampling:
    """How crops are drawn (the ``data.patch_size`` / ``samples_per_volume`` / ``foreground_*`` settings)."""

    patch_size: tuple[int, int, int]
    samples_per_volume: int = 1
    foreground_p: float = 0.0
    foreground_threshold: float = 0.1
    seed: int = 0


def _pad_to(x: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad the last three axes of ``x`` (centred) to at least ``shape``; returns the padded tensor and the
    padding added before each axis."""
    before, pads = [], []
    for n, p in zip(x.shape[-3:], shape, strict=True):
        total = max(int(p) - int(n), 0)
        before.append(total // 2)
        pads.append((total // 2, total - total // 2))
    if not any(sum(p) for p in pads):
        return x, before
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last axis first
    return torch.nn.functional.pad(x, flat), before


def sample_patches(image: torch.Tensor, mask: torch.Tensor | None, sampling: PatchSampling,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
    """Cut ``sampling.samples_per_volume`` crops from one volume.

    Args:
        image: ``(C, D, H, W)`` float volume in ``[0, 1]``.
        mask: ``(D, H, W)`` integer mask or ``None``.
        sampling: the crop settings.
        rng: the generator the crop positions are drawn from.

    Returns:
        ``(crops, mask_crops, starts)``: ``(n, C, *patch)``, ``(n, *patch)`` or ``None``, and the ``(n, 3)`` corner
        of each crop in the coordinates of the volume as given (negative where the volume was padded).
    """
    patch = tuple(int(p) for p in sampling.patch_size)
    padded, before = _pad_to(image, patch)
    mpad = _pad_to(mask, patch)[0] if mask is not None else None
    dims = np.array(padded.shape[-3:])
    span = dims - np.array(patch)  # inclusive upper bound of the corner
    fg_index: np.ndarray | None = None
    n = sampling.samples_per_volume
    starts = np.zeros((n, 3), dtype=np.int64)
    for k in range(n):
        use_fg = sampling.foreground_p > 0 and rng.random() < sampling.foreground_p
        if use_fg and fg_index is None:
            fg = (mpad > 0) if mpad is not None else (padded > sampling.foreground_threshold).any(dim=0)
            fg_index = np.flatnonzero(fg.numpy().reshape(-1))
        if use_fg and fg_index is not None and len(fg_index):
            centre = np.array(np.unravel_index(int(fg_index[rng.integers(len(fg_index))]), tuple(dims)))
            starts[k] = np.clip(centre - np.array(patch) // 2, 0, span)
        else:
            starts[k] = [int(rng.integers(s + 1)) for s in span]
    crops = torch.stack([padded[:, a:a + patch[0], b:b + patch[1], c:c + patch[2]] for a, b, c in starts])
    mcrops = None
    if mpad is not None:
        mcrops = torch.stack([mpad[a:a + patch[0], b:b + patch[1], c:c + patch[2]] for a, b, c in starts])
    return crops.contiguous(), mcrops, starts - np.array(before)


class PatchDataset(ImageDataset):
    """A 3D dataset whose items are ``samples_per_volume`` crops of one volume of ``base``.

    An item is ``{"image": (n, C, *patch), "index": i[, "mask": (n, *patch)][, "label": ...]}``; ``dataset[(i,
    epoch)]`` draws the crops of epoch ``epoch`` (``dataset[i]`` those of epoch 0). :attr:`image_size` is the
    largest patch side (the side the views are resized to unless ``data.image_size`` says otherwise).
    """

    def __init__(self, base: ImageDataset, sampling: PatchSampling) -> None:
        if base.spatial_dims != 3:
            raise ValueError("PatchDataset needs a 3D dataset")
        self.base = base
        self.sampling = sampling
        self.skipped = list(getattr(base, "skipped", []))
        self.open_errors = dict(base.open_errors)
        self._set_metadata(
            name=base.name, spatial_dims=3, in_chans=base.in_chans, image_size=max(sampling.patch_size),
            labels=base.labels, class_names=base.class_names, multilabel=base.multilabel,
            patient_ids=base.patient_ids, splits=base.splits, sources=base.sources, task=base.task,
            tasks=base.tasks, has_masks=base.has_masks,
        )

    @property
    def samples_per_volume(self) -> int:
        return self.sampling.samples_per_volume

    def item_files(self, index: int) -> list[str]:
        inner = getattr(self.base, "item_files", None)
        return inner(index) if callable(inner) else [self.sources[index]]

    def preprocessing(self) -> dict[str, Any]:
        return self.base.preprocessing()

    def enable_cache(self, root: Any) -> bool:
        return self.base.enable_cache(root)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.base._load_item(index)

    def crops(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """The crops of item ``index`` in ``epoch`` (see :func:`sample_patches`)."""
        image, mask = self.base._load_item(index)
        rng = np.random.default_rng([self.sampling.seed, int(epoch), int(index)])
        return sample_patches(image, mask, self.sampling, rng)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch = (key if isinstance(key, tuple) else (key, 0))
        n = len(self)
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self.name!r} with {n} items")
        crops, mcrops, _ = self.crops(i, int(epoch))
        item: dict[str, Any] = {"image": crops, "index": i}
        if self.labels is not None:
            item["label"] = (torch.from_numpy(self.labels[i].astype(np.float32)) if self.multilabel
                             else torch.tensor(int(self.labels[i]), dtype=torch.int64))
        if mcrops is not None:
            item["mask"] = mcrops
        return item


class EpochTagged(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler with an ``epoch`` attribute: yields ``[(index, epoch), ...]`` so that a
    :class:`PatchDataset` draws the crops of that epoch (in any worker, after any resume)."""

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = int(self.batch_sampler.epoch)
        for batch in self.batch_sampler:
            yield [(int(i), epoch) for i in batch]
