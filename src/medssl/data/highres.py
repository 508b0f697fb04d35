"""High-resolution copies of the same images, for multi-scale masked image modelling (MIRAM).

MIRAM (Vo et al., arXiv 2503.07157) reconstructs the image at 2x (and 4x) the input resolution; the point
is that the high-resolution target holds detail the input lacks, so it must be read from the source at that
resolution, not upsampled from the input (what the authors' code did). :class:`HighResDataset` wraps a
dataset and adds, to every item, copies of the same image at ``factor x`` the dataset's image size:

* phantoms are rendered at that size (``phantom2d`` at 128 px is a faithful twice-as-detailed copy of
  the 64 px image, see :mod:`medssl.data.phantoms`);
* file datasets (folder, npz, csv / volumes, isic2017) read the source file again and resize it to that
  size, exactly as they make the low-resolution item (same padding to square, same interpolation). A source
  stored at a lower resolution than ``factor x`` the image size only gives an upsampled copy: choose the
  image size so that the source holds the detail (e.g. CBIS-DDSM ROIs at 112 px with 2x = 224 px).

The random crop / flip is applied later, inside the method, with the same normalised box to every copy
(:func:`medssl.transforms.spatial.crop_resize`), so all scales show the same region.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from medssl.errors import DataError

from .base import ImageDataset
from .phantoms import PhantomDataset

__all__ = ["HighResDataset", "dataset_at_size", "highres_key"]


def highres_key(factor: int) -> str:
    """The batch key of the ``factor x`` copy: ``image_highres`` for 2x, ``image_highres_x<factor>`` otherwise."""
    return "image_highres" if int(factor) == 2 else f"image_highres_x{int(factor)}"


def dataset_at_size(dataset: ImageDataset, size: int) -> ImageDataset:
    """The same dataset (same items, same order) with images made at side ``size``.

    Phantoms are re-rendered at ``size``; a view of another dataset (``drop_bad``'s subset, with ``base`` and
    ``keep``) is rebuilt over its base at ``size``; any other reader is copied with its ``image_size`` set to
    ``size`` (every medssl file reader resizes to ``self.image_size`` when it loads an item) and, when it
    caches decoded items, its own cache entries (the cache key includes the image size).
    """
    if isinstance(dataset, PhantomDataset):
        return PhantomDataset(dataset.kind, len(dataset), image_size=size, task=dataset.task, seed=dataset.seed,
                              name=dataset.name)
    base, keep = getattr(dataset, "base", None), getattr(dataset, "keep", None)
    if isinstance(base, ImageDataset) and keep is not None:
        out = copy.copy(dataset)
        out.base = dataset_at_size(base, size)
        out.image_size = int(size)
        return out
    out = copy.copy(dataset)
    out.image_size = int(size)
    cache = getattr(dataset, "_cache", None)
    if cache is not None:  # the item cache is keyed by the preprocessing (image size included): a new key
        out._cache = None
        out.enable_cache(cache.root)
    return out


class HighResDataset(Dataset):
    """A dataset whose items also carry ``factor x`` copies of their image (see the module docstring).

    Args:
        dataset: the dataset pretraining reads.
        factors: resolution factors, e.g. ``(2,)`` or ``(2, 4)``.

    Raises:
        DataError: a factor below 2; at load time, a copy whose shape is not ``factor x`` the image's.
    """

    def __init__(self, dataset: ImageDataset, factors: Sequence[int] = (2,)) -> None:
        self.dataset = dataset
        self.factors = tuple(int(f) for f in factors)
        if not self.factors or any(f < 2 for f in self.factors):
            raise DataError(f"high-resolution factors must be integers >= 2, got {tuple(factors)}")
        self.copies = {f: dataset_at_size(dataset, dataset.image_size * f) for f in self.factors}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        image = item["image"]
        for f, ds in self.copies.items():
            hr = ds[index]["image"]
            expected = (image.shape[0], *(s * f for s in image.shape[1:]))
            if tuple(hr.shape) != expected:
                raise DataError(
                    f"{self.dataset.name}: item {index} ({self.dataset.sources[index]}): the {f}x copy has shape "
                    f"{tuple(hr.shape)}, expected {expected}; this dataset cannot supply high-resolution copies"
                )
            item[highres_key(f)] = hr.to(torch.float32)
        return item
