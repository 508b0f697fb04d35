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
        needs_highres: whether the batch must carry a 2x copy of the image (multi-scale reconstruction).
        needs_masks: whether the batch carries mask-generator output.
    """

    num_views: int = 2
    needs_highres: bool = False
    needs_masks: bool = False


@dataclass
class StepOutput:
    """Result of one training step: the loss to back-propagate and scalar logs."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


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
