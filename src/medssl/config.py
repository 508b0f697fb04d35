"""Typed run configuration: dataclasses, YAML recipes and ``--set a.b=c`` overrides.

A run is fully described by a :class:`PretrainConfig`. It is built in three layers, later layers winning:
the dataclass defaults, a YAML recipe (``--config``), then CLI flags and ``--set key=value`` overrides.
The resolved config is written to ``config.yaml`` in the run directory, so every run can be repeated.

Unknown keys are errors with a "did you mean" suggestion: a typo in a recipe must never be silently
ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medssl.checks import FieldError, check_choice, check_range
from medssl.data.readers import IntensityConfig
from medssl.errors import ConfigError
from medssl.fileio import atomic_write_text
from medssl.transforms.views import ViewConfig

#: ``train.precision`` values (Lightning Fabric's names; ``32`` is ``32-true``).
PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")
#: ``train.accelerator`` values.
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
#: ``data.split`` values: which split pretraining reads.
SPLIT_CHOICES = ("train", "train+val", "all")
#: ``data.volume_mode`` values: how a 3D volume becomes pretraining input.
VOLUME_MODES = ("patches", "resize")
#: Largest ``data.patch_size`` side in voxels, and largest ``data.samples_per_volume``.
MAX_PATCH_SIDE = 1024
MAX_SAMPLES_PER_VOLUME = 64
#: Bounds of a ``data.spacing`` value in mm.
SPACING_RANGE_MM = (1e-3, 100.0)
#: ``optim.name`` values.
OPTIMIZERS = ("sgd", "adamw")
#: ``log.backends`` values (``csv`` = ``metrics.csv``, always among them; see :class:`LogConfig`).
LOG_BACKENDS = ("csv", "tensorboard", "wandb", "mlflow")
#: Largest ``train.seed``: every rank seeds with ``seed + rank``, which NumPy needs below 2**32.
MAX_SEED = 2**31 - 1


@dataclass
class ModelConfig:
    """Backbone choice.

    Attributes:
        backbone: any timm model name (CNN or ViT), e.g. ``resnet18``, ``resnet50``, ``vit_small_patch16_224``.
        stem: ``default`` keeps timm's stem; ``cifar`` replaces a ResNet stem by a 3x3 stride-1 convolution
            without max-pool, for small inputs (28-64 px) where the default stem throws away 4x resolution.
        pretrained: load ImageNet weights through timm (needs network access).
        zero_init_last: start the last BatchNorm of every residual block at scale 0, as timm does by default
            (each block starts as the identity), instead of 1. ``false`` (the default, chosen by measurement:
            docs/methods/mocov2.md) trains better features in short contrastive runs on small images. ResNet-style
            timm backbones only; ignored with ``pretrained``.
        patch_size: ViT patch side in pixels / voxels; ``None`` = the model's own (masked-image methods pick
            a smaller one for small images and record it here, see
            :func:`medssl.nn.masked_vit.resolve_patch_size`). Ignored by CNNs.
        global_pool: ViT features for evaluation: ``token`` (class token) or ``avg`` (mean of the patch tokens
            after the final norm; the weights keep timm's key layout); ``None`` = the model's own (masked-image
            methods choose ``avg`` and record it here). Ignored by CNNs.
        init_from: start the backbone from existing weights (continued pretraining): a local ``.safetensors``
            (e.g. a medssl ``encoder.safetensors``) or ``.pth`` file, ``timm:NAME`` or ``hf-hub:ORG/NAME`` (read from
            the local Hugging Face cache; nothing is downloaded). See :mod:`medssl.nn.init_from`.
        init_adapt: how RGB first-layer filters become 1-channel ones: ``sum`` (timm's rule) or ``mean``.
        init_inflate: inflate 2D convolution weights into a 3D backbone (I3D: repeat along depth, divide by it).
    """

    backbone: str = "resnet18"
    stem: str = "default"
    pretrained: bool = False
    zero_init_last: bool = False
    patch_size: int | None = None
    global_pool: str | None = None
    init_from: str | None = None
    init_adapt: str = "sum"
    init_inflate: bool = False

    def __post_init__(self) -> None:
        check_choice("init_adapt", self.init_adapt, ("sum", "mean"))
        if self.init_from is not None and not str(self.init_from).strip():
            raise FieldError("init_from", "is empty; give a weights file, timm:NAME or hf-hub:ORG/NAME")


@dataclass
class DataConfig:
    """Dataset and loading.

    Attributes:
        spec: data spec, e.g. ``phantom2d``, ``npz:/data/pneumoniamnist.npz``, ``folder:/data/pngs``.
        image_size: side length fed to the model (views are resized to it); ``None`` = dataset's native size.
        task: the label task where a dataset has several.
        num_workers: DataLoader worker processes.
        split: which split pretraining reads (``train`` or ``all``; unlabelled SSL may use every image except test).
        skip_bad: read every item once before training and drop the unreadable ones (listed in
            ``RUN/skipped.csv``) instead of failing on the first.
        intensity: how file values map to ``[0, 1]`` (windowing, percentile clipping, z-score) for datasets
            read from DICOM / NIfTI / MHA / image files; recorded with the run.
        cache: cache decoded, preprocessed items on disk (file-backed datasets; see ``medssl.data.cache``).
        cache_dir: where; ``None`` = ``$MEDSSL_CACHE_DIR`` or ``~/.cache/medssl/items``.
        splits: a split manifest (``splits.csv`` of an earlier run) whose train/val/test assignment replaces
            the dataset's own.
        follow_symlinks: ``folder:`` follows symlinked directories that lead out of the data root (by default
            they are skipped with a warning; symlinks within the root and file symlinks are always followed,
            and a symlink cycle is entered once).
        spacing: 3D files: ``[z, y, x]`` voxel spacing in mm (one number = isotropic) every volume is resampled
            to as soon as it is read (trilinear for images, nearest for masks), or ``native`` (no resampling).
            The axes are medssl's ``(D, H, W) = (S, A, R)`` (docs/volumes.md).
        volume_mode: 3D pretraining input: ``patches`` (random crops of ``patch_size`` voxels from the resampled
            volume, the default) or ``resize`` (the whole volume resized to an ``image_size`` cube).
            Evaluation always sees whole volumes.
        patch_size: ``patches``: crop size in voxels, ``[z, y, x]`` or one side for a cube; ``None`` = the image
            size cube. A volume smaller than a patch is zero-padded (centred).
        samples_per_volume: ``patches``: crops drawn from one read of a volume (volumes are expensive to load);
            ``train.batch_size`` counts crops and must be a multiple of it.
        foreground_p: ``patches``: probability that a crop is centred on a foreground voxel (the mask where the
            data has masks, else intensity above ``foreground_threshold``); the rest are uniform. 0 = uniform.
        foreground_threshold: the ``[0, 1]`` intensity above which a voxel counts as foreground.
        shuffle_buffer: items in each rank's shuffle buffer when pretraining streams from ``shards:`` (larger mixes
            more chunks at once; see ``medssl.data.shards.stream_order``).
    """

    spec: str = "phantom2d"
    image_size: int | None = None
    task: str | None = None
    num_workers: int = 0
    split: str = "train"
    skip_bad: bool = False
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    cache: bool = True
    cache_dir: str | None = None
    splits: str | None = None
    follow_symlinks: bool = False
    spacing: Any = "native"
    volume_mode: str = "patches"
    patch_size: Any = None
    samples_per_volume: int = 1
    foreground_p: float = 0.0
    foreground_threshold: float = 0.1
    shuffle_buffer: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise FieldError("spec", "must name a dataset (e.g. phantom2d, folder:DIR, csv:FILE.csv), got ''")
        check_range("image_size", self.image_size, ge=1, allow_none=True)
        check_range("num_workers", self.num_workers, ge=0)
        check_range("shuffle_buffer", self.shuffle_buffer, ge=1)
        check_choice("split", self.split, SPLIT_CHOICES)
        self.spacing = _spacing(self.spacing)
        check_choice("volume_mode", self.volume_mode, VOLUME_MODES)
        self.patch_size = _patch_size(self.patch_size)
        check_range("samples_per_volume", self.samples_per_volume, ge=1, le=MAX_SAMPLES_PER_VOLUME)
        check_range("foreground_p", self.foreground_p, ge=0, le=1)
        check_range("foreground_threshold", self.foreground_threshold, ge=0, le=1)

    @property
    def target_spacing(self) -> tuple[float, float, float] | None:
        """``spacing`` as a ``(z, y, x)`` tuple, ``None`` for ``native``."""
        return None if self.spacing == "native" else tuple(self.spacing)  # type: ignore[return-value]


def _three(name: str, value: Any, what: str) -> list[Any]:
    """``value`` as three entries (one number is repeated), else a FieldError naming ``name``."""
    if isinstance(value, list | tuple):
        if len(value) != 3:
            raise FieldError(name, f"must be {what}: one number or [z, y, x], got {list(value)!r}")
        return list(value)
    return [value] * 3


def _spacing(value: Any) -> Any:
    """``native`` or a ``[z, y, x]`` list of mm in :data:`SPACING_RANGE_MM`."""
    if isinstance(value, str) and value.strip().lower() == "native":
        return "native"
    if value is None or isinstance(value, str | bool):
        raise FieldError("spacing", f"must be 'native' or [z, y, x] in mm, got {value!r}")
    lo, hi = SPACING_RANGE_MM
    out = []
    for v in _three("spacing", value, "voxel spacing in mm"):
        check_range("spacing", v, ge=lo, le=hi)
        out.append(float(v))
    return out


def _patch_size(value: Any) -> list[int] | None:
    """``None`` or a ``[z, y, x]`` list of voxel counts in ``[2, MAX_PATCH_SIDE]``."""
    if value is None:
        return None
    if isinstance(value, str | bool):
        raise FieldError("patch_size", f"must be one number of voxels or [z, y, x], got {value!r}")
    out = []
    for v in _three("patch_size", value, "voxels"):
        check_range("patch_size", v, ge=2, le=MAX_PATCH_SIDE)
        if int(v) != v:
            raise FieldError("patch_size", f"must be whole voxel counts, got {v!r}")
        out.append(int(v))
    return out


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    A method that trains several networks with their own optimisers (CASS: ``cnn`` and ``vit``, see
    :meth:`medssl.methods.base.Method.parameter_sets`) gets one optimiser + schedule per parameter set, all
    built from these settings; ``sets`` overrides any of them for one set::

        optim:
          name: adamw
          lr: 1.0e-3
          sets:
            vit: {lr: 5.0e-4, weight_decay: 0.05}

    Attributes:
        name: ``sgd`` or ``adamw``; ``None`` = the method's default (filled in when the config is built).
        lr: peak learning rate (after warm-up). ``None`` = the method's default.
        weight_decay: applied to weights only, never to norms and biases.
        momentum: SGD momentum.
        betas: AdamW betas.
        warmup_steps: linear warm-up length; ``None`` = ``warmup_fraction`` of the run.
        warmup_fraction: warm-up as a fraction of the total steps when ``warmup_steps`` is None.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        grad_clip: clip the gradient norm of each optimiser's parameters to this value (0 = off).
        sets: per parameter set, overrides of the fields above (``{set name: {field: value}}``). Set names
            are checked against the method's sets when training starts.

    Ranges, checked when the section is built: ``lr >= 0`` and finite (0 leaves the weights unchanged: useful
    to test gradients), ``weight_decay >= 0``, ``momentum`` and
    each beta in ``[0, 1)``, ``warmup_fraction`` and ``min_lr_ratio`` in ``[0, 1]``, ``warmup_steps >= 0``,
    ``grad_clip >= 0`` (each set's overrides alike).
    """

    name: str | None = None
    lr: float | None = None
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every value's range, then every per-set override (unknown keys, wrong types and values out of
        range are errors there too, named ``optim.sets.<set>.<key>``)."""
        check_choice("name", self.name, OPTIMIZERS, allow_none=True)
        check_range("lr", self.lr, ge=0, allow_none=True)  # 0 freezes the weights (gradient tests use it)
        check_range("weight_decay", self.weight_decay, ge=0)
        check_range("momentum", self.momentum, ge=0, lt=1)
        for i, beta in enumerate(self.betas):
            check_range(f"betas[{i}]", beta, ge=0, lt=1)
        check_range("warmup_steps", self.warmup_steps, ge=0, allow_none=True)
        check_range("warmup_fraction", self.warmup_fraction, ge=0, le=1)
        check_range("min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_range("grad_clip", self.grad_clip, ge=0)
        for name in self.sets:
            self.for_set(name)

    def for_set(self, name: str) -> OptimConfig:
        """The settings of parameter set ``name``: these settings with ``sets[name]`` applied (no ``sets``).

        Raises:
            ConfigError: the override is not a mapping, names an unknown field or has a value of the wrong type.
        """
        override = self.sets.get(name) or {}
        where = f"optim.sets.{name}"
        if not isinstance(override, dict):
            raise ConfigError(f"{where}: expected a mapping of optimiser settings, got {override!r}")
        if "sets" in override:
            raise ConfigError(f"{where}: sets cannot be nested")
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sets"}
        return build_dataclass(OptimConfig, {**base, **override}, where=where)


@dataclass
class TrainConfig:
    """Loop length, devices, logging and checkpointing.

    Attributes:
        batch_size: images per optimiser step *per device*.
        epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: total optimiser steps.
        seed: seeds data order, augmentations and initialisation.
        devices: number of devices (``1`` = one CPU process or one GPU; >1 = DDP).
        accelerator: one of :data:`ACCELERATORS` (``auto``, ``cpu``, ``cuda``, ``gpu``, ``mps``).
        precision: one of :data:`PRECISIONS` (``32``, ``bf16-mixed``, ...).
        num_nodes: nodes for multi-node DDP (torchrun / SLURM provide the rendezvous).
        log_every_n_steps: how often a row goes into metrics.csv and the progress line.
        drop_last: drop the last incomplete batch of an epoch.
        deterministic: ask torch for deterministic algorithms (slower; used by resume-equality tests).
        collapse_every_n_steps: every this many steps (and at the last step) the effective rank and the std
            of the embeddings a method reports (``StepOutput.embeddings``) go into metrics.csv as
            ``<name>_eff_rank`` / ``<name>_std`` columns (:mod:`medssl.eval.collapse`); 0 = off.
        collapse_alarm_rank: the collapse alarm (:mod:`medssl.engine.alarm`) counts a diagnostic as collapsed
            when a projector's effective rank is below this fraction of its largest possible value
            ``min(width, samples - 1)`` (0 = rank not checked).
        collapse_alarm_std: ... or when its normalised std (``<name>_std``, ~1 when spread out) is below this
            (0 = std not checked).
        collapse_alarm_patience: collapsed diagnostics in a row before the alarm fires (a loud warning and
            ``collapse_alarm = 1`` in metrics.csv); 0 = no alarm.
        stop_on_collapse: when the alarm fires, write a checkpoint and stop (exit code 3) instead of going on.
        visualize_every_n_steps: every this many steps (and at the last step) methods that draw something
            (:meth:`medssl.methods.base.Method.visualize`: reconstructions of masked image modelling) write
            ``RUN/reconstructions/step_XXXXXX.png``; 0 = off.
        channels_last: keep the method's 4-D (5-D in 3D) weights in channels-last memory format, so
            convolutions run NHWC (NDHWC): ~6 % faster ResNet-18 steps on this project's CPU, usually faster on
            tensor-core GPUs too (docs/benchmarks.md). The same math; exported weights are contiguous.

    Every value is checked when the section is built (``__post_init__``): counts >= 1 (``batch_size``,
    ``epochs``, ``max_steps``, ``devices``, ``num_nodes``, ``log_every_n_steps``), cadences >= 0 (0 = off),
    ``seed`` in ``[0, MAX_SEED]``, ``accelerator`` and ``precision`` among their choices, ``collapse_alarm_rank``
    in ``[0, 1]``, ``collapse_alarm_std`` and ``collapse_alarm_patience`` >= 0, ``stop_on_collapse`` only with the
    diagnostics and the alarm on.
    """

    batch_size: int = 64
    epochs: int = 100
    max_steps: int | None = None
    seed: int = 0
    devices: int = 1
    accelerator: str = "auto"
    precision: str = "32"
    num_nodes: int = 1
    log_every_n_steps: int = 10
    drop_last: bool = True
    deterministic: bool = False
    collapse_every_n_steps: int = 50
    collapse_alarm_rank: float = 0.01
    collapse_alarm_std: float = 0.1
    collapse_alarm_patience: int = 3
    stop_on_collapse: bool = False
    visualize_every_n_steps: int = 200
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_range("batch_size", self.batch_size, ge=1)
        check_range("epochs", self.epochs, ge=1)
        check_range("max_steps", self.max_steps, ge=1, allow_none=True)
        check_range("seed", self.seed, ge=0, le=MAX_SEED)
        check_range("devices", self.devices, ge=1)
        check_choice("accelerator", self.accelerator, ACCELERATORS)
        check_choice("precision", self.precision, PRECISIONS)
        check_range("num_nodes", self.num_nodes, ge=1)
        check_range("log_every_n_steps", self.log_every_n_steps, ge=1)
        check_range("collapse_every_n_steps", self.collapse_every_n_steps, ge=0)
        check_range("collapse_alarm_rank", self.collapse_alarm_rank, ge=0, le=1)
        check_range("collapse_alarm_std", self.collapse_alarm_std, ge=0)
        check_range("collapse_alarm_patience", self.collapse_alarm_patience, ge=0)
        if self.stop_on_collapse and (not self.collapse_every_n_steps or not self.collapse_alarm_patience):
            raise FieldError("stop_on_collapse", "needs collapse_every_n_steps > 0 and collapse_alarm_patience > 0 "
                             "(the alarm is what stops the run)")
        check_range("visualize_every_n_steps", self.visualize_every_n_steps, ge=0)


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept (the ``checkpoint:`` section).

    ``checkpoints/last.ckpt`` is always the newest complete checkpoint (written atomically: temp file, fsync,
    rename), at every epoch end, every ``every_n_steps`` steps and at the end of training.

    Attributes:
        every_n_steps: extra checkpoint cadence in optimiser steps (0 = epoch ends and the end only).
        keep_last_k: also keep the ``k`` newest checkpoints as ``checkpoints/step_XXXXXXX.ckpt`` (hard links to
            the file ``last.ckpt`` was at that step, so they cost no extra disk until ``last.ckpt`` moves on);
            1 = ``last.ckpt`` only.
        on_sigterm: on SIGTERM (what SLURM and Kubernetes send before preemption) finish the current step,
            write a checkpoint and stop with exit code 143, so ``--resume`` continues exactly there.
    """

    every_n_steps: int = 0
    keep_last_k: int = 1
    on_sigterm: bool = True

    def __post_init__(self) -> None:
        check_range("every_n_steps", self.every_n_steps, ge=0)
        check_range("keep_last_k", self.keep_last_k, ge=1)


