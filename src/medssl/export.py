"""Export trained encoders as safetensors in timm's key layout, and load them back.

``encoder.safetensors`` holds the backbone's ``state_dict`` exactly as ``timm.create_model(name,
num_classes=0, in_chans=C)`` names it, so it loads with a plain ``load_state_dict`` — no key surgery. The
file's metadata records how to rebuild the model (model name, channels, stem, image size, input
normalisation), which :func:`load_encoder` uses.
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


def save_encoder(module: nn.Module, path: str | Path, meta: dict[str, str]) -> Path:
    """Write ``module``'s state dict (contiguous CPU tensors) with rebuild metadata."""
    path = Path(path)
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
        save_encoder(mod, Path(out_dir) / encoder_filename(name, multiple), {"encoder": name, **metas.get(name, {})})
        for name, mod in encs.items()
    ]


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
    backbone = build_backbone(
        meta["model_name"],
        in_chans=int(meta["in_chans"]),
        image_size=image_size,
        stem=meta.get("stem", "default"),
        spatial_dims=int(meta.get("spatial_dims", 2)),
    )
    state = st.load_file(str(path))
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"encoder file {path}: weights do not fit {meta['model_name']}: {e}") from None
    return Encoder(backbone).eval()


def random_encoder(
    model_name: str, *, in_chans: int, image_size: int | None, stem: str = "default", spatial_dims: int = 2, seed: int = 0
) -> Encoder:
    """A randomly initialised encoder (the ``--init random`` baseline), seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = build_backbone(model_name, in_chans=in_chans, image_size=image_size, stem=stem, spatial_dims=spatial_dims)
    return Encoder(backbone).eval()
