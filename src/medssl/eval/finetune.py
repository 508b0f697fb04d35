"""``finetune``: train the whole encoder plus a linear head on a label fraction, score on the test split.

The standard "full fine-tuning" evaluation of SSL encoders (MoCo v2, Chen et al. 2020; MAE, He et al. 2022;
the low-label settings of MIRAM and CASS): a copy of the encoder with a linear head on its pooled features is
trained end to end with AdamW and a warm-up + cosine schedule, optionally with layer-wise learning-rate decay
(``layer_decay``, BEiT / MAE fine-tuning), light augmentation (random resized crop and flips, 2D and 3D) and
early stopping on the (budgeted) validation subset's macro ROC AUC. Loss: class-weighted cross-entropy
(multi-class, weights ``n / (C · n_c)`` of the training subset), binary cross-entropy (multi-label), or the
sigmoid focal loss (``loss="focal"``, Lin et al. 2017, with the same class weights).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl.errors import ConfigError
from medssl.eval.bootstrap import DEFAULT_N_BOOT
from medssl.eval.images import ImageTask, augment, fit, lr_groups, torch_threads
from medssl.eval.metrics import classification_metrics
from medssl.eval.protocol import ProtocolOutput, score_classification
from medssl.eval.registry import register_protocol
from medssl.losses.focal import balanced_class_weights, sigmoid_focal_loss

LOSSES = ("ce", "focal")


class LinearClassifier(nn.Module):
    """Encoder (pooled ``(B, D)`` features) followed by a linear layer to ``num_outputs`` logits."""

    def __init__(self, encoder: nn.Module, num_features: int, num_outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(num_features, num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def _num_features(encoder: nn.Module, task: ImageTask) -> int:
    n = getattr(encoder, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    with torch.no_grad():
        x = next(task.batches("train", np.arange(1), 1))["image"].to(task.device)
        was = encoder.training
        encoder.eval()
        d = int(encoder(x).shape[1])
        encoder.train(was)
    return d


@torch.no_grad()
def predict_probs(model: nn.Module, task: ImageTask, split: str, positions: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities (softmax; sigmoid for multi-label) of ``split`` items at ``positions``."""
    model.eval()
    out = []
    for batch in task.batches(split, positions, batch_size):
        logits = model(batch["image"].to(task.device)).float()
        out.append((torch.sigmoid(logits) if task.multilabel else torch.softmax(logits, dim=1)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


@register_protocol("finetune", inputs="images", needs_labels=True, deterministic=False, trains=True,
                   help="the whole network plus a linear head, trained on the images (--epochs, default 20)")
def finetune_protocol(
    data: ImageTask,
    train_subset: np.ndarray,
    seed: int,
    *,
    val_subset: np.ndarray | None = None,
    epochs: int = 20,
    lr: float = 3e-4,
    weight_decay: float = 0.05,
    batch_size: int = 32,
    layer_decay: float | None = None,
    loss: str = "ce",
    class_weighted: bool = True,
    focal_gamma: float = 2.0,
    patience: int = 5,
    augmentation: bool = True,
    warmup_epochs: float = 1.0,
    num_threads: int | None = None,
    n_boot: int = DEFAULT_N_BOOT,
) -> ProtocolOutput:
    """Fine-tune a copy of ``data.encoder`` with a linear head on the training subset; score on the test split.

    Deterministic given ``seed`` (head initialisation, shuffling and augmentations are seeded) on CPU.

    Args:
        data: The image task (:class:`medssl.eval.images.ImageTask`); needs image-level labels.
        train_subset: Positions in the training split.
        seed: Seed of the run.
        val_subset: Positions in the validation split for early stopping (macro AUC); ``None``: no early stopping.
        epochs: Maximum epochs over the training subset.
        lr: Peak AdamW learning rate (head; the backbone gets ``lr`` scaled by ``layer_decay``).
        weight_decay: AdamW weight decay (not on norms, biases, tokens).
        batch_size: Images per step.
        layer_decay: Layer-wise learning-rate decay factor (e.g. 0.75 for ViTs), ``None`` for none.
        loss: ``ce`` (cross-entropy; binary cross-entropy for multi-label) or ``focal``.
        class_weighted: Weight classes by ``n / (C · n_c)`` of the training subset (``ce`` multi-class, focal).
        focal_gamma: Focusing exponent of the focal loss.
        patience: Epochs without validation improvement before stopping.
        augmentation: Random resized crop + flips during training.
        warmup_epochs: Linear warm-up length.
        num_threads: CPU threads during this call (restored afterwards); ``None`` leaves the setting alone.
        n_boot: Bootstrap replicates of the test CIs (0: none).

    Returns:
        Test metrics, per-class AUC / AP, CIs, notes, and params (``best_epoch``, ``epochs_run``, ``val_auc``,
        ``lr``, ``layer_decay``, ``loss``, ``n_val``).

    Raises:
        ConfigError: No labels, or an invalid option.
    """
    if not data.has_labels:
        raise ConfigError("finetune needs image-level labels; the dataset has none")
    if loss not in LOSSES:
        raise ConfigError(f"finetune: loss must be one of {LOSSES}, got '{loss}'")
    if batch_size < 1:
        raise ConfigError(f"finetune: batch_size must be >= 1, got {batch_size}")
    notes: list[str] = []
    train_subset = np.asarray(train_subset, dtype=np.int64)
    y_train = np.asarray(data.train_y)[train_subset]
    k = data.num_classes
    with torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = copy.deepcopy(data.encoder).to(data.device)  # keeps its own requires_grad flags (fixed pos. emb.)
        model = LinearClassifier(encoder, _num_features(encoder, data), k).to(data.device)
        weights = balanced_class_weights(y_train, k).to(data.device) if class_weighted else None
        missing = [c for c in range(k) if weights is not None and float(weights[c]) == 0.0]
        if missing and not data.multilabel:
            notes.append(f"finetune: class(es) {missing} absent from the training subset")
        labels_t = torch.as_tensor(np.asarray(data.train_y))
        gen = torch.Generator().manual_seed(int(seed))
        rng = np.random.default_rng([int(seed), 0xF1])

        def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            x = batch["image"].to(data.device)
            if augmentation:
                x, _ = augment(x, None, gen)
            logits = m(x).float()
            y = labels_t[batch["pos"]].to(data.device)
            if loss == "focal":
                return sigmoid_focal_loss(logits, y.float() if data.multilabel else y, gamma=focal_gamma,
                                          alpha=None, class_weights=weights)
            if data.multilabel:
                return F.binary_cross_entropy_with_logits(logits, y.float())
            return F.cross_entropy(logits, y.long(), weight=weights)

        def epoch_batches(epoch: int):
            return data.batches("train", train_subset, batch_size, rng, drop_last_single=True)

        validate = None
        val_pos = None if val_subset is None or data.val_y is None else np.asarray(val_subset, dtype=np.int64)
        if val_pos is not None and val_pos.size:
            val_y = np.asarray(data.val_y)[val_pos]

            def validate(m: nn.Module) -> float:
                probs = predict_probs(m, data, "val", val_pos, max(batch_size, 64))
                return classification_metrics(val_y, probs, data.multilabel)["auc_macro"]

        steps = max(1, int(np.ceil(train_subset.size / batch_size)))
        result = fit(model, lr_groups(model, encoder, weight_decay, layer_decay), epoch_batches, loss_fn,
                     epochs=epochs, steps_per_epoch=steps, lr=lr, validate=validate, patience=patience,
                     warmup_epochs=warmup_epochs)
        if validate is None or np.isnan(result.best_score):
            notes.append(f"finetune: no usable validation labels (none, or a single class); trained all {epochs} "
                         "epochs and kept the last weights")
        probs = predict_probs(model, data, "test", np.arange(data.splits["test"].size), max(batch_size, 64))
    params: dict[str, Any] = {
        "epochs": epochs, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "val_auc": result.best_score, "val_history": result.history, "early_stopped": result.early_stopped,
        "lr": lr, "layer_decay": layer_decay, "loss": loss, "batch_size": batch_size,
        "n_val": 0 if val_pos is None else int(val_pos.size),
    }
    return score_classification(data.test_y, probs, data.multilabel, class_names=data.class_names,
                                groups=data.test_groups, seed=seed, n_boot=n_boot, notes=notes, params=params)
