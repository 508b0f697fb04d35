"""What the image-level protocols (``finetune``, ``segment``) share: the task object, batches, augmentation,
layer-wise learning rates and a training loop with early stopping.

:class:`ImageTask` is the ``data`` argument of these protocols in
:func:`medssl.eval.protocol.run_protocol`: like a :class:`~medssl.eval.protocol.FeatureSet` it exposes
``train_y`` / ``val_y`` / ``multilabel`` (so fractions and seeds are drawn by the same code), but it carries
the dataset, its split indices and the encoder instead of frozen features. Protocols never modify
``task.encoder``; each (fraction, seed) trains a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.engine.optim import param_groups
from medssl.engine.schedule import warmup_cosine
from medssl.errors import ConfigError, DataError
from medssl.nn.segmentation import core_backbone, is_resnet_like, is_vit_like
from medssl.transforms.spatial import crop_resize, sample_crop_boxes

CACHE_BYTES = 1 << 30
"""Splits whose images (and masks) take at most this many bytes are loaded once and kept in memory."""

CROP_SCALE = (0.6, 1.0)
"""Area / volume fraction of the random resized crop used as training augmentation."""

CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect ratios of adjacent axes of the random resized crop."""


@dataclass
class ImageTask:
    """A labelled (or masked) dataset, its split indices and an encoder, for image-level protocols.

    Attributes:
        dataset: A medssl dataset (items are dicts with ``image`` and, where present, ``label`` / ``mask``).
        encoder: ``[0, 1]`` images -> ``(B, D)`` features (:class:`medssl.nn.backbones.Encoder`); copied, never
            modified.
        splits: ``{"train", "val", "test"}`` -> dataset indices.
        train_y: Training labels used to stratify label fractions (zeros when the dataset has no labels).
        val_y: Validation labels (``None`` without a validation split).
        test_y: Test labels (``None`` without labels).
        multilabel: Multi-label task.
        num_classes: Classes (or labels); 0 without labels.
        class_names: Class names or ``None``.
        test_groups: Patient ids of the test items (bootstrap clusters) or ``None``.
        has_labels: Whether the dataset carries image-level labels.
        device: Where training runs.
    """

    dataset: Any
    encoder: nn.Module
    splits: dict[str, np.ndarray]
    train_y: np.ndarray
    val_y: np.ndarray | None
    test_y: np.ndarray | None
    multilabel: bool = False
    num_classes: int = 0
    class_names: list[str] | None = None
    test_groups: np.ndarray | None = None
    has_labels: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _cache: dict[str, dict[str, torch.Tensor] | None] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dataset(
        cls, dataset: Any, encoder: nn.Module, *, device: str | torch.device = "cpu",
        splits: dict[str, np.ndarray] | None = None,
    ) -> ImageTask:
        """Build the task from a medssl dataset (its ``indices(split)``, ``labels``, ``patient_ids``).

        Raises:
            DataError: An empty train or test split.
        """
        idx = splits or {s: np.asarray(dataset.indices(s), dtype=np.int64) for s in ("train", "val", "test")}
        idx = {s: np.asarray(idx.get(s, np.zeros(0, np.int64)), dtype=np.int64) for s in ("train", "val", "test")}
        for s in ("train", "test"):
            if idx[s].size == 0:
                raise DataError(f"data {getattr(dataset, 'name', '')}: the {s!r} split is empty")
        labels = getattr(dataset, "labels", None)
        has_labels = labels is not None
        lab = np.asarray(labels) if has_labels else np.zeros(len(dataset), dtype=np.int64)
        ids = getattr(dataset, "patient_ids", None)
        names = getattr(dataset, "class_names", None)
        return cls(
            dataset=dataset, encoder=encoder, splits=idx,
            train_y=lab[idx["train"]],
            val_y=lab[idx["val"]] if idx["val"].size else None,
            test_y=lab[idx["test"]] if has_labels else None,
            multilabel=bool(getattr(dataset, "multilabel", False)),
            num_classes=int(getattr(dataset, "num_classes", 0)) if has_labels else 0,
            class_names=list(names) if names is not None and has_labels else None,
            test_groups=None if ids is None else np.asarray(ids)[idx["test"]],
            has_labels=has_labels, device=torch.device(device),
        )

    @property
    def spatial_dims(self) -> int:
        return int(getattr(self.dataset, "spatial_dims", 2))

    def _load(self, split: str, positions: np.ndarray) -> dict[str, torch.Tensor]:
        items = [self.dataset[int(i)] for i in self.splits[split][positions]]
        out = {"image": torch.stack([it["image"] for it in items])}
        if all("mask" in it for it in items):
            out["mask"] = torch.stack([it["mask"] for it in items]).long()
        return out

    def _cached(self, split: str) -> dict[str, torch.Tensor] | None:
        if split not in self._cache:
            n = self.splits[split].size
            first = self.dataset[int(self.splits[split][0])]
            per_item = first["image"].numel() * 4 + (first["mask"].numel() * 8 if "mask" in first else 0)
            self._cache[split] = self._load(split, np.arange(n)) if n * per_item <= CACHE_BYTES else None
        return self._cache[split]

    def batches(
        self, split: str, positions: np.ndarray, batch_size: int, rng: np.random.Generator | None = None,
        drop_last_single: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``split`` items at ``positions`` (indices into the split), shuffled when ``rng`` is given.

        Each batch is ``{"image", "pos"}`` plus ``"mask"`` where items have masks. ``drop_last_single`` drops a
        trailing batch of one item (batch norm cannot train on it).
        """
        pos = np.asarray(positions, dtype=np.int64)
        if rng is not None:
            pos = rng.permutation(pos)
        cached = self._cached(split)
        for start in range(0, pos.size, batch_size):
            chunk = pos[start : start + batch_size]
            if drop_last_single and chunk.size == 1 and pos.size > 1:
                break
            batch = {k: v[torch.from_numpy(chunk)] for k, v in cached.items()} if cached else self._load(split, chunk)
            batch["pos"] = torch.from_numpy(chunk)
            yield batch

    def masks_required(self) -> None:
        """Raise a clear error when the dataset has no segmentation masks."""
        if not getattr(self.dataset, "has_masks", False):
            name = getattr(self.dataset, "name", type(self.dataset).__name__)
            raise ConfigError(
                f"data {name}: has no segmentation masks; --protocol segment needs a dataset with masks "
                "(phantom2d, phantom3d, isic2017 with its Part1 ground truth)"
            )


def augment(
    images: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Light training augmentation: random resized crop (:data:`CROP_SCALE`) + a random flip of every axis.

    The same crop and flips apply to the masks (nearest-neighbour resampling). 2D and 3D.
    """
    sd = images.ndim - 2
    shape = tuple(images.shape[2:])
    boxes = sample_crop_boxes(images.shape[0], sd, CROP_SCALE, CROP_RATIO, device=images.device,
                              generator=generator, image_shape=shape)
    flips = torch.rand((images.shape[0], sd), generator=generator).to(images.device) < 0.5
    out = crop_resize(images, boxes, shape, flips)
    if masks is None:
        return out, None
    m = crop_resize(masks[:, None].float(), boxes, shape, flips, mode="nearest")[:, 0]
    return out, m.round().long()


def _layer_of(name: str, vit_depth: int | None) -> int:
    if vit_depth is not None:
        if name.startswith(("patch_embed", "cls_token", "pos_embed", "reg_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return vit_depth + 1
    if name.startswith(("conv1", "bn1")):
        return 0
    for k in range(1, 5):
        if name.startswith(f"layer{k}."):
            return k
    return 5


def lr_groups(
    model: nn.Module, encoder: nn.Module, weight_decay: float, layer_decay: float | None
) -> list[dict[str, Any]]:
    """AdamW parameter groups with an ``lr_scale`` each: weight decay except for norms / biases / tokens
    (:func:`medssl.engine.optim.param_groups`) and, with ``layer_decay``, layer-wise learning-rate decay.

    Layer-wise decay (BEiT, Bao et al. 2022; the MAE fine-tuning recipe, He et al. 2022): parameters at depth
    ``i`` of ``L`` get ``lr · layer_decay^(L + 1 − i)``: the patch embedding (ViT) or stem (ResNet) is depth 0,
    transformer block / ResNet stage ``j`` is ``j``, everything after the backbone (head, decoder, whitening)
    ``L + 1`` and keeps the full rate.

    Raises:
        ConfigError: ``layer_decay`` outside ``(0, 1]`` or an encoder that is neither a ViT nor a ResNet.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_decay is None:
        groups = param_groups(named, weight_decay)
        for g in groups:
            g["lr_scale"] = 1.0
        return groups
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must lie in (0, 1], got {layer_decay}")
    core = core_backbone(encoder)
    if is_vit_like(core):
        depth: int | None = len(core.blocks)
        top = int(depth) + 1
    elif is_resnet_like(core):
        depth, top = None, 5
    else:
        raise ConfigError(f"layer_decay needs a ViT (blocks) or ResNet (layer1..4) encoder, got {type(core).__name__}")
    layer_by_param = {id(p): _layer_of(n, depth) for n, p in core.named_parameters()}
    by_layer: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for n, p in named:
        by_layer.setdefault(layer_by_param.get(id(p), top), []).append((n, p))
    groups = []
    for layer in sorted(by_layer):
        for g in param_groups(by_layer[layer], weight_decay):
            g["lr_scale"] = float(layer_decay ** (top - layer))
            groups.append(g)
    return groups


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block and restore the previous setting after (``None``: no change)."""
    if n is None:
        yield
        return
    if n < 1:
        raise ConfigError(f"num_threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class FitResult:
    """Outcome of :func:`fit`: epochs run, the epoch kept (1-based), its validation score, the history."""

    epochs_run: int
    best_epoch: int
    best_score: float
    history: list[float]
    early_stopped: bool


def fit(
    model: nn.Module,
    groups: list[dict[str, Any]],
    epoch_batches: Callable[[int], Iterator[dict[str, torch.Tensor]]],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    *,
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    validate: Callable[[nn.Module], float] | None,
    patience: int,
    warmup_epochs: float = 1.0,
) -> FitResult:
    """Train with AdamW and a warm-up + cosine schedule; keep the weights of the best validation epoch.

    ``validate`` (higher is better, ``NaN`` = unusable) runs after every epoch; training stops when it has not
    improved for ``patience`` epochs and the best epoch's weights are restored. Without ``validate`` (or when
    it is ``NaN`` at every epoch) all epochs run and the last weights are kept.

    Raises:
        DataError: A non-finite loss (diverged training: lower ``lr``).
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if patience < 1:
        raise ConfigError(f"patience must be >= 1, got {patience}")
    opt = torch.optim.AdamW(groups, lr=lr)
    total = max(1, epochs * steps_per_epoch)
    warm = min(int(round(warmup_epochs * steps_per_epoch)), total // 2)
    scales = [g["lr_scale"] for g in opt.param_groups]
    step = 0
    best, best_epoch, best_state = -math.inf, 0, None
    history: list[float] = []
    stopped = False
    for epoch in range(epochs):
        model.train()
        for batch in epoch_batches(epoch):
            factor = warmup_cosine(step, total, warm)
            for g, s in zip(opt.param_groups, scales, strict=True):
                g["lr"] = lr * s * factor
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise DataError(f"training diverged (non-finite loss at epoch {epoch + 1}); lower lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if validate is None:
            continue
        score = float(validate(model))
        history.append(score)
        if not math.isnan(score) and score > best:
            best, best_epoch = score, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        elif best_state is not None and epoch + 1 - best_epoch >= patience:
            stopped = True
            break
    epochs_run = epoch + 1
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch, best = epochs_run, math.nan
    return FitResult(epochs_run, best_epoch, best, history, stopped)
