"""Export trained encoders as safetensors in timm's key layout, and load them back.

``encoder.safetensors`` holds the backbone's ``state_dict`` exactly as ``timm.create_model(name,
num_classes=0, in_chans=C)`` names it, so it loads with a plain ``load_state_dict`` — no key surgery. The
file's metadata records how to rebuild the model (model name, channels, stem, image size, input
normalisation), which :func:`load_encoder` uses.

An encoder that ends with a whitening layer (Med-MoCo, :class:`medssl.nn.whitening.WhitenedBackbone`) is
written as two files, so the backbone file keeps loading strictly into plain timm: ``encoder.safetensors``
(the backbone) and ``whitening.safetensors`` (``whitening_<name>.safetensors`` next to
``encoder_<name>.safetensors``), the eval-mode whitening folded into the ``weight`` ``(d, d)`` and ``bias``
``(d,)`` of an ``nn.Linear(d, d)``. The encoder file's metadata key ``whitening`` names that file and
:func:`load_encoder` applies it::

    feats = lin(model(x))   # lin = nn.Linear(d, d); lin.load_state_dict(load_file("whitening.safetensors"))
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch as st
import torch
from safetensors import safe_open
from torch import nn

import medssl
from medssl.errors import CheckpointError
from medssl.nn.backbones import Encoder, build_backbone
from medssl.transforms.intensity import MEAN, STD


def encoder_filename(name: str, multiple: bool) -> str:
    """``encoder.safetensors`` for a single encoder, ``encoder_<name>.safetensors`` when there are several."""
    return f"encoder_{name}.safetensors" if multiple else "encoder.safetensors"


def whitening_filename(name: str, multiple: bool) -> str:
    """``whitening.safetensors`` / ``whitening_<name>.safetensors``: an encoder's folded whitening layer."""
    return f"whitening_{name}.safetensors" if multiple else "whitening.safetensors"


def _save_whitening(whitening: nn.Module, path: Path, meta: dict[str, str]) -> Path:
    """Write a whitening layer folded into ``nn.Linear(d, d)`` weights (``weight``, ``bias``)."""
    lin = whitening if isinstance(whitening, nn.Linear) else whitening.to_linear()  # type: ignore[operator]
    state = {k: v.detach().float().cpu().contiguous() for k, v in lin.state_dict().items()}
    metadata = {"format": "torch.nn.Linear", "medssl_version": medssl.__version__,
                "applies_to": "pooled backbone features: y = weight @ x + bias", **{k: str(v) for k, v in meta.items()}}
    tmp = path.with_suffix(".tmp")
    st.save_file(state, str(tmp), metadata=metadata)
    from medssl.engine.checkpoint import _default_mode

    os.chmod(tmp, _default_mode())
    tmp.replace(path)
    return path


def save_encoder(module: nn.Module, path: str | Path, meta: dict[str, str]) -> Path:
    """Write ``module``'s state dict (contiguous CPU tensors) with rebuild metadata.

    A :class:`~medssl.nn.whitening.WhitenedBackbone` is written as the backbone plus a separate whitening file
    (see the module docstring); pass ``meta["whitening"]`` to name that file (default
    ``whitening.safetensors`` next to ``path``).
    """
    from medssl.nn.whitening import WhitenedBackbone

    path = Path(path)
    if isinstance(module, WhitenedBackbone):
        wname = meta.get("whitening") or whitening_filename("", False)
        meta = {**meta, "whitening": wname}
        _save_whitening(module.whitening, path.parent / wname,
                        {"encoder_file": path.name, "kind": getattr(module.whitening, "method", "linear")})
        module = module.backbone
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    metadata = {
        "format": "timm",  # the method's meta may name another layout (3D backbones)
        "medssl_version": medssl.__version__,
        "input_range": "[0,1]",
        "normalize": f"(x - {MEAN}) / {STD}",
        **{k: str(v) for k, v in meta.items()},
    }
    tmp = path.with_suffix(".tmp")
    st.save_file(state, str(tmp), metadata=metadata)
    from medssl.engine.checkpoint import _default_mode

    os.chmod(tmp, _default_mode())
    tmp.replace(path)
    return path


