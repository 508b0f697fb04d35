"""The method contract: a method is a small ``nn.Module`` that computes its own loss.

The trainer knows nothing method-specific. A method declares what its data must provide
(:class:`ViewSpec`), turns a batch into a loss (:meth:`Method.training_step`), updates its own state after
each optimiser step (EMA, queues: :meth:`Method.after_optimizer_step`) and says what gets exported and
evaluated (:meth:`Method.encoders`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from medssl.nn.backbones import build_backbone


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its data to build itself."""

    in_chans: int
    spatial_dims: int
    image_size: int
    num_samples: int


@dataclass(frozen=True)
class ViewSpec:
    """What a method needs from the data pipeline.

    Attributes:
        num_views: augmented views made per image (inside the step, as batched tensor ops).
        needs_highres: whether the batch must carry higher-resolution copies of the image, read from the
            source at ``factor x`` the image size (multi-scale reconstruction, MIRAM): batch key
            ``image_highres`` for 2x, ``image_highres_x<factor>`` for other factors
            (:func:`medssl.data.highres.highres_key`).
        needs_masks: whether the batch carries mask-generator output.
        highres_factors: the factors of the high-resolution copies when ``needs_highres``.
    """

    num_views: int = 2
    needs_highres: bool = False
    needs_masks: bool = False
    highres_factors: tuple[int, ...] = (2,)


@dataclass
class StepOutput:
    """Result of one training step: the loss to back-propagate and scalar logs.

    Attributes:
        loss: the scalar to back-propagate.
        logs: scalars averaged over the logging interval into ``metrics.csv``: Python floats or detached 0-dim
            tensors (the trainer reads tensors back to the host only on log steps, so a GPU step does not wait).
        embeddings: optional detached ``(N, D)`` embeddings of this step by name (e.g. ``{"backbone": h,
            "projector": z}``); the trainer computes collapse statistics from them every
            ``train.collapse_every_n_steps`` steps (:mod:`medssl.eval.collapse`).
    """

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class VisualPanel:
    """One scale of a reconstruction figure (see :meth:`Method.visualize`).

    Attributes:
        scale: label of the scale, e.g. ``"1x"``, ``"2x"``.
        columns: column name -> ``(N, C, *spatial)`` tensor, one row per sample, in display range ``[0, 1]``
            (values outside are clipped; bool masks are fine). Usual columns: ``input`` (what the encoder
            saw, masked), ``mask``, ``reconstruction``, ``target``. 3D volumes are shown by their middle
            depth slice; ``C == 3`` is shown as RGB, otherwise the first channel in grey.
    """

    scale: str
    columns: dict[str, torch.Tensor]


@dataclass
class MethodConfig:
    """Hyper-parameters every method has; subclasses add their own fields."""

    name: str = ""


class Method(nn.Module):
    """Base class of SSL methods. Subclasses set the class attributes and implement ``training_step``.

    Class attributes:
        name: registry name.
        description: one line for ``medssl methods``.
        config_cls: dataclass of the method's hyper-parameters (the ``method:`` section of a recipe).
        default_lr: peak learning rate when the recipe gives none, for ``default_optimizer``.
        default_optimizer: ``sgd`` or ``adamw``.
        paper: citation.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    default_lr: ClassVar[float] = 0.03
    default_optimizer: ClassVar[str] = "sgd"
    paper: ClassVar[str] = ""
    view_spec: ViewSpec = ViewSpec()

    @classmethod
    def view_spec_for(cls, method_cfg: dict[str, Any]) -> ViewSpec:
        """The view spec of this method with the given ``method:`` section (the trainer asks before it builds
        the data loader). Default: the class's ``view_spec``; methods whose data needs depend on their
        hyper-parameters (MIRAM's scales) override it."""
        return cls.view_spec

    def forward(self, batch: dict[str, Any]) -> StepOutput:
        """Calls :meth:`training_step`, so that DDP wrappers see the step as ``forward``."""
        return self.training_step(batch)

    def training_step(self, batch: dict[str, Any]) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Momentum / EMA updates, queue updates, schedules of hyper-parameters. Default: nothing."""

    def encoders(self) -> dict[str, nn.Module]:  # pragma: no cover - abstract
        """Backbones to export and evaluate, by name (most methods: ``{"backbone": ...}``)."""
        raise NotImplementedError

    def parameter_sets(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters per optimiser. One optimiser (``main``) unless a method needs several."""
        return {"main": [(n, p) for n, p in self.named_parameters() if p.requires_grad]}

    def export_meta(self) -> dict[str, dict[str, str]]:
        """Per-encoder metadata written into the exported safetensors (how to rebuild the model)."""
        return {}

    def visualize(self, batch: dict[str, Any], step: int) -> list[VisualPanel] | None:
        """Optional picture of what the method does on ``batch`` (masked modelling: reconstructions).

        The trainer calls it on rank 0 every ``train.visualize_every_n_steps`` steps and at the last step,
        with the current training batch (already on the device), under ``torch.no_grad()``, with the method
        in ``eval()`` mode and the global RNG forked and seeded with ``train.seed`` (so masks and views are
        the same at every call and training randomness is untouched). It writes the panels side by side,
        rows = samples, into ``RUN/reconstructions/step_XXXXXX.png``
        (:func:`medssl.eval.reconstruction.save_reconstruction_grid`). Return ``None`` (the default) for
        nothing; keep it to a few samples (the figure shows at most 8 rows).
        """
        return None


class BackboneMethod(Method):
    """A method that trains and exports one CNN backbone, ``self.backbone`` (MoCo v2, Med-MoCo, GraVIS, cnnmim).

    :meth:`build_backbone` builds it from the ``model:`` section and records what rebuilding it needs;
    :meth:`encoders` and :meth:`export_meta` then serve every such method.
    """

    def build_backbone(self, cfg: Any, data: DataInfo) -> nn.Module:
        """Build ``self.backbone`` (timm 2D, medssl 3D) for ``data`` and remember its rebuild settings."""
        self.backbone = build_backbone(cfg.model.backbone, in_chans=data.in_chans, image_size=data.image_size,
                                       stem=cfg.model.stem, pretrained=cfg.model.pretrained,
                                       spatial_dims=data.spatial_dims)
        self.backbone_name = cfg.model.backbone
        self.stem = cfg.model.stem
        self.in_chans = data.in_chans
        self.image_size = data.image_size
        self.spatial_dims = data.spatial_dims
        return self.backbone

    def encoders(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone}

    def export_meta(self) -> dict[str, dict[str, str]]:
        return {
            "backbone": {
                "format": "timm" if self.spatial_dims == 2 else "medssl-resnet3d (torchvision/MONAI ResNet key layout)",
                "model_name": self.backbone_name,
                "in_chans": str(self.in_chans),
                "image_size": str(self.image_size),
                "stem": self.stem,
                "spatial_dims": str(self.spatial_dims),
            }
        }
