"""The method contract: a method is a small ``nn.Module`` that computes its own loss.

The trainer knows nothing method-specific. A method declares its hyper-parameters (a dataclass,
``config_cls``), what its data must provide (:class:`ViewSpec`), turns a batch into a loss
(:meth:`Method.training_step`), updates its own state after each optimiser step (EMA, queues:
:meth:`Method.after_optimizer_step`) and says what gets exported and evaluated (:meth:`Method.encoders`).

A method sees only what it needs: its typed hyper-parameters, the ``model:`` and ``views:`` sections and a
:class:`DataInfo` — never the whole run configuration. Settings it derives from the data are filled into
the run configuration by :meth:`Method.resolve_defaults` *before* construction, so that ``config.yaml``
records them; :func:`medssl.methods.registry.build_method` does both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

import torch
from torch import nn

from medssl.config import ModelConfig, build_dataclass
from medssl.errors import ConfigError
from medssl.nn.backbones import build_backbone, check_image_fits
from medssl.transforms.masking import MaskConfig, num_masked
from medssl.visual import VisualPanel

if TYPE_CHECKING:
    from medssl.config import PretrainConfig

__all__ = ["BackboneMethod", "DataInfo", "Method", "MethodConfig", "StepOutput", "ViewSpec", "VisualPanel",
           "check_mask_units", "init_kwargs"]


def init_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The ``init_from`` keywords of :func:`medssl.nn.backbones.build_backbone` a ``model:`` section asks for
    (continued pretraining from existing weights: ``model.init_from``, ``model.init_adapt``, ``model.init_inflate``)."""
    return {"init_from": model.init_from, "init_adapt": model.init_adapt, "init_inflate": model.init_inflate}


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its data to build itself."""

    in_chans: int
    spatial_dims: int
    image_size: int
    num_samples: int


@dataclass(frozen=True)
class ViewSpec:
    """What a method needs from the data pipeline beyond the images (views are made inside the step).

    Attributes:
        needs_highres: whether the batch must carry higher-resolution copies of the image, read from the
            source at ``factor x`` the image size (multi-scale reconstruction, MIRAM): batch key
            ``image_highres`` for 2x, ``image_highres_x<factor>`` for other factors
            (:func:`medssl.data.highres.highres_key`).
        highres_factors: the factors of the high-resolution copies when ``needs_highres``.
    """

    needs_highres: bool = False
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
class MethodConfig:
    """Hyper-parameters every method has; subclasses add their own fields and check them in ``__post_init__``
    (with :func:`medssl.checks.check_range` / :func:`~medssl.checks.check_choice`)."""

    name: str = ""


C = TypeVar("C", bound=MethodConfig)


class Method(nn.Module, Generic[C]):
    """Base class of SSL methods, generic over its hyper-parameter dataclass ``C``.

    Subclasses set the class attributes, build themselves in ``__init__(hparams, model, views, data)``
    (calling ``super().__init__(hparams)``) and implement :meth:`training_step` and :meth:`encoders`.

    Class attributes:
        name: registry name.
        description: one line for ``medssl methods``.
        config_cls: dataclass of the method's hyper-parameters (the ``method:`` section of a recipe), ``C``.
        default_lr: peak learning rate when the recipe gives none, for ``default_optimizer``.
        lr_reference_batch: when set, ``default_lr`` is the rate at this global batch and the default scales
            linearly with the global batch (``default_lr × batch × devices × nodes / lr_reference_batch``, the
            linear scaling rule of Goyal et al. 2017); ``None`` = ``default_lr`` at every batch size.
        default_optimizer: ``sgd`` or ``adamw``.
        paper: citation.
        supported_spatial_dims: the image dimensionalities the method trains on (2D images, 3D volumes).
        view_spec: what the data pipeline must provide (see :meth:`view_spec_for`).

    Attributes:
        hparams: the method's validated hyper-parameters (a ``config_cls`` instance).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    default_lr: ClassVar[float] = 0.03
    lr_reference_batch: ClassVar[int | None] = None
    default_optimizer: ClassVar[str] = "sgd"
    paper: ClassVar[str] = ""
    supported_spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    view_spec: ClassVar[ViewSpec] = ViewSpec()

    def __init__(self, hparams: C | None = None) -> None:
        """Args:
            hparams: the hyper-parameters; ``None`` = the defaults of ``config_cls``.

        Raises:
            TypeError: ``hparams`` is not a ``config_cls`` (e.g. a whole run config: build methods with
                :func:`~medssl.methods.registry.build_method`).
        """
        if hparams is not None and not isinstance(hparams, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes its {self.config_cls.__name__}, got "
                            f"{type(hparams).__name__}; build methods with medssl.methods.build_method(cfg, data_info)")
        super().__init__()
        self.hparams: C = hparams if hparams is not None else cast(C, self.config_cls())

    @classmethod
    def parse_hparams(cls, section: Mapping[str, Any]) -> C:
        """The typed hyper-parameters of a recipe's ``method:`` section: keys, types and values checked
        (the dataclass's ``__post_init__``), errors naming ``method.<key>``.

        Raises:
            ConfigError: an unknown key, a wrong type or an out-of-range value.
        """
        return cast(C, build_dataclass(cls.config_cls, dict(section), where="method"))

    @classmethod
    def resolve_defaults(cls, cfg: PretrainConfig, data: DataInfo) -> None:
        """Fill in, in ``cfg``, the settings this method derives from the data, so that the run's ``config.yaml``
        records what was built (e.g. MAE's ViT by spatial dims, its patch size and pooling). Called by
        :func:`~medssl.methods.registry.build_method` before construction; must be idempotent (a resolved
        config resolves to itself). Default: nothing."""

    @classmethod
    def view_spec_for(cls, method_cfg: Mapping[str, Any]) -> ViewSpec:
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