def export_encoders(method: nn.Module, out_dir: str | Path) -> list[Path]:
    """Export every encoder of a trained method into ``out_dir``."""
    encs = method.encoders()  # type: ignore[operator]
    metas = method.export_meta()  # type: ignore[operator]
    multiple = len(encs) > 1
    return [
        save_encoder(mod, Path(out_dir) / encoder_filename(name, multiple),
                     {"encoder": name, **metas.get(name, {}), "whitening": whitening_filename(name, multiple)}
                     if _is_whitened(mod) else {"encoder": name, **metas.get(name, {})})
        for name, mod in encs.items()
    ]


def _is_whitened(module: nn.Module) -> bool:
    from medssl.nn.whitening import WhitenedBackbone

    return isinstance(module, WhitenedBackbone)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported encoder file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder file {path}: not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"encoder file {path}: not a readable safetensors file ({e})") from None


def load_encoder(path: str | Path) -> Encoder:
    """Rebuild an exported encoder (with its input normalisation) from its safetensors file.

    Raises:
        CheckpointError: missing file, missing metadata or weights that do not fit the recorded model.
    """
    meta = read_metadata(path)
    for key in ("model_name", "in_chans"):
        if key not in meta:
            raise CheckpointError(f"encoder file {path}: metadata lacks '{key}' (not exported by medssl?)")
    image_size = int(meta["image_size"]) if meta.get("image_size") not in (None, "None") else None
    patch_size = int(meta["patch_size"]) if meta.get("patch_size") not in (None, "None") else None
    global_pool = meta.get("global_pool") if meta.get("global_pool") not in (None, "None") else None
    backbone = build_backbone(
        meta["model_name"],
        in_chans=int(meta["in_chans"]),
        image_size=image_size,
        stem=meta.get("stem", "default"),
        spatial_dims=int(meta.get("spatial_dims", 2)),
        patch_size=patch_size,
        global_pool=global_pool,
    )
    state = st.load_file(str(path))
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"encoder file {path}: weights do not fit {meta['model_name']}: {e}") from None
    if meta.get("whitening"):
        backbone = _load_whitening(Path(path), meta["whitening"], backbone)
    return Encoder(backbone).eval()


def _load_whitening(path: Path, name: str, backbone: nn.Module) -> nn.Module:
    """The backbone followed by the folded whitening layer stored in ``name`` (next to ``path``)."""
    from medssl.nn.whitening import WhitenedBackbone

    wpath = path.parent / name
    if not wpath.is_file():
        raise CheckpointError(f"encoder file {path}: its whitening layer {wpath} is missing (copy it along)")
    state = st.load_file(str(wpath))
    d = int(getattr(backbone, "num_features", 0) or 0)
    lin = nn.Linear(d, d)
    try:
        lin.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"whitening file {wpath}: does not fit a {d}-feature backbone: {e}") from None
    return WhitenedBackbone(backbone, lin)


def random_encoder(
    model_name: str, *, in_chans: int, image_size: int | None, stem: str = "default", spatial_dims: int = 2, seed: int = 0,
    patch_size: int | None = None, global_pool: str | None = None,
) -> Encoder:
    """A randomly initialised encoder (the ``--init random`` baseline), seeded; ``patch_size`` and
    ``global_pool`` for ViTs."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = build_backbone(model_name, in_chans=in_chans, image_size=image_size, stem=stem,
                                  spatial_dims=spatial_dims, patch_size=patch_size, global_pool=global_pool)
    return Encoder(backbone).eval()


IMAGENET_WEIGHTS_ENV = "MEDSSL_IMAGENET_WEIGHTS"
"""Environment variable naming a local ImageNet weights file (timm layout, ``.safetensors`` / ``.pth``)."""


class WeightsUnavailable(CheckpointError):
    """ImageNet weights cannot be had here (no network and not cached); baselines that need them are skipped."""


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
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors", "pytorch_model.bin"]
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

    from medssl.errors import ConfigError
    from medssl.nn.backbones import timm_kwargs

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
