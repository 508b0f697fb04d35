"""A folder of 2D images (PNG, JPEG, TIFF, BMP) as a dataset.

* Files are found recursively (hidden files and folders are skipped; symlinked folders are followed).
* If ``DIR`` has sub-folders containing images, the class of an image is the name of the top-level
  sub-folder it lies under (class names sorted); images directly in ``DIR`` are then an error. Otherwise
  the dataset is unlabelled.
* 8-bit (``L``) and 16-bit (``I;16``, ``I``) grayscale are scaled to ``[0, 1]`` by their bit depth (``I``
  is taken as 16-bit and clipped); bilevel and gray+alpha images are read as 8-bit gray. RGB (and
  palette, RGBA, CMYK, YCbCr) images are RGB. If any image is RGB, all are read as RGB (gray repeated
  three times); this is decided from the file headers, without decoding pixels.
* Every image is zero-padded to a centred square and then resized (bilinear, antialiased) to
  ``image_size`` (224 by default): the aspect ratio is preserved, so lesion shapes are not distorted.
  EXIF orientation is applied; multi-page TIFFs contribute their first page.
* The patient id is the file stem; splits are patient-level (70/10/20 by patient, seeded).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from medssl.errors import DataError

from .base import ImageDataset, resize_image
from .splits import assign_patient_splits

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
FOLDER_DEFAULT_SIZE = 224
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_RGB_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _scan(root: Path) -> list[Path]:
    """All image files under ``root`` (sorted, hidden entries skipped, symlink loops avoided)."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / f)
    return found


def _header_mode(path: Path) -> str:
    """The PIL mode of ``path`` from its header (no pixel decoding)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if mode not in _GRAY_MODES and mode not in _RGB_MODES:
        raise DataError(
            f"{path}: unsupported image mode {mode!r}; supported: 8/16-bit grayscale and RGB images"
        )
    return mode


def read_image(path: str | Path, rgb: bool) -> torch.Tensor:
    """Decodes one image file to a float32 tensor in ``[0, 1]``.

    Args:
        path: Image file.
        rgb: Return 3 channels (gray images repeated) instead of 1.

    Returns:
        ``(C, H, W)`` float32 tensor, ``C`` = 3 if ``rgb`` else 1.

    Raises:
        DataError: If the file cannot be decoded (unreadable, truncated) or has an unsupported mode.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                array = np.asarray(img).astype(np.float32)
                array = np.clip(array / 65535.0, 0.0, 1.0)
            elif mode in _GRAY_MODES:
                array = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            elif mode in _RGB_MODES:
                array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            else:
                raise DataError(f"{path}: unsupported image mode {mode!r}")
    except DataError:
        raise
    except Exception as exc:  # truncated / corrupt data surfaces here as OSError, SyntaxError, ...
        raise DataError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if rgb and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif not rgb and tensor.shape[0] == 3:  # header said gray but decoded colour: never expected
        raise DataError(f"{path}: decoded as RGB although its header says grayscale")
    return tensor.contiguous()


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """Zero-pads a ``(C, H, W)`` image to a centred ``(C, M, M)`` square, ``M = max(H, W)``."""
    h, w = image.shape[-2:]
    m = max(h, w)
    top, left = (m - h) // 2, (m - w) // 2
    return F.pad(image, (left, m - w - left, top, m - h - top))


class FolderDataset(ImageDataset):
    """Images under a directory (see the module docstring for the rules).

    Args:
        root: The directory.
        image_size: Side length of the items (default 224).
        task: ``"label"`` (class from sub-folders) or ``None``.
        seed: Seed of the patient-level split.
        name: Spec string to record (defaults to ``folder:ROOT``).

    Raises:
        DataError: If the directory is missing or holds no images, an image header cannot be read, the
            layout mixes loose images with class folders, or an unknown task is asked for.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | None = None,
        task: str | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"folder not found: {self.root}")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory (folder: expects a directory of images)")
        files = _scan(self.root)
        if not files:
            raise DataError(
                f"{self.root}: no images found (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        rel_parts = [p.relative_to(self.root).parts for p in files]
        loose = [p for p, parts in zip(files, rel_parts, strict=True) if len(parts) == 1]
        labelled = len(loose) < len(files)
        if labelled and loose:
            raise DataError(
                f"{self.root}: {len(loose)} image(s) lie directly in the folder (e.g. {loose[0].name}) while "
                "sub-folders hold classes; move them into a class sub-folder or point folder: at a "
                "directory with only one layout"
            )
        labels: np.ndarray | None = None
        class_names: list[str] = []
        if labelled:
            top = [parts[0] for parts in rel_parts]
            class_names = sorted(set(top))
            lookup = {c: i for i, c in enumerate(class_names)}
            labels = np.array([lookup[t] for t in top], dtype=np.int64)
        if task is not None and (not labelled or task != "label"):
            valid = "label" if labelled else "none (no class sub-folders, the folder is unlabelled)"
            raise DataError(f"{self.root}: no task {task!r}; valid tasks: {valid}")
        modes = [_header_mode(p) for p in files]
        self._rgb = any(m in _RGB_MODES for m in modes)
        self._files = files
        size = FOLDER_DEFAULT_SIZE if image_size is None else int(image_size)
        if size < 1:
            raise DataError(f"{self.root}: image_size must be a positive integer, got {image_size!r}")
        patient_ids = np.array([p.stem for p in files])
        self._set_metadata(
            name=name or f"folder:{self.root}",
            spatial_dims=2,
            in_chans=3 if self._rgb else 1,
            image_size=size,
            labels=labels,
            class_names=class_names,
            multilabel=False,
            patient_ids=patient_ids,
            splits=assign_patient_splits(patient_ids, seed=seed),
            sources=[str(p) for p in files],
            task="label" if labelled else None,
            tasks=("label",) if labelled else (),
            has_masks=False,
        )

    def item_files(self, index: int) -> list[str]:
        """The file item ``index`` is read from (inspect, cache keys)."""
        return [str(self._files[index])]

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = read_image(self._files[index], rgb=self._rgb)
        return resize_image(pad_to_square(image), self.image_size).contiguous(), None