class BackboneMethod(Method[C]):
    """A method that trains and exports one CNN backbone, ``self.backbone`` (MoCo v2, Med-MoCo, GraVIS, cnnmim).

    :meth:`build_backbone` builds it from the ``model:`` section and records what rebuilding it needs;
    :meth:`encoders` and :meth:`export_meta` then serve every such method.
    """

    def build_backbone(self, model: ModelConfig, data: DataInfo) -> nn.Module:
        """Build ``self.backbone`` (timm 2D, medssl 3D) for ``data`` and remember its rebuild settings.

        Raises:
            ConfigError: an unknown backbone, or an image size it cannot use
                (:func:`medssl.nn.backbones.check_image_fits`).
        """
        self.backbone = build_backbone(model.backbone, in_chans=data.in_chans, image_size=data.image_size,
                                       stem=model.stem, pretrained=model.pretrained, spatial_dims=data.spatial_dims,
                                       zero_init_last=model.zero_init_last, **init_kwargs(model))
        check_image_fits(self.backbone, model.backbone, data.image_size)
        self.backbone_name = model.backbone
        self.stem = model.stem
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


def check_mask_units(mask: MaskConfig, grid: Sequence[int], *, values_per_unit: int, norm_pix: bool,
                     sizes: str) -> None:
    """Refuse masked-image-modelling settings that cannot train on this data (they would train to NaN or to
    nothing), before anything trains.

    * the mask must hide at least one unit of the grid when ``method.mask_ratio > 0`` (a grid of one unit,
      e.g. a patch as large as the image, masks nothing) and leave at least one visible;
    * norm-pix targets normalise every unit by its own mean and (unbiased) variance, which needs at least two
      values per unit: a one-pixel unit of a grey image has a variance of ``0 / 0`` and trains to NaN.

    Args:
        mask: strategy and ratio (a ``tube`` strategy on a 2D grid is refused here too).
        grid: the unit grid of the image.
        values_per_unit: pixels (voxels) x channels of one unit.
        norm_pix: whether the targets are normalised per unit.
        sizes: the keys and values that set the unit size, for the message (e.g.
            ``"data.image_size 8, model.patch_size 8"``).

    Raises:
        ConfigError: naming ``method.mask_ratio`` / ``method.norm_pix_loss`` and the size keys.
    """
    total, masked = math.prod(grid), num_masked(mask, grid)
    if mask.ratio > 0 and not 0 < masked < total:
        raise ConfigError(
            f"method.mask_ratio {mask.ratio:g} masks {masked} of the {total} unit(s) of the {tuple(grid)} mask grid "
            f"({sizes}); at least one must be masked and one visible: use smaller units or another mask ratio"
        )
    if norm_pix and values_per_unit < 2:
        raise ConfigError(
            f"method.norm_pix_loss normalises every unit by its own variance, which needs at least 2 values per "
            f"unit, but a unit holds {values_per_unit} ({sizes}); use larger units or method.norm_pix_loss=false"
        )
