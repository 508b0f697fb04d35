"""The pretraining data: which items are read, in which order, in which batches.

The order depends only on ``(train.seed, epoch)`` (:class:`~medssl.engine.sampler.ResumableBatchSampler`),
so a resumed run feeds exactly the batches the uninterrupted run would have fed. The data seed is a property
of the dataset (phantom content, split assignment), not of the run: evaluation sees the same splits, and
pretraining never reads the test images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medssl.config import PretrainConfig
from medssl.engine.rundir import RunDir
from medssl.engine.sampler import ResumableBatchSampler
from medssl.errors import ConfigError
from medssl.methods import DataInfo, ViewSpec

log = logging.getLogger("medssl")

#: The dataset splits each ``data.split`` choice reads (``None``: every item, test included).
_SPLIT_PARTS: dict[str, list[str] | None] = {"train": ["train"], "train+val": ["train", "val"], "all": None}


def pretrain_indices(dataset: Any, split: str) -> np.ndarray:
    """Indices pretraining may read: ``train`` (default), ``train+val`` or ``all`` (test included)."""
    parts = _SPLIT_PARTS[split]
    if parts is None:
        return np.arange(len(dataset))
    return np.concatenate([dataset.indices(p) for p in parts]).astype(np.int64)


def _collate_images(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack what pretraining needs (images, and high-res copies where present); labels are not read."""
    out = {"image": torch.stack([it["image"] for it in items])}
    for key in items[0]:
        if key.startswith("image_highres"):  # image_highres (2x), image_highres_x4 ...
            out[key] = torch.stack([it[key] for it in items])
    out["index"] = torch.tensor([int(it["index"]) for it in items])
    return out


def _collate_crops(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Items of ``n`` crops each (:class:`~medssl.data.patches.PatchDataset`) → one batch of ``B × n`` crops, the
    crops of a volume next to each other; ``index`` repeats the volume's index."""
    images = torch.cat([it["image"] for it in items])
    index = torch.tensor([int(it["index"]) for it in items for _ in range(it["image"].shape[0])])
    return {"image": images, "index": index}


def open_data(cfg: PretrainConfig, run: RunDir, is_global_zero: bool) -> Any:
    """Open ``cfg.data``; with ``data.skip_bad`` drop the unreadable items and list them in ``RUN/skipped.csv``
    at once (global rank 0), so the log line pointing there is true even if the run fails later."""
    from medssl.data.specs import open_from_config

    dataset = open_from_config(cfg.data)
    if cfg.data.skip_bad:
        from medssl.data.manifest import drop_bad

        dataset = drop_bad(dataset)
        if is_global_zero:
            run.write_skipped(dataset.skipped)
        if dataset.skipped:
            log.warning("data %s: skipped %d unreadable item(s), listed in %s", cfg.data.spec, len(dataset.skipped),
                        run.skipped)
    return patch_dataset(cfg, dataset)


def patch_dataset(cfg: PretrainConfig, dataset: Any) -> Any:
    """3D data in ``data.volume_mode: patches``: the dataset of crops (:class:`~medssl.data.patches.PatchDataset`),
    with ``data.patch_size`` resolved (default: the ``data.image_size`` cube, else the volume's native cube) so
    that ``config.yaml`` records it; any other dataset as it is.

    Raises:
        ConfigError: ``train.batch_size`` is not a multiple of ``data.samples_per_volume``.
    """
    d = cfg.data
    if dataset.spatial_dims != 3 or d.volume_mode != "patches":
        return dataset
    from medssl.data.patches import PatchDataset, PatchSampling

    if d.patch_size is None:
        d.patch_size = [int(d.image_size or dataset.image_size)] * 3
    if cfg.train.batch_size % d.samples_per_volume:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be a multiple of data.samples_per_volume "
                          f"{d.samples_per_volume} (a batch holds batch_size crops from batch_size / "
                          "samples_per_volume volumes)")
    sampling = PatchSampling(tuple(d.patch_size), d.samples_per_volume, d.foreground_p, d.foreground_threshold,
                             seed=cfg.train.seed)
    return PatchDataset(dataset, sampling)


@dataclass
class TrainData:
    """The loader and the numbers derived from it.

    Attributes:
        indices: the dataset items pretraining reads (:func:`pretrain_indices`).
        sampler: this rank's resumable batch sampler.
        loader: the DataLoader over the sampler.
        info: what the method needs to know about the data.
        steps_per_epoch: global batches per epoch.
        total_steps: ``train.max_steps``, else ``train.epochs × steps_per_epoch``.
        global_batch: ``train.batch_size × world size``.
    """

    indices: np.ndarray
    sampler: ResumableBatchSampler
    loader: torch.utils.data.DataLoader
    info: DataInfo
    steps_per_epoch: int
    total_steps: int
    global_batch: int


def build_loader(cfg: PretrainConfig, dataset: Any, view_spec: ViewSpec, fabric: Any) -> TrainData:
    """The DataLoader of this rank: ``data.split`` items, resumable order, high-res copies if the method needs
    them (multi-scale reconstruction reads the same images at 2x / 4x the size).

    Raises:
        ConfigError: fewer items than one global batch (with ``drop_last``), or a run of 0 steps.
    """
    t = cfg.train
    indices = pretrain_indices(dataset, cfg.data.split)
    spv = int(getattr(dataset, "samples_per_volume", 0) or 0)  # > 0: a PatchDataset, items of spv crops
    per_step = t.batch_size // spv if spv else t.batch_size  # items (volumes) read per step and rank
    global_batch = per_step * fabric.world_size
    if len(indices) < global_batch and t.drop_last:
        unit = f"volumes ({t.batch_size} crops / {spv} per volume)" if spv else "images"
        raise ConfigError(f"data {cfg.data.spec}: {len(indices)} training images, fewer than one batch of "
                          f"{global_batch} {unit}; lower --batch-size")
    sampler = ResumableBatchSampler(indices, per_step, seed=t.seed, rank=fabric.global_rank,
                                    world_size=fabric.world_size, drop_last=t.drop_last)
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    if total_steps <= 0:
        raise ConfigError("nothing to train: max_steps / epochs give 0 steps")
    loader_data: torch.utils.data.Dataset = dataset
    batches: Any = sampler
    collate = _collate_images
    if spv:
        if view_spec.needs_highres:
            raise ConfigError(f"method {cfg.method_name} reads high-resolution copies, which data.volume_mode "
                              "patches does not make; set data.volume_mode: resize")
        from medssl.data.patches import EpochTagged

        batches, collate = EpochTagged(sampler), _collate_crops
    elif view_spec.needs_highres:
        from medssl.data.highres import HighResDataset

        loader_data = HighResDataset(dataset, view_spec.highres_factors)
    loader = torch.utils.data.DataLoader(
        loader_data, batch_sampler=batches, num_workers=cfg.data.num_workers, collate_fn=collate,
        pin_memory=fabric.device.type == "cuda", persistent_workers=False,
        generator=torch.Generator(),  # keeps the global RNG untouched by iterator creation (resume equality)
    )
    info = DataInfo(in_chans=dataset.in_chans, spatial_dims=dataset.spatial_dims,
                    image_size=int(cfg.data.image_size), num_samples=len(indices))
    return TrainData(indices, sampler, loader, info, steps_per_epoch, total_steps, global_batch)
