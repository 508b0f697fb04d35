"""``segment``: a decoder on the encoder (fine-tuned, or frozen), trained on a label fraction of the masks.

The segmentation evaluation of Med-MoCo and GraVIS (mean Dice / Jaccard): :class:`medssl.nn.segmentation.
SegmentationNet` puts a U-Net decoder on a CNN's multi-scale features or a progressive-upsampling decoder on
a ViT's patch tokens (2D and 3D), trained with cross-entropy + soft Dice (Milletari et al., V-Net, 3DV 2016)
over the foreground classes, AdamW with a warm-up + cosine schedule, flips + random resized crop applied to
image and mask alike, and early stopping on the mean foreground Dice of the (budgeted) validation subset.

A label fraction here is a fraction of the *training images* (with their masks), drawn by
:func:`medssl.eval.protocol.run_protocol`: stratified on the image-level label where the dataset has one
(e.g. lesion present / absent), plain random with the seed otherwise. The test metrics are per-image Dice
and Jaccard (:func:`medssl.eval.metrics.dice_jaccard`) averaged over images per class and over the
foreground classes, with bootstrap CIs over test images (patients where there are patient ids).

3D volumes can be segmented with a sliding window (``window``, ``overlap``): the network is trained on one
random window of each training volume per step and predicts the test volumes window by window (MONAI's
``sliding_window_inference``); Dice is computed on the whole volume.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl.errors import ConfigError, DataError
from medssl.eval.bootstrap import DEFAULT_N_BOOT, segmentation_ci
from medssl.eval.images import ImageTask, augment, fit, lr_groups, torch_threads
from medssl.eval.metrics import dice_jaccard, segmentation_metrics_with_notes
from medssl.eval.protocol import ProtocolOutput
from medssl.eval.registry import register_protocol
from medssl.nn.segmentation import SegmentationNet


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                 eps: float = 1.0) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` × (1 − mean soft Dice over the foreground classes), batch-wise.

    Soft Dice of class ``c``: ``(2 Σ p_c t_c + eps) / (Σ p_c + Σ t_c + eps)`` over every pixel of the batch,
    ``p`` the softmax, ``t`` the one-hot target.

    Args:
        logits: ``(B, K, *spatial)``.
        target: ``(B, *spatial)`` int64 labels in ``[0, K)``.
        dice_weight: Weight of the Dice term.
        eps: Smoothing of the Dice ratio.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    k = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, k).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return ce + dice_weight * (1.0 - dice[1:].mean())


@torch.no_grad()
def predict_scores(
    model: nn.Module, task: ImageTask, split: str, positions: np.ndarray, batch_size: int, num_classes: int,
    *, window: tuple[int, ...] | None = None, overlap: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and Jaccard ``(N, K)`` of the argmax predictions on ``split`` items at ``positions``.

    With ``window`` (3D), each whole volume is predicted by sliding-window inference
    (:func:`medssl.eval.sliding.sliding_logits`, ``overlap`` between windows) and scored whole."""
    model.eval()
    dice, jac = [], []
    for batch in task.batches(split, positions, batch_size):
        images = batch["image"].to(task.device)
        if window is not None and images.ndim == 5:
            from medssl.eval.sliding import sliding_logits

            logits = sliding_logits(model, images, window, overlap=overlap, sw_batch_size=batch_size)
        else:
            logits = model(images)
        pred = logits.argmax(dim=1).cpu().numpy()
        d, j = dice_jaccard(pred, batch["mask"].numpy(), num_classes)
        dice.append(d)
        jac.append(j)
    return np.concatenate(dice), np.concatenate(jac)


def _num_classes(task: ImageTask, given: int | None) -> int:
    if given is not None:
        if given < 2:
            raise ConfigError(f"segment: num_classes must be >= 2 (background + foreground), got {given}")
        return int(given)
    top = 0
    for split in ("train", "test"):
        for batch in task.batches(split, np.arange(task.splits[split].size), 64):
            if "mask" not in batch:
                raise DataError(f"segment: items of the {split} split carry no 'mask'")
            top = max(top, int(batch["mask"].max()))
    return max(2, top + 1)


@register_protocol("segment", inputs="images", needs_labels=False, deterministic=False, trains=True,
                   help="a decoder on the encoder, trained on the images' masks (--epochs, default 20)")
