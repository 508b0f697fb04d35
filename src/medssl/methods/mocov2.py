"""MoCo v2: momentum contrast with an MLP head and strong augmentation.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297.

A query encoder (backbone + MLP head d→d→128) is trained with InfoNCE against keys from a momentum (EMA)
copy of itself; negatives come from a queue of past keys. The loss is symmetrised over the two views.
Keys are gathered across ranks before they are enqueued, so every rank holds the same queue, and the
key encoder's BatchNorm sees a batch shuffled across ranks (shuffle-BN) under DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from medssl import distributed as dist_utils
from medssl.checks import check_range
from medssl.config import ModelConfig
from medssl.losses import info_nce
from medssl.methods.base import BackboneMethod, DataInfo, MethodConfig, StepOutput
from medssl.methods.registry import register
from medssl.nn.backbones import feature_dim
from medssl.nn.ema import ema_update, make_ema_copy
from medssl.nn.heads import projection_mlp
from medssl.transforms.intensity import normalize
from medssl.transforms.views import ViewConfig, ViewSampler


@dataclass
class MoCoV2Config(MethodConfig):
    """MoCo v2 hyper-parameters.

    Attributes:
        queue_size: negatives kept (65 536 in the paper for ImageNet). It must not exceed the number of
            training images, or the queue holds stale copies of the current images as negatives; medssl
            caps it at the dataset size and says so.
        momentum: EMA coefficient of the key encoder (0.999 in the paper; 0.99 suits small data).
        temperature: τ of InfoNCE (0.2 in MoCo v2).
        proj_dim: embedding width (128).
        proj_hidden: hidden width of the MLP head (``0`` = the backbone feature width, as in the paper).
        symmetric: symmetrise the loss over the two views.
        shuffle_bn: shuffle the key batch across ranks under DDP (no effect in one process).
    """

    queue_size: int = 4096
    momentum: float = 0.99
    temperature: float = 0.2
    proj_dim: int = 128
    proj_hidden: int = 0
    symmetric: bool = True
    shuffle_bn: bool = True

    def __post_init__(self) -> None:
        """Check the ranges (recipes and ``--set`` overrides end up here).

        Raises:
            FieldError: naming the first field out of range.
        """
        check_range("queue_size", self.queue_size, ge=1)
        check_range("momentum", self.momentum, ge=0, lt=1)
        check_range("temperature", self.temperature, gt=0)
        check_range("proj_dim", self.proj_dim, ge=1)
        check_range("proj_hidden", self.proj_hidden, ge=0)


MC = TypeVar("MC", bound=MoCoV2Config)


@register
class MoCoV2(BackboneMethod[MC]):
    """MoCo v2 (the baseline Med-MoCo builds on)."""

    name = "mocov2"
    description = "MoCo v2: momentum encoder + queue of negatives, InfoNCE (He et al. 2020; Chen et al. 2020)"
    config_cls = MoCoV2Config
    default_lr = 0.06
    lr_reference_batch = 128  # 0.06 x global batch / 128: 0.03 at 64, 0.12 at 256 (docs/methods/mocov2.md)
    default_optimizer = "sgd"
    paper = "Chen et al., Improved Baselines with Momentum Contrastive Learning, arXiv 2003.04297"

    def __init__(self, hparams: MC, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        super().__init__(hparams)
        m = self.hparams
        self.build_backbone(model, data)
        d = feature_dim(self.backbone)
        self.projector = projection_mlp(d, m.proj_hidden or d, m.proj_dim)
        self.key_backbone = make_ema_copy(self.backbone)
        self.key_projector = make_ema_copy(self.projector)
        self.queue_size = min(m.queue_size, max(data.num_samples, 1))
        self.register_buffer("queue", F.normalize(torch.randn(self.queue_size, m.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.views = ViewSampler(views, data.image_size, data.spatial_dims)
        self._pending_keys: torch.Tensor | None = None

    # -- encoders -----------------------------------------------------------------------------------
    def embed_query(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query-encoder outputs of a normalised view batch: ``backbone`` (pooled features) and ``projector``.

        Subclasses (Med-MoCo) add entries (feature maps, whitened features); 2-D entries other than
        ``feature_map`` are reported to the trainer's collapse diagnostics.
        """
        h = self.backbone(x)
        return {"backbone": h, "projector": self.projector(h)}

    def embed_key(self, x: torch.Tensor) -> torch.Tensor:
        """Key-encoder embedding of a normalised view batch (not normalised; called without gradient)."""
        return self.key_projector(self.key_backbone(x))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised key embedding from the momentum encoder (shuffle-BN under DDP)."""
        if self.hparams.shuffle_bn:
            x, unshuffle = dist_utils.batch_shuffle(x)
        else:
            unshuffle = None
        k = self.embed_key(x)
        k = F.normalize(k.float(), dim=1)
        return dist_utils.batch_unshuffle(k, unshuffle)

    # -- step -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        images = batch["image"]
        v1 = normalize(self.views(images).images)
        v2 = normalize(self.views(images).images)
        out, _ = self.global_step(v1, v2)
        return out

    def global_step(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[StepOutput, dict[str, torch.Tensor]]:
        """The MoCo v2 loss of two normalised view batches.

        Returns:
            The step output (loss, logs, detached embeddings for the collapse diagnostics) and the query
            encoder's outputs (:meth:`embed_query` of ``cat([v1, v2])`` when symmetric, else of ``v1``), with
            their graphs, for subclasses that add loss terms.
        """
        m = self.hparams
        queue = self.queue.clone().detach()
        if m.symmetric:
            qd = self.embed_query(torch.cat([v1, v2]))
            k = self.key(torch.cat([v2, v1]))
            keys = k[: v1.shape[0]]
        else:
            qd = self.embed_query(v1)
            k = self.key(v2)
            keys = k
        q = qd["projector"]
        loss = info_nce(q, k, temperature=m.temperature, queue=queue)
        self._pending_keys = keys.detach()
        with torch.no_grad():
            qn = F.normalize(q.detach().float(), dim=1)
            logs: dict[str, float | torch.Tensor] = {  # 0-dim tensors: no host-device sync in the step
                "pos_sim": (qn * k).sum(1).mean(),
                "embedding_std": qn.std(dim=0).mean() * qn.shape[1] ** 0.5,
            }
        embeddings = {n: t.detach() for n, t in qd.items() if n != "feature_map" and t.ndim == 2}
        return StepOutput(loss=loss, logs=logs, embeddings=embeddings), qd

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA update of the key encoder, then enqueue this step's keys (gathered from all ranks)."""
        ema_update(self.key_backbone, self.backbone, self.hparams.momentum)
        ema_update(self.key_projector, self.projector, self.hparams.momentum)
        if self._pending_keys is not None:
            self.enqueue(dist_utils.gather(self._pending_keys, with_grad=False))
            self._pending_keys = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest queue entries by ``keys`` (FIFO, wrapping around)."""
        keys = keys.to(self.queue.dtype)
        n = keys.shape[0]
        if n >= self.queue_size:
            self.queue.copy_(keys[-self.queue_size :])
            self.queue_ptr.zero_()
            return
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue_size
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)
