"""Frozen-feature extraction for linear / kNN evaluation.

The encoder is run once over a split in inference mode; the linear probe and the kNN classifier then work
on the cached ``(n, D)`` feature matrix, so every label fraction and seed reuses the same features.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from medssl.engine.logging import TaskProgress
from medssl.errors import DataError


def _embed_batch(encoder: torch.nn.Module, batch: object, device: torch.device,
                 window: tuple[int, ...] | None = None, overlap: float = 0.25) -> np.ndarray:
    """One batch's ``(B, D)`` features (float32, on the CPU); with ``window``, the mean over sliding windows
    (:func:`medssl.eval.sliding.sliding_features`)."""
    if not isinstance(batch, dict) or "image" not in batch:
        raise DataError("dataset items must be dicts with an 'image' tensor")
    images = batch["image"].to(device, non_blocking=True)
    if window is not None:
        from medssl.eval.sliding import sliding_features

        if len(window) != images.ndim - 2:
            raise DataError(f"a {len(window)}D sliding window cannot cover images of shape {tuple(images.shape[1:])}")
        out = sliding_features(encoder, images, window, overlap=overlap)
    else:
        out = encoder(images)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(
            f"the encoder must return (B, D) features for a batch of {images.shape[0]} images, got "
            f"{shape}; pool spatial feature maps inside the encoder"
        )
    return out.float().cpu().numpy()


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool | str = False,
    window: tuple[int, ...] | None = None,
    overlap: float = 0.25,
) -> np.ndarray:
    """Embed ``dataset[indices]`` with a frozen encoder.

    The encoder receives the dataset's ``[0, 1]`` image batch as is (intensity normalisation lives inside
    the encoder) and must return one vector per image, ``(B, D)``. The encoder is moved to ``device`` and
    put in ``eval()`` mode for the extraction (batch-norm running statistics and dropout frozen); its
    previous train/eval mode is restored afterwards.

    Args:
        encoder: Module mapping ``(B, C, H, W)`` or ``(B, C, D, H, W)`` images to ``(B, D)`` features.
        dataset: Dataset whose items are dicts with an ``"image"`` tensor.
        indices: Dataset indices to embed; the output rows follow this order.
        batch_size: Images per forward pass.
        device: Where the forward passes run.
        num_workers: DataLoader worker processes.
        progress: show a progress bar / plain lines (:class:`medssl.engine.logging.TaskProgress`); a string is
            its label (default ``features``).
        window: 3D: the encoder sees windows of this size sliding over each whole volume and the feature is the
            mean over windows (:func:`medssl.eval.sliding.sliding_features`); ``None``: the whole image at once.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``.

    Returns:
        ``(len(indices), D)`` float32 array, row ``i`` the feature of ``dataset[indices[i]]``.

    Raises:
        DataError: ``indices`` is empty or out of range, an item has no ``"image"``, the encoder does not
            return ``(B, D)`` or returns non-finite values.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0:
        raise DataError(f"extract_features needs a non-empty 1-D array of indices, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise DataError(f"indices must be integers, got dtype {idx.dtype}")
    n_data = len(dataset)  # type: ignore[arg-type]
    if idx.min() < -n_data or idx.max() >= n_data:
        raise DataError(f"indices out of range for a dataset of {n_data} items: [{idx.min()}, {idx.max()}]")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")

    device = torch.device(device)
    loader = DataLoader(
        Subset(dataset, idx.tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    was_training = encoder.training
    encoder.to(device)
    encoder.eval()
    chunks: list[np.ndarray] = []
    label = progress if isinstance(progress, str) else "features"
    try:
        with TaskProgress(label, int(idx.size), enabled=bool(progress), unit="images") as bar:
            for batch in loader:
                chunks.append(_embed_batch(encoder, batch, device, window, overlap))
                bar.advance(chunks[-1].shape[0])
    finally:
        encoder.train(was_training)
    features = np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
    bad = ~np.all(np.isfinite(features), axis=1)
    if bad.any():
        raise DataError(
            f"the encoder produced non-finite features for {int(bad.sum())} of {features.shape[0]} images "
            f"(first dataset index {int(idx[np.argmax(bad)])}); the checkpoint may have diverged"
        )
    return features
