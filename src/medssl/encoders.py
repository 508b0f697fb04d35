"""Where an encoder comes from: a run directory, an exported file, a training checkpoint or an initialisation.

An encoder is a :class:`medssl.nn.backbones.Encoder`: ``[0, 1]`` images in, pooled ``(B, D)`` features out (the
input normalisation lives inside it). Each source is read in exactly one place:

* an exported file — :func:`load_encoder` (``encoder*.safetensors`` with its rebuild metadata, and the
  ``whitening*.safetensors`` beside it when the metadata names one; :func:`read_metadata` for the metadata);
* a run directory — :func:`run_encoder_files` finds its encoders (``encoder.safetensors`` is named
  ``backbone``, ``encoder_<name>.safetensors`` ``<name>``), :func:`run_encoders` loads them,
  :func:`run_encoder_file` picks one file, :func:`run_config` reads its ``config.yaml``;
* a training checkpoint — :func:`checkpoint_encoders` rebuilds the method from the checkpoint's own config and
  returns its encoders;
* an initialisation — :func:`random_encoder` (seeded) and :func:`imagenet_encoder` (timm's ImageNet weights
  from a file, the Hugging Face cache or the hub), both through :func:`init_encoders` (``random-init`` /
  ``imagenet-init``).

:func:`data_config` gives the data settings an evaluation of a run uses (the run's intensity and cache
settings, the requested spec), and :func:`resolve_device` the device (``cuda`` when available, else ``cpu``).
Every problem is a :mod:`medssl.errors` error naming the file or flag.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from medssl.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medssl.config import DataConfig, PretrainConfig
    from medssl.nn.backbones import Encoder

NamedEncoder = tuple[str, "Encoder"]
"""``(label, encoder)``: the label names the encoder in result tables (``mocov2``, ``cass:vit``, ``random-init``)."""

INITS = ("random", "imagenet")
"""Baseline initialisations by name (``--init``); any other ``--init`` value names weights: a local file, ``timm:NAME``
or ``hf-hub:ORG/NAME`` (:mod:`medssl.nn.init_from`), loaded into the backbone and labelled ``init:<name>``."""

INIT_HELP = ("random, imagenet, or existing weights: a .safetensors / .pth file (e.g. a medssl encoder.safetensors), "
             "timm:NAME or hf-hub:ORG/NAME from the local Hugging Face cache (nothing is downloaded)")
"""The help of every ``--init`` option."""

ALL_ENCODERS = (None, "both", "all")
"""``--encoder`` values that select every encoder of a multi-encoder run or checkpoint."""

IMAGENET_WEIGHTS_ENV = "MEDSSL_IMAGENET_WEIGHTS"
"""Environment variable naming a local ImageNet weights file (timm layout, ``.safetensors`` / ``.pth``)."""

DEVICES = "cpu, cuda, cuda:N or mps"
"""The devices medssl evaluates on (``--device``)."""

DEVICE_HELP = f"{DEVICES} (default: cuda if available, else cpu)"

log = logging.getLogger("medssl")


class WeightsUnavailable(CheckpointError):
    """ImageNet weights cannot be had here (no network and not cached); baselines that need them are skipped."""


# ---------------------------------------------------------------------------------------------- device


def resolve_device(device: str | None = None) -> torch.device:
    """The device to run on: ``device`` checked against this machine, or ``cuda`` when available, else ``cpu``.

    Raises:
        ConfigError: not a device name (``tpu9``), a device type medssl does not run on, or a CUDA / MPS device
            this machine does not have (``--device cuda`` without a GPU, ``cuda:3`` with two GPUs).
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device}: not a device name (expected {DEVICES})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: MPS is not available on this machine (use --device cpu)")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device}: medssl runs on {DEVICES}, not on '{dev.type}'")
    return dev


# ---------------------------------------------------------------------------------------------- exported files


def meta_value(meta: dict[str, str], key: str) -> str | None:
    """A metadata value, ``None`` when absent or written as ``None`` / empty."""
    v = meta.get(key)
    return None if v in (None, "", "None") else v