def segment_protocol(
    data: ImageTask,
    train_subset: np.ndarray,
    seed: int,
    *,
    val_subset: np.ndarray | None = None,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    freeze_encoder: bool = False,
    layer_decay: float | None = None,
    dice_weight: float = 1.0,
    num_classes: int | None = None,
    patience: int = 5,
    augmentation: bool = True,
    warmup_epochs: float = 1.0,
    num_threads: int | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    window: int | None = None,
    overlap: float = 0.25,
) -> ProtocolOutput:
    """Train a segmentation decoder (and, by default, the encoder) on the training subset; score on test.

    Args:
        data: The image task; the dataset must have masks.
        train_subset: Positions in the training split (the labelled images).
        seed: Seed (decoder initialisation, shuffling, augmentation).
        val_subset: Positions in the validation split for early stopping (mean foreground Dice).
        epochs: Maximum epochs.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not on norms, biases, tokens).
        batch_size: Images per step.
        freeze_encoder: Train the decoder only (encoder weights and batch-norm statistics fixed).
        layer_decay: Layer-wise learning-rate decay of the encoder (fine-tuning only).
        dice_weight: Weight of the soft-Dice term next to cross-entropy.
        num_classes: Mask classes incl. background (default: the largest label in the train/test masks + 1).
        patience: Epochs without validation improvement before stopping.
        augmentation: Random resized crop + flips of image and mask.
        warmup_epochs: Linear warm-up length.
        num_threads: CPU threads during this call (restored afterwards).
        n_boot: Bootstrap replicates of the test CIs (0: none).
        window: 3D: side of the sliding window the test / validation volumes are predicted with (the network is
            built and trained at that size, on random crops of the training volumes); ``None`` = the whole volume
            at once.
        overlap: Sliding-window overlap in ``[0, 1)``.

    Returns:
        ``metrics`` ``dice`` and ``jaccard`` (mean over foreground classes), ``per_class`` Dice / Jaccard of
        every class, CIs, notes and params (``best_epoch``, ``epochs_run``, ``val_dice``, ``decoder``, ...).

    Raises:
        ConfigError: A dataset without masks, or invalid options.
    """
    data.masks_required()
    if batch_size < 1:
        raise ConfigError(f"segment: batch_size must be >= 1, got {batch_size}")
    k = _num_classes(data, num_classes)
    train_subset = np.asarray(train_subset, dtype=np.int64)
    notes: list[str] = []
    names = ["background"] + [f"class {c}" for c in range(1, k)]
    if k == 2:
        names = ["background", "foreground"]
    image_shape = tuple(int(s) for s in next(data.batches("train", train_subset[:1], 1))["image"].shape[2:])
    in_chans = int(next(data.batches("train", train_subset[:1], 1))["image"].shape[1])
    if not 0.0 <= float(overlap) < 1.0:
        raise ConfigError(f"segment: overlap must be in [0, 1), got {overlap!r}")
    sw: tuple[int, ...] | None = None
    if window is not None:
        if len(image_shape) != 3 or not 2 <= int(window) <= min(image_shape):
            raise ConfigError(f"segment: window must be a 3D window side in [2, {min(image_shape)}] (the volumes' "
                              f"smallest side), got {window!r} for images of shape {image_shape}")
        sw = (int(window),) * 3
        image_shape = sw
    with torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = copy.deepcopy(data.encoder).to(data.device)
        model = SegmentationNet(encoder, k, in_chans, image_shape, freeze_encoder=freeze_encoder).to(data.device)
        gen = torch.Generator().manual_seed(int(seed))
        rng = np.random.default_rng([int(seed), 0x5E6])

        def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            x, y = batch["image"].to(data.device), batch["mask"].to(data.device)
            if sw is not None:  # one random window per volume, image and mask alike
                corner = [int(torch.randint(0, n - w + 1, (1,), generator=gen)) for n, w in zip(x.shape[2:], sw,
                                                                                               strict=True)]
                box = tuple(slice(c, c + w) for c, w in zip(corner, sw, strict=True))
                x, y = x[(slice(None), slice(None), *box)], y[(slice(None), *box)]
            if augmentation:
                x, y = augment(x, y, gen)
            return dice_ce_loss(m(x), y, dice_weight)

        def epoch_batches(epoch: int):
            return data.batches("train", train_subset, batch_size, rng, drop_last_single=True)

        validate = None
        val_pos = None if val_subset is None or data.splits["val"].size == 0 else np.asarray(val_subset, np.int64)
        if val_pos is not None and val_pos.size:
            def validate(m: nn.Module) -> float:
                d, j = predict_scores(m, data, "val", val_pos, batch_size, k, window=sw, overlap=overlap)
                return segmentation_metrics_with_notes(d, j)[0]["dice"]

        steps = max(1, int(np.ceil(train_subset.size / batch_size)))
        groups = lr_groups(model, encoder, weight_decay, None if freeze_encoder else layer_decay)
        result = fit(model, groups, epoch_batches, loss_fn, epochs=epochs, steps_per_epoch=steps, lr=lr,
                     validate=validate, patience=patience, warmup_epochs=warmup_epochs)
        if validate is None or np.isnan(result.best_score):
            notes.append(f"segment: no usable validation masks; trained all {epochs} epochs and kept the last weights")
        dice, jac = predict_scores(model, data, "test", np.arange(data.splits["test"].size), batch_size, k,
                                   window=sw, overlap=overlap)
    metrics, per_class, metric_notes = segmentation_metrics_with_notes(dice, jac, class_names=names)
    ci = segmentation_ci(dice, jac, groups=data.test_groups, n_boot=n_boot, seed=seed) if n_boot else None
    params: dict[str, Any] = {
        "epochs": epochs, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "val_dice": result.best_score, "val_history": result.history, "early_stopped": result.early_stopped,
        "lr": lr, "freeze_encoder": freeze_encoder, "decoder": "unet" if model.kind == "cnn" else "pup",
        "num_classes": k, "batch_size": batch_size, "n_val": 0 if val_pos is None else int(val_pos.size),
        "window": None if sw is None else list(sw), "overlap": overlap,
    }
    return ProtocolOutput(metrics, notes + metric_notes, params, ci=ci, per_class=per_class)
