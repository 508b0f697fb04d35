"""Write trained encoders as safetensors in timm's key layout (:mod:`medssl.encoders` loads them back).

``encoder.safetensors`` holds the backbone's ``state_dict`` exactly as ``timm.create_model(name,
num_classes=0, in_chans=C)`` names it, so it loads with a plain ``load_state_dict`` — no key surgery. The
file's metadata records how to rebuild the model (model name, channels, stem, image size, input
normalisation), which :func:`medssl.encoders.load_encoder` uses. Every file is written atomically
(:func:`medssl.fileio.atomic_write`: a reader sees the old file or the new one, never half of one).

An encoder that ends with a whitening layer (Med-MoCo, :class:`medssl.nn.whitening.WhitenedBackbone`) is
written as two files, so the backbone file keeps loading strictly into plain timm: ``encoder.safetensors``
(the backbone) and ``whitening.safetensors`` (``whitening_<name>.safetensors`` next to
``encoder_<name>.safetensors``), the eval-mode whitening folded into the ``weight`` ``(d, d)`` and ``bias``
``(d,)`` of an ``nn.Linear(d, d)``. The encoder file's metadata key ``whitening`` names that file and
:func:`medssl.encoders.load_encoder` applies it::

    feats = lin(model(x))   # lin = nn.Linear(d, d); lin.load_state_dict(load_file("whitening.safetensors"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from torch import nn

import medssl
from medssl.fileio import atomic_write_bytes
from medssl.transforms.intensity import MEAN, STD


def encoder_filename(name: str, multiple: bool) -> str:
    """``encoder.safetensors`` for a single encoder, ``encoder_<name>.safetensors`` when there are several."""
    return f"encoder_{name}.safetensors" if multiple else "encoder.safetensors"


def whitening_filename(name: str, multiple: bool) -> str:
    """``whitening.safetensors`` / ``whitening_<name>.safetensors``: an encoder's folded whitening layer."""
    return f"whitening_{name}.safetensors" if multiple else "whitening.safetensors"


def write_safetensors(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors (made contiguous) and string metadata as a safetensors file, atomically.

    Raises:
        StorageError: the disk refused the write (full, read-only, a parent is a file); nothing is left behind.
    """
    return atomic_write_bytes(path, st.save({k: v.contiguous() for k, v in state.items()}, metadata=metadata))


def _save_whitening(whitening: nn.Module, path: Path, meta: dict[str, str]) -> Path:
    """Write a whitening layer folded into ``nn.Linear(d, d)`` weights (``weight``, ``bias``)."""
    lin = whitening if isinstance(whitening, nn.Linear) else whitening.to_linear()  # type: ignore[operator]
    state = {k: v.detach().float().cpu().contiguous() for k, v in lin.state_dict().items()}
    metadata = {"format": "torch.nn.Linear", "medssl_version": medssl.__version__,
                "applies_to": "pooled backbone features: y = weight @ x + bias", **{k: str(v) for k, v in meta.items()}}
    return write_safetensors(path, state, metadata)


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
    return write_safetensors(path, state, metadata)


def export_encoders(method: nn.Module, out_dir: str | Path, extra: dict[str, str] | None = None) -> list[Path]:
    """Export every encoder of a trained method into ``out_dir``; ``extra`` metadata goes into every file (3D runs:
    the axis order, orientation and spacing the encoder was trained on, :func:`volume_metadata`)."""
    encs = method.encoders()  # type: ignore[operator]
    metas = method.export_meta()  # type: ignore[operator]
    multiple = len(encs) > 1
    extra = dict(extra or {})
    return [
        save_encoder(mod, Path(out_dir) / encoder_filename(name, multiple),
                     {"encoder": name, **extra, **metas.get(name, {}), "whitening": whitening_filename(name, multiple)}
                     if _is_whitened(mod) else {"encoder": name, **extra, **metas.get(name, {})})
        for name, mod in encs.items()
    ]


def volume_metadata(data: Any, spatial_dims: int) -> dict[str, str]:
    """What a 3D encoder file records about its input volumes (nothing for 2D): ``axis_order`` ``SAR`` (arrays are
    ``(D, H, W) = (S, A, R)``), ``orientation`` ``RAS`` (the anatomical frame they were brought to), ``spacing``
    (``z,y,x`` mm or ``native``), ``volume_mode`` and ``volume_patch_size`` (``z,y,x`` crop size; ``patch_size``
    is a ViT's token patch). See docs/volumes.md."""
    if int(spatial_dims) != 3:
        return {}
    from medssl.data.volumes import AXIS_ORDER

    spacing = getattr(data, "spacing", "native")
    patch = getattr(data, "patch_size", None)
    return {"axis_order": AXIS_ORDER, "orientation": "RAS",
            "spacing": "native" if spacing == "native" else ",".join(f"{float(v):g}" for v in spacing),
            "volume_mode": str(getattr(data, "volume_mode", "resize")),
            **({"volume_patch_size": ",".join(str(int(v)) for v in patch)}
               if patch and getattr(data, "volume_mode", "resize") == "patches" else {})}


def _is_whitened(module: nn.Module) -> bool:
    from medssl.nn.whitening import WhitenedBackbone

    return isinstance(module, WhitenedBackbone)