def meta_int(meta: dict[str, str], key: str) -> int | None:
    """An integer metadata value (``None`` when absent).

    Raises:
        CheckpointError: the value is not an integer (a hand-edited or foreign file).
    """
    v = meta_value(meta, key)
    try:
        return None if v is None else int(v)
    except ValueError:
        raise CheckpointError(f"encoder metadata {key!r}: expected an integer, got {v!r}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported encoder file.

    Raises:
        CheckpointError: missing file, or not a readable safetensors file (garbage, truncated header).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder file {path}: not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types, and OSError
        raise CheckpointError(f"encoder file {path}: not a readable safetensors file ({_first_line(e)})") from None


def require_medssl_metadata(meta: dict[str, str], path: str | Path) -> None:
    """Check that an encoder file's metadata has what rebuilding it needs (``model_name``, ``in_chans``).

    Raises:
        CheckpointError: a key is missing (not exported by medssl).
    """
    for key in ("model_name", "in_chans"):
        if key not in meta:
            raise CheckpointError(f"encoder file {path}: metadata lacks '{key}' (not exported by medssl?)")


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file.

    Raises:
        CheckpointError: unreadable (truncated, garbage) file, naming it.
    """
    import safetensors.torch as st

    try:
        return st.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types, and OSError
        raise CheckpointError(f"safetensors file {path}: cannot be read ({_first_line(e)})") from None


def load_encoder(path: str | Path) -> Encoder:
    """Rebuild an exported encoder (with its input normalisation) from its safetensors file.

    Raises:
        CheckpointError: missing or unreadable file, missing metadata or weights that do not fit the recorded
            model.
    """
    meta = read_metadata(path)
    require_medssl_metadata(meta, path)
    from medssl.nn.backbones import Encoder, build_backbone

    backbone = build_backbone(
        meta["model_name"],
        in_chans=int(meta["in_chans"]),
        image_size=meta_int(meta, "image_size"),
        stem=meta.get("stem", "default"),
        spatial_dims=int(meta.get("spatial_dims", 2)),
        patch_size=meta_int(meta, "patch_size"),
        global_pool=meta_value(meta, "global_pool"),
    )
    state = load_tensors(path)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"encoder file {path}: weights do not fit {meta['model_name']}: {e}") from None
    if meta.get("whitening"):
        backbone = _load_whitening(Path(path), meta["whitening"], backbone)
    return Encoder(backbone).eval()


def _load_whitening(path: Path, name: str, backbone: nn.Module) -> nn.Module:
    """The backbone followed by the folded whitening layer stored in ``name`` (next to ``path``)."""
    from torch import nn

    from medssl.nn.whitening import WhitenedBackbone

    wpath = path.parent / name
    if not wpath.is_file():
        raise CheckpointError(f"encoder file {path}: its whitening layer {wpath} is missing (copy it along)")
    state = load_tensors(wpath)
    d = int(getattr(backbone, "num_features", 0) or 0)
    lin = nn.Linear(d, d)
    try:
        lin.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"whitening file {wpath}: does not fit a {d}-feature backbone: {e}") from None
    return WhitenedBackbone(backbone, lin)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------- run directories


def run_config(run: str | Path) -> dict[str, Any]:
    """A run directory's ``config.yaml`` as a mapping (``{}`` when the run has none).

    Raises:
        CheckpointError: the file is not valid YAML or not a mapping.
    """
    path = Path(run) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid YAML ({_first_line(e)})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a mapping of config sections, got {type(cfg).__name__}")
    return cfg


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    sec = cfg.get(name)
    return sec if isinstance(sec, dict) else {}


def run_encoder_files(run: str | Path) -> dict[str, Path]:
    """The encoders a run exported, by name: ``encoder.safetensors`` -> ``backbone``, ``encoder_<n>`` -> ``<n>``.

    Raises:
        CheckpointError: no run directory, or no encoder file in it.
    """
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"run directory {run}: not found")
    files = sorted(run.glob("encoder*.safetensors"))
    if not files:
        raise CheckpointError(f"run directory {run}: no encoder*.safetensors (did the run finish?)")
    return {f.stem.removeprefix("encoder").lstrip("_") or "backbone": f for f in files}


def select_encoders(names: Sequence[str], which: str | None, where: str) -> list[str]:
    """The encoder names ``which`` (``--encoder``) selects among ``names`` (every one for ``None`` / both / all).

    Raises:
        ConfigError: ``which`` is none of ``names``, naming ``where`` (``run DIR``) and the names it has.
    """
    if which in ALL_ENCODERS:
        return list(names)
    if which not in names:
        raise ConfigError(f"--encoder {which}: {where} has no encoder '{which}' (has: {', '.join(names)})")
    return [which]  # type: ignore[list-item]


def run_encoder_file(run: str | Path, encoder: str | None = None) -> Path:
    """The one ``encoder*.safetensors`` of a run directory (``encoder`` picks one of a multi-encoder run).

    Raises:
        CheckpointError: no run directory or no encoder file.
        ConfigError: several encoders and none chosen, or an unknown choice.
    """
    files = run_encoder_files(run)
    if encoder is None and len(files) > 1:
        raise ConfigError(f"run {run} has several encoders ({', '.join(files)}); choose one with --encoder NAME")
    names = select_encoders(list(files), encoder, f"run {run}")
    return files[names[0]]


def run_encoders(run: str | Path, which: str | None = None) -> tuple[list[NamedEncoder], dict[str, Any]]:
    """The encoders of a run directory (labelled ``<method>`` or ``<method>:<name>``) and its config mapping.

    Raises:
        CheckpointError: missing run, no encoder file, unreadable files.
        ConfigError: ``which`` names no encoder of the run.
    """
    run = Path(run)
    files = run_encoder_files(run)
    cfg = run_config(run)
    method_name = _section(cfg, "method").get("name", run.name)
    chosen = select_encoders(list(files), which, f"run {run}")
    return [(method_name if len(files) == 1 else f"{method_name}:{name}", load_encoder(files[name]))
            for name in chosen], cfg


def data_config(spec: str, run_cfg: dict[str, Any] | None = None, *, image_size: int | None = None,
                task: str | None = None, splits: str | Path | None = None) -> DataConfig:
    """The data settings to evaluate or embed ``spec`` with: the run's ``intensity`` / ``cache`` / ``cache_dir`` /
    ``spacing`` (volumes are resampled as in pretraining) and (unless ``image_size`` is given) ``image_size``;
    ``task`` and the split manifest ``splits`` as requested. Volumes are whole (``volume_mode: resize``).

    Raises:
        ConfigError: an invalid setting, naming the ``data.*`` key.
    """
    from medssl.config import DataConfig, build_dataclass

    run_data = _section(run_cfg or {}, "data")
    kept = {k: v for k, v in run_data.items() if k in ("intensity", "cache", "cache_dir", "spacing")}
    return build_dataclass(DataConfig, {**kept, "spec": spec, "image_size": image_size or run_data.get("image_size"),
                                        "task": task, "splits": str(splits) if splits else None,
                                        "volume_mode": "resize"}, where="data")


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_config(ckpt: dict[str, Any], path: Path) -> PretrainConfig:
    """The run config stored in a training checkpoint, validated."""
    from medssl.config import build_config

    conf = ckpt.get("config")
    if not isinstance(conf, dict):
        raise CheckpointError(f"checkpoint {path}: has no 'config' entry, so its method cannot be rebuilt "
                              "(not written by medssl pretrain?)")
    try:
        return build_config(conf)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its config is not valid: {e}") from None


def _method_from_checkpoint(ckpt: dict[str, Any], path: Path) -> tuple[Any, PretrainConfig]:
    """The method a training checkpoint was written by, rebuilt from its config and loaded with its weights."""
    cfg = _checkpoint_config(ckpt, path)
    from medssl.data.manifest import drop_bad
    from medssl.data.specs import open_from_config
    from medssl.engine.loader import pretrain_indices
    from medssl.methods import DataInfo, build_method

    ds = open_from_config(cfg.data, cache=False)
    if cfg.data.skip_bad:
        ds = drop_bad(ds)
    info = DataInfo(in_chans=ds.in_chans, spatial_dims=ds.spatial_dims,
                    image_size=int(cfg.data.image_size or ds.image_size),
                    num_samples=len(pretrain_indices(ds, cfg.data.split)))
    method = build_method(cfg, info, init_weights=False)
    try:
        method.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: does not fit its own config: {_first_line(e)}") from None
    return method, cfg


def checkpoint_encoders(path: str | Path, which: str | None = None) -> list[NamedEncoder]:
    """The encoders of an exported ``.safetensors`` file or of a training ``.ckpt`` (labelled
    ``<method>@<step>`` / ``<method>@<step>:<name>``); ``which`` selects among a checkpoint's encoders.

    Raises:
        ConfigError: another file type, or ``which`` names no encoder of the checkpoint.
        CheckpointError: a missing, unreadable or foreign file; a checkpoint without a config, or whose weights do
            not fit it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return [(path.stem, load_encoder(path))]
    if path.suffix != ".ckpt":
        raise ConfigError(f"--checkpoint {path}: expected an encoder .safetensors or a training .ckpt")
    from medssl.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    method, cfg = _method_from_checkpoint(ckpt, path)
    from medssl.nn.backbones import Encoder

    encs = method.encoders()
    chosen = select_encoders(list(encs), which, f"checkpoint {path}")
    return [(f"{cfg.method_name}@{int(ckpt['step'])}" + (f":{n}" if len(encs) > 1 else ""), Encoder(encs[n]).eval())
            for n in chosen]


# ---------------------------------------------------------------------------------------------- initialisations


def random_encoder(
    model_name: str, *, in_chans: int, image_size: int | None, stem: str = "default", spatial_dims: int = 2,
    seed: int = 0, patch_size: int | None = None, global_pool: str | None = None, zero_init_last: bool = False,
) -> Encoder:
    """A randomly initialised encoder (the ``--init random`` baseline), seeded; ``patch_size`` and
    ``global_pool`` for ViTs; ``zero_init_last`` as ``model.zero_init_last`` (residual CNNs: the baseline must
    start as the compared run's network did — the two inits give random features of very different quality,
    docs/methods/mocov2.md). The global RNG state is left as it was."""
    import torch

    from medssl.nn.backbones import Encoder, build_backbone

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = build_backbone(model_name, in_chans=in_chans, image_size=image_size, stem=stem,
                                  spatial_dims=spatial_dims, patch_size=patch_size, global_pool=global_pool,
                                  zero_init_last=zero_init_last)
    return Encoder(backbone).eval()


def baseline_zero_init_last(model_cfg: dict[str, Any]) -> bool:
    """``zero_init_last`` of the random baseline compared with a run whose ``model`` section is ``model_cfg``.

    The run's own value when its config.yaml records it; ``True`` (timm's init) for a run written before the key
    existed, which was built that way; ``ModelConfig``'s default (``False``) when there is no run (``{}``).

    Raises:
        ConfigError: the recorded value is not true / false (an edited config.yaml).
    """
    if "zero_init_last" not in model_cfg:
        return bool(model_cfg)
    value = model_cfg["zero_init_last"]
    if not isinstance(value, bool):
        raise ConfigError(f"model.zero_init_last in the compared run's config: expected true/false, got {value!r}")
    return value


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's name resolves and its port answers (a quick offline check)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_imagenet_file(model_name: str) -> str | None:
    """The timm weights of ``model_name`` already in the local Hugging Face cache, if any."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors",
                                                                                   "pytorch_model.bin"]
    for fname in names:
        found = try_to_load_from_cache(hub_id, fname)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def imagenet_encoder(
    model_name: str, *, in_chans: int, image_size: int | None, spatial_dims: int = 2, patch_size: int | None = None,
    global_pool: str | None = None, weights_file: str | Path | None = None,
) -> Encoder:
    """A 2D timm backbone with ImageNet weights (the ``--init imagenet`` baseline), default stem.

    Weights come from ``weights_file``, else the file named by ``$MEDSSL_IMAGENET_WEIGHTS``, else the local
    Hugging Face cache, else timm's download. timm adapts the first convolution to ``in_chans`` (summing the
    RGB filters for one channel) and resamples ViT position embeddings to ``image_size``.

    Raises:
        WeightsUnavailable: 3D backbone, or no file given, nothing cached and no network (message starts with
            ``imagenet weights unavailable``).
        CheckpointError: a given weights file is missing or does not fit the model.
        ConfigError: not a timm model name.
    """
    import timm

    from medssl.nn.backbones import Encoder, timm_kwargs

    if spatial_dims != 2:
        raise WeightsUnavailable(f"imagenet weights unavailable: {model_name} is a {spatial_dims}D backbone and timm's "
                                 "ImageNet weights are 2D")
    if not timm.is_model(model_name):
        raise ConfigError(f"unknown backbone '{model_name}': not a timm model name")
    kwargs = timm_kwargs(model_name, in_chans=in_chans, image_size=image_size, patch_size=patch_size,
                         global_pool=global_pool)
    given = weights_file or os.environ.get(IMAGENET_WEIGHTS_ENV) or None
    if given is not None and not Path(given).is_file():
        where = f"${IMAGENET_WEIGHTS_ENV}" if weights_file is None else "ImageNet weights file"
        raise CheckpointError(f"{where} {given}: not found")
    file = str(given) if given is not None else _cached_imagenet_file(model_name)
    if file is None and not _hub_reachable():
        raise WeightsUnavailable(
            f"imagenet weights unavailable offline: {model_name} is not in the Hugging Face cache and huggingface.co "
            f"cannot be reached (set ${IMAGENET_WEIGHTS_ENV} to a local weights file)")
    if file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": file}
    try:
        model = timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as e:  # network errors come in many types (OSError, HF hub errors, URLError)
        if given is not None:
            raise CheckpointError(f"ImageNet weights file {given}: does not fit {model_name}: {e}") from None
        raise WeightsUnavailable(f"imagenet weights unavailable offline: {type(e).__name__}: {e}") from None
    return Encoder(model).eval()


def check_inits(inits: Sequence[str]) -> list[str]:
    """The initialisations asked for, without repeats (order kept): names of :data:`INITS`, or weights sources
    (a local file, ``timm:NAME``, ``hf-hub:ORG/NAME``) that resolve to a local file here.

    Raises:
        ConfigError: an empty value, a missing file, or a network source that is not cached (offline).
    """
    from medssl.nn.init_from import resolve_init_source

    for name in inits:
        if name not in INITS:
            resolve_init_source(name, key="--init")
    return list(dict.fromkeys(inits))


def init_label(name: str) -> str:
    """The result-table label of an initialisation: ``random-init`` / ``imagenet-init``, else ``init:<name>`` (a
    file by its name)."""
    if name in INITS:
        return f"{name}-init"
    return f"init:{name if name.startswith(('timm:', 'hf-hub:')) else Path(name).name}"


def weights_encoder(spec: str, model_name: str, *, in_chans: int, image_size: int | None, stem: str = "default",
                    spatial_dims: int = 2, patch_size: int | None = None, global_pool: str | None = None,
                    adapt: str = "sum", inflate: bool = False) -> Encoder:
    """``model_name`` started from the weights ``spec`` names (``--init FILE|timm:NAME|hf-hub:ORG/NAME``), with the
    channel adaptation and 2D→3D inflation of :func:`medssl.nn.init_from.load_init_weights`.

    Raises:
        ConfigError: an unusable source; CheckpointError: unreadable or foreign weights.
    """
    from medssl.nn.backbones import Encoder, build_backbone

    backbone = build_backbone(model_name, in_chans=in_chans, image_size=image_size, stem=stem,
                              spatial_dims=spatial_dims, patch_size=patch_size, global_pool=global_pool,
                              init_from=spec, init_adapt=adapt, init_inflate=inflate, init_key="--init")
    return Encoder(backbone).eval()


def init_encoders(inits: Sequence[str], ds: Any, backbone: str, stem: str,
                  model_cfg: dict[str, Any]) -> tuple[list[NamedEncoder], list[str]]:
    """The ``random-init`` / ``imagenet-init`` / ``init:<weights>`` baseline encoders for the dataset ``ds`` (its
    channels, size and spatial dims), and a skip message for each one that cannot be built here (ImageNet weights
    offline, or for a 3D backbone); skips are also logged to stderr. ``model_cfg`` (the compared run's ``model``
    section, ``{}`` without a run) gives ViT ``patch_size`` / ``global_pool``, ``init_adapt`` / ``init_inflate``
    for weights and the random baseline's ``zero_init_last`` (:func:`baseline_zero_init_last`).

    Raises:
        ConfigError: an unknown initialisation or backbone.
    """
    out: list[NamedEncoder] = []
    skipped: list[str] = []
    shape = dict(in_chans=ds.in_chans, image_size=ds.image_size, spatial_dims=ds.spatial_dims,
                 patch_size=model_cfg.get("patch_size"), global_pool=model_cfg.get("global_pool"))
    for name in check_inits(inits):
        if name == "random":
            out.append(("random-init", random_encoder(backbone, stem=stem, seed=0,
                                                      zero_init_last=baseline_zero_init_last(model_cfg), **shape)))
            continue
        if name not in INITS:
            out.append((init_label(name), weights_encoder(name, backbone, stem=stem,
                                                          adapt=model_cfg.get("init_adapt") or "sum",
                                                          inflate=bool(model_cfg.get("init_inflate")), **shape)))
            continue
        try:
            out.append(("imagenet-init", imagenet_encoder(backbone, **shape)))
        except WeightsUnavailable as e:
            skipped.append(f"imagenet-init: {e}; skipped")
            log.warning("%s; skipped", e)
    return out, skipped


# ---------------------------------------------------------------------------------------------- any source


def source_encoders(run: str | Path | None = None, checkpoint: str | Path | None = None,
                    which: str | None = None) -> tuple[list[NamedEncoder], dict[str, Any]]:
    """The encoders of a run directory and / or an exported file or checkpoint, and the run's config mapping
    (``{}`` without a run); ``which`` (``--encoder``) selects among multi-encoder sources."""
    found: list[NamedEncoder] = []
    run_cfg: dict[str, Any] = {}
    if run is not None:
        found, run_cfg = run_encoders(run, which)
    if checkpoint is not None:
        found += checkpoint_encoders(checkpoint, which)
    return found, run_cfg