@dataclass
class LogConfig:
    """Where training metrics and figures go (the ``log:`` section), through Lightning Fabric's loggers.

    ``metrics.csv`` is the run's own record (the report, ``--resume`` and the tests read it), so ``csv`` is always
    among the backends. The others (:mod:`medssl.engine.tracking`):

    * ``tensorboard`` (default): event files ``RUN/events.out.tfevents.*`` beside ``metrics.csv`` with every
      scalar of a metrics row, the collapse spectrum (``collapse/spectrum``) and the reconstruction grids
      (``reconstructions``) as images. ``tensorboard --logdir RUN`` shows them.
    * ``wandb``: Weights & Biases (``pip install medssl[wandb]``; ``WANDB_MODE=offline`` without network).
    * ``mlflow``: MLflow, tracking into ``RUN/mlruns`` unless ``MLFLOW_TRACKING_URI`` says otherwise
      (``pip install medssl[mlflow]``).

    A backend whose package is not installed is an error before training starts, e.g.
    ``--set log.backends=[csv,tensorboard,wandb]`` without wandb.

    Attributes:
        backends: the backends, among :data:`LOG_BACKENDS` (``csv`` included, no repeats).
        project: the W&B project / MLflow experiment name.
    """

    backends: tuple[str, ...] = ("csv", "tensorboard")
    project: str = "medssl"

    def __post_init__(self) -> None:
        if isinstance(self.backends, str):
            self.backends = (self.backends,)
        self.backends = tuple(self.backends)
        for i, name in enumerate(self.backends):
            check_choice(f"backends[{i}]", name, LOG_BACKENDS)
        if len(set(self.backends)) != len(self.backends):
            raise FieldError("backends", f"lists a backend twice: {list(self.backends)}")
        if "csv" not in self.backends:
            raise FieldError("backends", f"must include csv (metrics.csv is the run's record), got "
                             f"{list(self.backends)}")
        if not isinstance(self.project, str) or not self.project.strip():
            raise FieldError("project", f"must be a non-empty name, got {self.project!r}")


