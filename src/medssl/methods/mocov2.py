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
from medssl.nn.batchnorm import convert_batchnorm
from medssl.nn.ema import ema_update, make_ema_copy
from medssl.nn.heads import projection_mlp
from medssl.transforms.intensity import normalize
from medssl.transforms.views import ViewConfig, ViewSampler


@dataclass
class MoCoV2Config(MethodConfig):
    """MoCo v2 hyper-parameters.

    Attributes:
        queue_size: negatives kept (65 536 in the paper for ImageNet); capped at the number of training images
            (a longer queue would hold several keys of every image). The queue stores the dataset index of each
            key, and a query never counts an older key of its own image as a negative (masked out).
        momentum: EMA coefficient of the key encoder (0.999 in the paper; 0.99 suits small data).
        temperature: τ of InfoNCE (0.2 in MoCo v2).
        proj_dim: embedding width (128).
        proj_hidden: hidden width of the MLP head (``0`` = the backbone feature width, as in the paper).
        symmetric: symmetrise the loss over the two views.
        shuffle_bn: shuffle the key batch across ranks under DDP (no effect in one process).
        bn_splits: in one process, BatchNorm statistics over up to this many sub-batches of at least
            ``bn_split_min`` samples, in the query and the key encoder, with the key batch shuffled first (MoCo's
            single-GPU stand-in for shuffle-BN, its CIFAR recipe's ``SplitBatchNorm``). ``0`` or ``1``: off.
            Ignored under DDP, where ``shuffle_bn`` shuffles across ranks.
        bn_split_min: the smallest sub-batch.
        mask_own_keys: leave queue entries of a query's own image out of its negatives (``false`` only for
            ablations: the behaviour before issue 15).
    """

    queue_size: int = 4096
    momentum: float = 0.99
    temperature: float = 0.2
    proj_dim: int = 128
    proj_hidden: int = 0
    symmetric: bool = True
    shuffle_bn: bool = True
    bn_splits: int = 8
    bn_split_min: int = 16
    mask_own_keys: bool = True

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
        check_range("bn_splits", self.bn_splits, ge=0)
        check_range("bn_split_min", self.bn_split_min, ge=2)


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
        if m.bn_splits > 1:  # before the key copy, so both encoders split (MoCo's single-GPU recipe)
            convert_batchnorm(self.backbone, "split", m.bn_splits, m.bn_split_min)
        d = feature_dim(self.backbone)
        self.projector = projection_mlp(d, m.proj_hidden or d, m.proj_dim)
        self.key_backbone = make_ema_copy(self.backbone)
        self.key_projector = make_ema_copy(self.projector)
        self.queue_size = min(m.queue_size, max(data.num_samples, 1))
        self.register_buffer("queue", F.normalize(torch.randn(self.queue_size, m.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # dataset index of the image each queue entry came from (-1: the random initial entries, or no index)
        self.register_buffer("queue_ids", torch.full((self.queue_size,), -1, dtype=torch.long))
        self.views = ViewSampler(views, data.image_size, data.spatial_dims)
        self._pending_keys: torch.Tensor | None = None
        self._pending_ids: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[no-untyped-def]
        # checkpoints written before the queue stored dataset indices: their queue entries count as "no image"
        if prefix + "queue" in state_dict and prefix + "queue_ids" not in state_dict:
            state_dict[prefix + "queue_ids"] = torch.full_like(self.queue_ids, -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
        """L2-normalised key embedding from the momentum encoder (shuffle-BN under DDP; in one process, with split
        BatchNorm, the key batch is shuffled before it is cut into sub-batches)."""
        if self.hparams.bn_splits > 1 and not dist_utils.is_distributed():
            perm = torch.randperm(x.shape[0]).to(x.device)  # CPU RNG: the same on every device, resumable
            k = F.normalize(self.embed_key(x[perm]).float(), dim=1)
            return k[torch.argsort(perm)]
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
        out, _ = self.global_step(v1, v2, batch_ids(batch, images))
        return out

    def global_step(self, v1: torch.Tensor, v2: torch.Tensor, ids: torch.Tensor | None = None
                    ) -> tuple[StepOutput, dict[str, torch.Tensor]]:
        """The MoCo v2 loss of two normalised view batches.

        Args:
            v1, v2: the two views of the same ``B`` images.
            ids: ``(B,)`` dataset indices of the images (``batch["index"]``): queue entries of a query's own
                image are no negatives, and the indices are enqueued beside the keys. ``None``: no masking.

        Returns:
            The step output (loss, logs, detached embeddings for the collapse diagnostics) and the query
            encoder's outputs (:meth:`embed_query` of ``cat([v1, v2])`` when symmetric, else of ``v1``), with
            their graphs, for subclasses that add loss terms.
        """
        m = self.hparams
        queue = self.queue.clone().detach()
        queue_ids = self.queue_ids.clone() if m.mask_own_keys else None
        if m.symmetric:
            qd = self.embed_query(torch.cat([v1, v2]))
            k = self.key(torch.cat([v2, v1]))
            keys = k[: v1.shape[0]]
            query_ids = torch.cat([ids, ids]) if ids is not None else None
        else:
            qd = self.embed_query(v1)
            k = self.key(v2)
            keys = k
            query_ids = ids
        q = qd["projector"]
        loss = info_nce(q, k, temperature=m.temperature, queue=queue, query_ids=query_ids, queue_ids=queue_ids)
        self._pending_keys = keys.detach()
        self._pending_ids = ids.detach() if ids is not None else None
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
            keys = dist_utils.gather(self._pending_keys, with_grad=False)
            ids = dist_utils.gather(self._pending_ids, with_grad=False) if self._pending_ids is not None else None
            self.enqueue(keys, ids)
            self._pending_keys = self._pending_ids = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Replace the oldest queue entries by ``keys`` (FIFO, wrapping around), and their dataset indices by
        ``ids`` (``-1`` when ``None``: entries that match no image)."""
        keys = keys.to(self.queue.dtype)
        n = keys.shape[0]
        ids = (torch.full((n,), -1, dtype=torch.long, device=keys.device) if ids is None
               else ids.to(device=keys.device, dtype=torch.long))
        if n >= self.queue_size:
            self.queue.copy_(keys[-self.queue_size :])
            self.queue_ids.copy_(ids[-self.queue_size :])
            self.queue_ptr.zero_()
            return
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue_size
        self.queue[idx] = keys
        self.queue_ids[idx] = ids
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)


def batch_ids(batch: dict[str, Any], images: torch.Tensor) -> torch.Tensor | None:
    """The dataset indices of a batch's images (``batch["index"]``) on the images' device, or ``None``."""
    index = batch.get("index")
    if index is None:
        return None
    return torch.as_tensor(index).to(device=images.device, dtype=torch.long).reshape(-1)
