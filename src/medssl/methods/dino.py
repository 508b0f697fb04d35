"""DINO: self-distillation with no labels, a student and an EMA teacher over multi-crop views.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.

The student (backbone + :class:`~medssl.nn.heads.DINOHead`) sees 2 global crops and ``local_crops`` smaller
local crops of every image; the teacher, an EMA of the student (momentum rising from ``momentum`` to 1 on a
cosine), sees the global crops only. The loss (:func:`medssl.losses.dino.dino_loss`) is the cross-entropy
from the centred, sharpened teacher distribution of each global crop to the student distribution of every
other crop. The centre is an EMA of the teacher's mean output over the global batch (all ranks); the teacher
temperature warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp``; the head's last layer is frozen
for the first ``freeze_last_layer`` of the run.

ViT and CNN backbones, 2D and 3D: global crops are made at the image size and local crops at ``local_size``
by two batched view samplers (one call per resolution for all crops of the batch); in 3D local crops are
sub-volumes. A 2D timm ViT takes the smaller local crops with its position embeddings resampled
(``dynamic_img_size``); a 3D ViT has fixed-size position embeddings, so its local crops are sub-volumes
resized to the image size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.checks import FieldError, check_range
from medssl.config import ModelConfig, PretrainConfig
from medssl.errors import ConfigError
from medssl.losses.dino import batch_center, dino_loss, teacher_probs
from medssl.methods.base import BackboneMethod, DataInfo, MethodConfig, StepOutput, init_kwargs
from medssl.methods.registry import register
from medssl.nn.backbones import (
    build_backbone,
    check_image_fits,
    feature_dim,
    is_vit,
    output_stride,
    patch_size_of,
)
from medssl.nn.ema import cosine_momentum, ema_update, make_ema_copy
from medssl.nn.heads import DINOHead
from medssl.nn.masked_vit import resolve_patch_size
from medssl.transforms.intensity import normalize
from medssl.transforms.views import ViewConfig, ViewSampler

log = logging.getLogger("medssl")

#: DINO's local crop side relative to the global one (96 / 224)
LOCAL_RATIO = 96 / 224


@dataclass
class DINOConfig(MethodConfig):
    """DINO hyper-parameters (DINO's ViT-S/16 values unless noted).

    Attributes:
        out_dim: width ``K`` of the head's output (65 536).
        hidden_dim: hidden width of the head's MLP (2048).
        bottleneck_dim: width before the weight-normalised last layer (256).
        head_layers: linear layers of the MLP (3).
        head_bn: BatchNorm in the head's MLP (off for ViTs in DINO).
        norm_last_layer: fix the norm of the last layer's weights to 1 (on: more stable).
        local_crops: local crops per image (DINO: 6 to 10; 0 = two global crops only).
        local_size: side of the local crops; 0 = 96/224 of the image size, rounded up to what the backbone
            accepts (a multiple of the ViT patch; at least half a CNN's output stride).
        global_scale: area fraction range of the global crops ((0.4, 1) in DINO; ``views.crop_scale`` is not used).
        local_scale: area fraction range of the local crops ((0.05, 0.4)).
        student_temp: τ_s (0.1).
        teacher_temp: τ_t after its warm-up (0.04; 0.07 in the ViT-S/16 100-epoch recipe).
        warmup_teacher_temp: τ_t at the start of the warm-up (0.04).
        teacher_temp_warmup: length of the linear τ_t warm-up as a fraction of the run (DINO: 30 epochs of 100 =
            0.3; a method sees steps, not epochs).
        center_momentum: EMA coefficient of the centre (0.9).
        momentum: teacher EMA momentum at the start, rising to 1 on a cosine (0.996).
        freeze_last_layer: fraction of the run during which the head's last layer gets no gradient (DINO: the
            first epoch; 0.01 of a 100-epoch run).
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_bn: bool = False
    norm_last_layer: bool = True
    local_crops: int = 6
    local_size: int = 0
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.0
    center_momentum: float = 0.9
    momentum: float = 0.996
    freeze_last_layer: float = 0.01

    def __post_init__(self) -> None:
        """Check the ranges (recipes and ``--set`` overrides end up here).

        Raises:
            FieldError: naming the first field out of range.
        """
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            check_range(name, getattr(self, name), ge=1)
        check_range("local_crops", self.local_crops, ge=0)
        check_range("local_size", self.local_size, ge=0)
        for name in ("global_scale", "local_scale"):
            lo, hi = (float(v) for v in getattr(self, name))
            check_range(name, lo, gt=0, le=1)
            check_range(name, hi, gt=0, le=1)
            if lo > hi:
                raise FieldError(name, f"must satisfy min <= max, got ({lo:g}, {hi:g})")
            setattr(self, name, (lo, hi))
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check_range(name, getattr(self, name), gt=0)
        for name in ("teacher_temp_warmup", "freeze_last_layer"):
            check_range(name, getattr(self, name), ge=0, le=1)
        check_range("center_momentum", self.center_momentum, ge=0, lt=1)
        check_range("momentum", self.momentum, ge=0, le=1)


def vit_patch_defaults(cfg: PretrainConfig, data: DataInfo) -> None:
    """For a ViT ``model.backbone``: record the patch size it uses on this image size
    (:func:`~medssl.nn.masked_vit.resolve_patch_size`), so that ``config.yaml`` says what was built."""
    if is_vit(cfg.model.backbone):
        cfg.model.patch_size = resolve_patch_size(cfg.model.backbone, data.image_size, data.spatial_dims,
                                                  cfg.model.patch_size)


@register
class DINO(BackboneMethod[DINOConfig]):
    """DINO (self-distillation, EMA teacher, centring + sharpening, multi-crop), ViT or CNN, 2D and 3D."""

    name = "dino"
    description = "DINO: student/EMA-teacher self-distillation, centring + sharpening, multi-crop (Caron et al. 2021)"
    config_cls = DINOConfig
    default_lr = 5e-4
    default_optimizer = "adamw"
    paper = "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021"

    @classmethod
    def resolve_defaults(cls, cfg: PretrainConfig, data: DataInfo) -> None:
        vit_patch_defaults(cfg, data)

    def __init__(self, hparams: DINOConfig, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        """Build student, teacher and the two view samplers.

        Raises:
            ConfigError: a backbone that does not fit the image or local crop size, naming the keys.
        """
        super().__init__(hparams)
        m = self.hparams
        sd = data.spatial_dims
        vit = is_vit(model.backbone)
        self.backbone = build_backbone(model.backbone, in_chans=data.in_chans, image_size=data.image_size,
                                       stem=model.stem, pretrained=model.pretrained, spatial_dims=sd,
                                       patch_size=model.patch_size if vit else None,
                                       global_pool=model.global_pool if vit else None,
                                       dynamic_img_size=vit and sd == 2, **init_kwargs(model))
        check_image_fits(self.backbone, model.backbone, data.image_size)
        self.backbone_name, self.stem, self.in_chans = model.backbone, model.stem, data.in_chans
        self.image_size, self.spatial_dims = data.image_size, sd
        self.patch_size, self.global_pool = (model.patch_size, model.global_pool) if vit else (None, None)
        self.local_size = self._local_size(model.backbone, data, vit)
        self.head = DINOHead(feature_dim(self.backbone), m.out_dim, m.hidden_dim, m.bottleneck_dim, m.head_layers,
                             batch_norm=m.head_bn, norm_last_layer=m.norm_last_layer)
        self.teacher_backbone = make_ema_copy(self.backbone)
        self.teacher_head = make_ema_copy(self.head)
        self.register_buffer("center", torch.zeros(1, m.out_dim))
        self.register_buffer("progress", torch.zeros(2, dtype=torch.long))  # steps done, total steps
        self.global_views = ViewSampler(dataclasses.replace(views, crop_scale=m.global_scale), data.image_size, sd)
        self.local_views = ViewSampler(dataclasses.replace(views, crop_scale=m.local_scale), self.local_size, sd)
        self._pending_center: torch.Tensor | None = None

    def _local_size(self, name: str, data: DataInfo, vit: bool) -> int:
        """The local crop side: ``method.local_size`` checked, or DINO's 96/224 of the image made to fit."""
        size, given = self.hparams.local_size, self.hparams.local_size > 0
        patch = patch_size_of(self.backbone)
        if vit and data.spatial_dims == 3:  # fixed-size position embeddings: sub-volumes resized to the image
            if given and size != data.image_size:
                raise ConfigError(f"method.local_size {size}: a 3D ViT ({name}) takes volumes of data.image_size "
                                  f"{data.image_size} only; leave method.local_size at 0")
            return data.image_size
        if not given:
            size = math.ceil(data.image_size * LOCAL_RATIO)
            if patch is not None:
                size = max(patch, math.ceil(size / patch) * patch)
            else:
                stride = output_stride(self.backbone) or 1
                size = max(size, (stride + 1) // 2)
            return min(size, data.image_size)
        if size > data.image_size:
            raise ConfigError(f"method.local_size {size} is larger than data.image_size {data.image_size}")
        if patch is not None and size % patch:
            raise ConfigError(f"method.local_size {size} is not a multiple of the patch size {patch} of "
                              f"model.backbone '{name}'")
        stride = output_stride(self.backbone) if patch is None else None
        if stride is not None and size < stride / 2:
            raise ConfigError(f"method.local_size {size} is too small for model.backbone '{name}' (output stride "
                              f"{stride}): it needs at least {(stride + 1) // 2} px")
        return size

    # -- schedules ----------------------------------------------------------------------------------
    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._progress = None  # re-read from the loaded buffer

    def _steps(self) -> tuple[int, int]:
        """(steps done, total steps), cached on the host so that a step does not wait for the device."""
        if getattr(self, "_progress", None) is None:
            done, total = (int(v) for v in self.progress.tolist())
            self._progress = (done, total)
        return self._progress  # type: ignore[return-value]

    def _fraction(self) -> float:
        """Fraction of the run done (0 before the first optimiser step)."""
        done, total = self._steps()
        return done / total if total > 0 else 0.0

    def teacher_temperature(self) -> float:
        """τ_t now: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over ``teacher_temp_warmup``."""
        m = self.hparams
        if m.teacher_temp_warmup <= 0:
            return m.teacher_temp
        t = min(self._fraction() / m.teacher_temp_warmup, 1.0)
        return m.warmup_teacher_temp + t * (m.teacher_temp - m.warmup_teacher_temp)

    def last_layer_frozen(self) -> bool:
        """Whether the head's last layer is frozen at this step."""
        f = self.hparams.freeze_last_layer
        return f > 0 and (self._steps()[1] == 0 or self._fraction() < f)

    # -- step -----------------------------------------------------------------------------------------
    def crops(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised global crops ``(2B, ...)`` and local crops ``(N·B, ...)`` (``None`` without), crop-major."""
        n = self.hparams.local_crops
        glob = normalize(self.global_views(images.repeat(2, *([1] * (images.ndim - 1)))).images)
        loc = normalize(self.local_views(images.repeat(n, *([1] * (images.ndim - 1)))).images) if n else None
        return glob, loc

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        glob, loc = self.crops(batch["image"])
        return self.crops_step(glob, loc)

    def crops_step(self, glob: torch.Tensor, loc: torch.Tensor | None) -> StepOutput:
        """The loss of normalised crops (:meth:`crops`): student on every crop, teacher on the global ones."""
        m = self.hparams
        frozen = self.last_layer_frozen()
        h_glob = self.backbone(glob)
        outs = [self.head(h_glob, freeze_last_layer=frozen)]
        if loc is not None:
            outs.append(self.head(self.backbone(loc), freeze_last_layer=frozen))
        student = torch.cat(outs)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(glob))
        tau_t = self.teacher_temperature()
        loss = dino_loss(student, teacher, self.center, num_global=2, student_temp=m.student_temp,
                         teacher_temp=tau_t)
        self._pending_center = batch_center(teacher)
        with torch.no_grad():
            p = teacher_probs(teacher, self.center, tau_t)
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
            b = glob.shape[0] // 2
            h = F.normalize(h_glob[:b].detach().float(), dim=1)
            logs: dict[str, float | torch.Tensor] = {
                "teacher_temp": tau_t,
                "teacher_entropy": entropy,  # -> 0: one-hot collapse; -> log K: uniform collapse
                "embedding_std": h.std(dim=0).mean() * h.shape[1] ** 0.5 if b > 1 else float("nan"),
            }
        return StepOutput(loss=loss, logs=logs, embeddings={"backbone": h_glob[:b].detach()})

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Teacher EMA (cosine momentum), centre EMA with this step's global-batch mean, progress counters."""
        m = self.hparams
        momentum = cosine_momentum(m.momentum, step, total_steps)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        if self._pending_center is not None:
            self.center.mul_(m.center_momentum).add_(self._pending_center.to(self.center), alpha=1 - m.center_momentum)
            self._pending_center = None
        self.progress.copy_(torch.tensor([step + 1, total_steps], dtype=torch.long))
        self._progress = (step + 1, total_steps)

    def export_meta(self) -> dict[str, dict[str, str]]:
        meta = super().export_meta()
        if self.patch_size is not None:
            meta["backbone"]["patch_size"] = str(self.patch_size)
        if self.global_pool is not None:
            meta["backbone"]["global_pool"] = self.global_pool
        if self.spatial_dims == 3 and self.patch_size is not None:
            meta["backbone"]["format"] = "medssl-vit3d (timm ViT key layout, Conv3d patches)"
        return meta

    def parameter_sets(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """One optimiser over the student (the teacher is an EMA)."""
        return {"main": [(n, p) for n, p in self.named_parameters()
                         if p.requires_grad and not n.startswith(("teacher_backbone.", "teacher_head."))]}