@dataclass
class PretrainConfig:
    """The whole description of a pretraining run (written to ``config.yaml``)."""

    method: dict[str, Any] = field(default_factory=lambda: {"name": "mocov2"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def method_name(self) -> str:
        """The registry name of the method."""
        return str(self.method.get("name", ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (YAML-safe) representation."""
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _suggest(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: cannot interpret {value!r} as {tp}")
    if tp is Any:
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    return value


def build_dataclass(cls: type, data: Any, where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, validating keys and types.

    Raises:
        ConfigError: on an unknown key (with a suggestion) or a value of the wrong type.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_suggest(str(key), fields)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except FieldError as e:  # a __post_init__ check names the field; add the section path
        raise e.at(where) from None


def parse_set(items: typing.Iterable[str]) -> dict[str, Any]:
    """Parse ``a.b=c`` strings into a nested mapping; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set has an empty key in '{item}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe, with clear errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p}: top level must be a mapping of sections")
    return data


def build_config(*layers: dict[str, Any]) -> PretrainConfig:
    """Merge mappings (later wins) over the defaults and validate into a :class:`PretrainConfig`.

    The ``method`` section is validated by the method registry (each method owns its hyper-parameters),
    see :func:`medssl.methods.resolve_method_config`.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    if isinstance(merged.get("method"), str):
        merged["method"] = {"name": merged["method"]}
    cfg = build_dataclass(PretrainConfig, merged)
    from medssl.methods import get_method, resolve_method_config

    cfg.method = resolve_method_config(cfg.method)
    if cfg.optim.name is None:
        cfg.optim.name = get_method(cfg.method_name).default_optimizer
    return cfg


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (:func:`medssl.fileio.atomic_write`).

    Raises:
        StorageError: the disk refused the write (full, read-only); the previous file is unchanged.
    """
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: str | Path) -> PretrainConfig:
    """Read a resolved ``config.yaml`` back."""
    return build_config(load_yaml(path))
