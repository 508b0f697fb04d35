"""CASS: cross-architecture self-supervision, a CNN and a ViT trained together.

Singh et al., "CASS: Cross Architectural Self-Supervision for Medical Image Analysis", arXiv 2206.04170;
Singh et al., "Efficient Representation Learning for Healthcare with Cross-Architectural Self-Supervision",
MLHC 2023, arXiv 2308.10064.

A CNN (ResNet-50 in the paper) and a vision transformer (ViT-B/16) see the *same* augmented image. Each
network's embedding is the other's target, with gradient into both::

    L = mean_i ( 2 − 2 · cos(f_cnn(x_i), f_vit(x_i)) )

There is no momentum encoder, no queue and no negatives, so nothing depends on the batch size except the
CNN's batch norm — the paper's argument for small-batch robustness. Each network has its own optimiser and
learning-rate schedule (Adam, lr 1e-3, cosine in the paper): :meth:`CASS.parameter_sets` declares the sets
``cnn`` and ``vit``, the trainer builds one optimiser + schedule per set, and ``optim.sets.cnn`` /
``optim.sets.vit`` override the optimiser settings of one of them.

The embedding ``f`` is, with ``head: logits``, a linear classifier of width ``embed_dim`` (1000) on the pooled
features — what the paper did, using the networks' ImageNet 1000-way classifier logits as embedding; with
``head: mlp``, a projection MLP ``d → mlp_hidden → embed_dim``. Either way the head is dropped at export:
``encoders()`` returns the two backbones, written as ``encoder_cnn.safetensors`` and ``encoder_vit.safetensors``
in timm's key layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.checks import check_choice, check_range
from medssl.config import ModelConfig
from medssl.errors import ConfigError
from medssl.losses.cosine import cass_loss
from medssl.methods.base import DataInfo, Method, MethodConfig, StepOutput, init_kwargs
from medssl.methods.registry import register
from medssl.nn.backbones import build_backbone, check_image_fits, feature_dim, is_vit
from medssl.nn.heads import projection_mlp
from medssl.transforms.intensity import normalize
from medssl.transforms.views import ViewConfig, ViewSampler

HEADS = ("logits", "mlp")

log = logging.getLogger("medssl")


@dataclass
class CASSConfig(MethodConfig):
    """CASS hyper-parameters. The CNN is ``model.backbone`` (and ``model.stem`` applies to it).

    Attributes:
        vit_backbone: timm transformer trained alongside the CNN; built with ``img_size`` = the data's image
            size, which must be a multiple of its patch size. ``vit_base_patch16_224`` in the paper,
            ``vit_tiny_patch16_224`` for CPU runs.
        head: ``logits`` — a linear layer ``d → embed_dim`` on each network's pooled features, as the paper's
            use of the networks' 1000-way classifier logits; ``mlp`` — a projection MLP
            ``d → mlp_hidden → embed_dim`` with ReLU.
        embed_dim: width of the shared embedding; ``0`` = 1000 for ``logits`` (the ImageNet classifier width
            the paper used), 256 for ``mlp``.
        mlp_hidden: hidden width of the ``mlp`` head.
        vit_init_from: start the ViT from existing weights (a local file, ``timm:NAME``, ``hf-hub:ORG/NAME``; see
            :mod:`medssl.nn.init_from`), as ``model.init_from`` does for the CNN. The paper starts both networks
            from ImageNet weights.
        collapse_warn_std: warn when the batch std of either network's L2-normalised embedding (x sqrt(D): about
            1 when spread out) falls below this value, checked every ``collapse_check_every`` steps (0 = never):
            the symmetric loss lets both networks agree on one constant vector (docs/methods/cass.md).
        collapse_check_every: steps between two collapse checks (each reads two numbers back from the device).
    """

    vit_backbone: str = "vit_tiny_patch16_224"
    head: str = "logits"
    embed_dim: int = 0
    mlp_hidden: int = 2048
    vit_init_from: str | None = None
    collapse_warn_std: float = 0.1
    collapse_check_every: int = 50

    def __post_init__(self) -> None:
        """Validate the values (recipes and ``--set`` overrides end up here).

        Raises:
            FieldError: naming the first invalid field.
        """
        check_choice("head", self.head, HEADS)
        check_range("embed_dim", self.embed_dim, ge=0)
        check_range("mlp_hidden", self.mlp_hidden, ge=1)
        check_range("collapse_warn_std", self.collapse_warn_std, ge=0)
        check_range("collapse_check_every", self.collapse_check_every, ge=1)


@register
class CASS(Method[CASSConfig]):
    """CASS: a CNN and a ViT, each the other's target, trained with their own optimisers."""

    name = "cass"
    description = "CASS: CNN + ViT trained together, each the other's target (Singh et al. 2022/2023)"
    config_cls = CASSConfig
    default_lr = 1e-3
    default_optimizer = "adamw"
    paper = "Singh et al., CASS: Cross Architectural Self-Supervision for Medical Image Analysis, arXiv 2206.04170"
    supported_spatial_dims = (2,)

    def __init__(self, hparams: CASSConfig, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        super().__init__(hparams)
        m = self.hparams
        if data.spatial_dims not in self.supported_spatial_dims:
            raise ConfigError(
                f"cass supports 2D images only (its ViT is a 2D timm model); the data has spatial_dims="
                f"{data.spatial_dims}. Use a 2D dataset, or a 3D method such as mocov2 with a 3D backbone"
            )
        cnn_name, vit_name = model.backbone, m.vit_backbone
        if is_vit(cnn_name):
            raise ConfigError(f"cass: model.backbone is the CNN and must not be a transformer, got '{cnn_name}' "
                              "(the transformer is method.vit_backbone)")
        if not is_vit(vit_name):
            raise ConfigError(f"cass: method.vit_backbone must be a timm vision transformer (e.g. "
                              f"vit_tiny_patch16_224), got '{vit_name}'")
        self.cnn = build_backbone(cnn_name, in_chans=data.in_chans, image_size=data.image_size,
                                  stem=model.stem, pretrained=model.pretrained, spatial_dims=2, **init_kwargs(model))
        check_image_fits(self.cnn, cnn_name, data.image_size)
        self.vit = build_backbone(vit_name, in_chans=data.in_chans, image_size=data.image_size,
                                  pretrained=model.pretrained, spatial_dims=2, init_from=m.vit_init_from,
                                  init_adapt=model.init_adapt, init_key="method.vit_init_from")
        check_image_fits(self.vit, vit_name, data.image_size, key="method.vit_backbone")
        d_cnn, d_vit = feature_dim(self.cnn), feature_dim(self.vit)
        embed = m.embed_dim or (1000 if m.head == "logits" else 256)
        if m.head == "logits":
            self.cnn_head: nn.Module = nn.Linear(d_cnn, embed)
            self.vit_head: nn.Module = nn.Linear(d_vit, embed)
        else:
            self.cnn_head = projection_mlp(d_cnn, m.mlp_hidden, embed)
            self.vit_head = projection_mlp(d_vit, m.mlp_hidden, embed)
        self.embed_dim = embed
        self.cnn_name, self.vit_name = cnn_name, vit_name
        self.stem = model.stem
        self.in_chans = data.in_chans
        self.image_size = data.image_size
        self.views = ViewSampler(views, data.image_size, 2)
        self._stds: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warned: set[str] = set()

    # -- embeddings ---------------------------------------------------------------------------------
    def embed_cnn(self, x: torch.Tensor) -> torch.Tensor:
        """CNN embedding of a normalised batch."""
        return self.cnn_head(self.cnn(x))

    def embed_vit(self, x: torch.Tensor) -> torch.Tensor:
        """ViT embedding of a normalised batch."""
        return self.vit_head(self.vit(x))

    # -- step -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        x = normalize(self.views(batch["image"]).images)  # one view, seen by both networks
        h_cnn, h_vit = self.cnn(x), self.vit(x)
        z_cnn, z_vit = self.cnn_head(h_cnn), self.vit_head(h_vit)
        loss = cass_loss(z_cnn, z_vit)
        with torch.no_grad():
            a = F.normalize(z_cnn.detach().float(), dim=1)
            b = F.normalize(z_vit.detach().float(), dim=1)
            scale = a.shape[1] ** 0.5
            logs = {
                "cos": (a * b).sum(1).mean(),  # tensors: read back on log steps only
                # std over the batch of normalised embeddings x sqrt(D): ~1 when spread out, -> 0 on collapse
                "embedding_std_cnn": a.std(dim=0).mean() * scale if a.shape[0] > 1 else float("nan"),
                "embedding_std_vit": b.std(dim=0).mean() * scale if b.shape[0] > 1 else float("nan"),
            }
        if a.shape[0] > 1:
            self._stds = (logs["embedding_std_cnn"], logs["embedding_std_vit"])  # type: ignore[assignment]
        embeddings = {"cnn_backbone": h_cnn.detach(), "cnn_head": z_cnn.detach(), "vit_backbone": h_vit.detach(),
                      "vit_head": z_vit.detach()}  # for the trainer's collapse diagnostics
        return StepOutput(loss=loss, logs=logs, embeddings=embeddings)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Every ``collapse_check_every`` steps (and at the last), warn when an embedding std is below
        ``collapse_warn_std`` (once per network; :meth:`check_collapse`)."""
        every = self.hparams.collapse_check_every
        if self._stds is not None and ((step + 1) % every == 0 or step + 1 == total_steps):
            self.check_collapse(step + 1)

    def check_collapse(self, step: int) -> list[str]:
        """Warn (log) for each network whose last embedding std is below ``collapse_warn_std``; returns the
        warnings given now (each network warns once per run)."""
        limit = self.hparams.collapse_warn_std
        if self._stds is None or limit <= 0:
            return []
        out = []
        for name, std in zip(("cnn", "vit"), self._stds, strict=True):
            value = float(std)
            if value < limit and name not in self._warned:
                self._warned.add(name)
                msg = (f"cass: the {name.upper()} embedding is collapsing at step {step}: embedding_std_{name} "
                       f"{value:.3f} < method.collapse_warn_std {limit:g} (about 1 when spread out; both networks "
                       "agree by emitting one constant vector). Start from pretrained weights (model.init_from, "
                       "method.vit_init_from; the paper does) or see docs/methods/cass.md")
                log.warning(msg)
                out.append(msg)
        return out

    def parameter_sets(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Two optimisers, as in the paper: ``cnn`` (CNN + its head) and ``vit`` (ViT + its head)."""
        sets: dict[str, list[tuple[str, nn.Parameter]]] = {"cnn": [], "vit": []}
        for n, p in self.named_parameters():
            if p.requires_grad:
                sets["cnn" if n.startswith(("cnn.", "cnn_head.")) else "vit"].append((n, p))
        return sets

    def encoders(self) -> dict[str, nn.Module]:
        return {"cnn": self.cnn, "vit": self.vit}

    def export_meta(self) -> dict[str, dict[str, str]]:
        common = {"format": "timm", "in_chans": str(self.in_chans), "image_size": str(self.image_size),
                  "spatial_dims": "2", "method": "cass"}
        return {
            "cnn": {**common, "model_name": self.cnn_name, "stem": self.stem},
            "vit": {**common, "model_name": self.vit_name, "stem": "default"},
        }
