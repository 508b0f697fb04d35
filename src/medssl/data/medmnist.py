"""``medmnist:NAME[@SIZE]``: a MedMNIST v2 dataset (Yang et al., Scientific Data 2023) by name.

The file is looked up as ``NAME.npz`` (size 28) or ``NAME_SIZE.npz`` (64, 128, 224; 3D sets: 28, 64) in
``$MEDSSL_MEDMNIST_DIR``, else ``$MEDMNIST_ROOT``, else ``~/.medmnist`` — the folder and names the
``medmnist`` package itself uses, so files it downloaded before are found. When the file is missing,
medssl asks the ``medmnist`` package (``pip install medmnist``) to download it; without that package or
without a network the error says so and how to go on (``npz:PATH`` with a file copied by hand).
"""

from __future__ import annotations

import os
from pathlib import Path

from medssl.errors import DataError

from .npz import NpzDataset

SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)


def medmnist_dir() -> Path:
    for var in ("MEDSSL_MEDMNIST_DIR", "MEDMNIST_ROOT"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    return Path.home() / ".medmnist"


def medmnist_file(name: str, size: int) -> str:
    """The file name the medmnist package uses for ``name`` at ``size``."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _download(name: str, size: int, root: Path) -> None:
    try:
        import medmnist
    except ImportError as exc:
        raise DataError(
            f"medmnist:{name}@{size}: {root / medmnist_file(name, size)} not found and the medmnist package is not "
            "installed to download it (pip install medmnist); or download the .npz yourself and pass npz:PATH"
        ) from exc
    info = medmnist.INFO.get(name)
    if info is None:
        raise DataError(f"medmnist: unknown dataset {name!r}; known: {', '.join(sorted(medmnist.INFO))}")
    cls = getattr(medmnist, info["python_class"])
    root.mkdir(parents=True, exist_ok=True)
    try:
        cls(split="train", download=True, root=str(root), size=size)
    except Exception as exc:  # no network, server down, bad size
        raise DataError(
            f"medmnist:{name}@{size}: download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"No network? Copy {medmnist_file(name, size)} into {root} or pass npz:PATH"
        ) from exc


def open_medmnist(spec: str, arg: str | None, image_size: int | None, task: str | None) -> NpzDataset:
    """Open ``medmnist:NAME[@SIZE]`` (see the module docstring)."""
    if not arg:
        raise DataError(f"bad data spec {spec!r}: medmnist:NAME[@SIZE], e.g. medmnist:pneumoniamnist@64")
    name, _, size_text = arg.partition("@")
    name = name.strip().lower()
    try:
        size = int(size_text) if size_text else 28
    except ValueError:
        size = -1
    allowed = SIZES_3D if name.endswith("3d") else SIZES_2D
    if size not in allowed:
        raise DataError(f"bad data spec {spec!r}: SIZE must be one of {', '.join(map(str, allowed))} for {name}")
    root = medmnist_dir()
    path = root / medmnist_file(name, size)
    if not path.is_file():
        _download(name, size, root)
        if not path.is_file():
            raise DataError(f"medmnist:{name}@{size}: the download did not produce {path}")
    return NpzDataset(path, image_size=image_size, task=task, name=spec)
