"""A tiny in-memory dataset with the attributes the image-level protocols use (labels, masks, splits)."""

from __future__ import annotations

import numpy as np
import torch


class TinyImages:
    """``n`` images of ``size`` px (2D, or 3D with ``spatial_dims=3``) whose label / mask is a bright square.

    The square sits at a random place; its brightness tells the class (invariant to crops and flips).
    Multi-label puts one square per positive label.
    Splits: every 5th item test, every 7th val (when not test), the rest train; two items per patient.
    """

    def __init__(self, n: int = 48, size: int = 16, *, multilabel: bool = False, num_classes: int = 2,
                 masks: bool = True, labels: bool = True, spatial_dims: int = 2, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.spatial_dims, self.in_chans, self.image_size = spatial_dims, 1, size
        self.multilabel, self.has_masks, self.name = multilabel, masks, "tiny"
        shape = (size,) * spatial_dims
        self.images = rng.random((n, 1, *shape)).astype(np.float32) * 0.3
        self.masks = np.zeros((n, *shape), dtype=np.int64)
        if multilabel:
            y = (rng.random((n, num_classes)) < 0.5).astype(np.int64)
        else:
            y = np.arange(n) % num_classes
        side = size // 2
        for i in range(n):
            present = np.flatnonzero(y[i]) if multilabel else [y[i]]
            for c in present:  # a square at a random place whose brightness tells the class
                start = rng.integers(0, size - side + 1, spatial_dims)
                sl = tuple(slice(int(s), int(s) + side) for s in start)
                self.masks[i][sl] = 1
                self.images[i, 0][sl] = 0.4 + 0.5 * c / max(1, num_classes - 1)
        self.labels = y if labels else None
        self.class_names = [f"c{c}" for c in range(num_classes)] if labels else []
        self.patient_ids = np.array([f"P{i // 2}" for i in range(n)])
        pos = np.arange(n)
        self.splits = np.where(pos % 5 == 0, "test", np.where(pos % 7 == 0, "val", "train"))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = {"image": torch.from_numpy(self.images[i]), "index": i}
        if self.labels is not None:
            item["label"] = torch.as_tensor(self.labels[i])
        if self.has_masks:
            item["mask"] = torch.from_numpy(self.masks[i])
        return item

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)
