"""GraVIS: grouping many augmented views of each image with a smoothed average-precision loss.

Zhou et al., "GraVIS: Grouping Augmented Views from Independent Sources for Dermatology Analysis",
IEEE Transactions on Medical Imaging 2023, arXiv 2301.04410.

Each image of the batch is augmented ``K`` times (default 4); its views form a homogeneous group and all
views of the other images are heterogeneous. One encoder (backbone + MLP head ``d → 2048 → 128``) embeds
all ``K·B`` views in one forward pass, and the loss
(:func:`medssl.losses.grouping_ap.grouping_ap_loss`) asks every view to rank the other views of its own
image above every other view: ``L = 1 − mean_q AP(q)``, with a hardness-aware weighting of the group
members (a documented choice; the paper does not publish its formula). There is no momentum encoder and no
queue. Groups are formed by the dataset index of the source image (``batch["index"]``), so they survive
DDP gathering and a short last batch. Under DDP all ``K`` views of an image sit on one rank; the backbone's
BatchNorm layers therefore take their statistics over every rank's views (``sync_bn``, as SyncBatchNorm), or the
positives would share batch statistics that the negatives from other ranks lack (SimCLR's local-BN leak; the
authors shuffled across GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medssl.checks import check_choice, check_range
from medssl.config import ModelConfig
from medssl.losses.grouping_ap import SIMILARITIES, grouping_ap_loss
from medssl.methods.base import BackboneMethod, DataInfo, MethodConfig, StepOutput
from medssl.methods.registry import register
from medssl.nn.backbones import feature_dim
from medssl.nn.batchnorm import convert_batchnorm
from medssl.nn.heads import projection_mlp
from medssl.transforms.intensity import normalize
from medssl.transforms.views import ViewConfig, ViewSampler


@dataclass
class GraVISConfig(MethodConfig):
    """GraVIS hyper-parameters.

    Attributes:
        num_views: augmented views per image, ``K ≥ 2`` (4 by default; the paper describes up to 20).
        temperature: τ of the sigmoid that smooths the ranking (0.2 in the paper).
        similarity: ``cosine`` (default) or ``dot`` (raw dot products, as in the authors' code).
        hardness_aware: weight an anchor's group members by ``softmax(s / hardness_temperature)`` instead of
            the plain mean (medssl's reading of the paper's hardness-aware attention).
        hardness_temperature: τ_h of those weights (on cosine similarities in ``[-1, 1]``; 1.0 weights the
            most similar member at most ``e²`` ≈ 7.4 times the least similar one).
        detach_weights: no gradient through the hardness-aware weights.
        proj_dim: embedding width (128).
        proj_hidden: hidden width of the MLP head (2048 in the paper; ``0`` = the backbone feature width).
        sync_bn: under DDP, BatchNorm statistics over the views of all ranks
            (:class:`medssl.nn.batchnorm.GlobalBatchNorm2d`), so positives (all ``K`` views of an image sit on one
            rank) share no statistics that negatives from other ranks lack; no effect in one process.
    """

    num_views: int = 4
    temperature: float = 0.2
    similarity: str = "cosine"
    hardness_aware: bool = True
    hardness_temperature: float = 1.0
    detach_weights: bool = True
    proj_dim: int = 128
    proj_hidden: int = 2048
    sync_bn: bool = True

    def __post_init__(self) -> None:
        """Validate the values (recipes and ``--set`` overrides end up here).

        Raises:
            FieldError: naming the first invalid field.
        """
        check_range("num_views", self.num_views, ge=2)  # a group needs two views
        check_range("temperature", self.temperature, gt=0)
        check_choice("similarity", self.similarity, SIMILARITIES)
        check_range("hardness_temperature", self.hardness_temperature, gt=0)
        check_range("proj_dim", self.proj_dim, ge=1)
        check_range("proj_hidden", self.proj_hidden, ge=0)


@register
class GraVIS(BackboneMethod[GraVISConfig]):
    """GraVIS (Zhou et al., IEEE TMI 2023): K views per image grouped by a smoothed-AP loss."""

    name = "gravis"
    description = "GraVIS: K views per image grouped by a smoothed-AP ranking loss (Zhou et al., IEEE TMI 2023)"
    config_cls = GraVISConfig
    default_lr = 0.03
    default_optimizer = "sgd"
    paper = ("Zhou et al., GraVIS: Grouping Augmented Views from Independent Sources for Dermatology Analysis, "
             "IEEE TMI 2023, arXiv 2301.04410")

    def __init__(self, hparams: GraVISConfig, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        super().__init__(hparams)
        m = self.hparams
        self.build_backbone(model, data)
        if m.sync_bn:
            convert_batchnorm(self.backbone, "global")
        d = feature_dim(self.backbone)
        self.projector = projection_mlp(d, m.proj_hidden or d, m.proj_dim)
        self.views = ViewSampler(views, data.image_size, data.spatial_dims)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projector embedding of a batch of normalised views."""
        return self.projector(self.backbone(x))

    def make_views(self, images: torch.Tensor) -> torch.Tensor:
        """``K`` normalised views of every image, view-major: row ``v · B + b`` is view ``v`` of image ``b``."""
        return torch.cat([normalize(self.views(images).images) for _ in range(self.hparams.num_views)])

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        images = batch["image"]
        b = images.shape[0]
        m = self.hparams
        index = batch.get("index")
        # Dataset indices are unique across ranks (and make two ranks' views of one repeated image one group);
        # without them (library use) the batch position is the id, made unique per rank by the loss.
        ids = index.to(images.device).long() if index is not None else torch.arange(b, device=images.device)
        groups = ids.repeat(m.num_views)
        feats = self.backbone(self.make_views(images))
        z = self.projector(feats)
        loss = grouping_ap_loss(
            z,
            groups,
            temperature=m.temperature,
            similarity=m.similarity,
            hardness_temperature=m.hardness_temperature if m.hardness_aware else None,
            detach_weights=m.detach_weights,
            gather_distributed=True,
            global_ids=index is not None,
        )
        with torch.no_grad():
            zn = F.normalize(z.detach().float(), dim=1)
            sim = zn @ zn.t()
            same = groups[:, None] == groups[None, :]
            eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
            pos, neg = same & ~eye, ~same
            logs = {  # mean cosine similarity within groups / across groups (0 where a batch has none)
                "pos_sim": (sim * pos).sum() / pos.sum().clamp(min=1),  # tensors: read on log steps
                "neg_sim": (sim * neg).sum() / neg.sum().clamp(min=1),
                "embedding_std": zn.std(dim=0).mean() * zn.shape[1] ** 0.5,
            }
        # detached embeddings for the collapse diagnostics (all K·B views)
        return StepOutput(loss=loss, logs=logs, embeddings={"backbone": feats.detach(), "projector": z.detach()})
