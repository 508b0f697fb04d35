"""A folder of 2D images (PNG, JPEG, TIFF, BMP) as a dataset.

* Files are found recursively (hidden files and folders are skipped). Symlinked folders that stay inside
  ``DIR`` are followed; those that lead out of it are skipped with a warning unless ``follow_symlinks``
  (``data.follow_symlinks``) — a symlink to ``/`` would otherwise walk the whole file system. Every real
  folder is walked once, so a symlink cycle ends. File symlinks are read wherever they point.
* If ``DIR`` has sub-folders containing images, the class of an image is the name of the top-level
  sub-folder it lies under (class names sorted); images directly in ``DIR`` are then an error. Otherwise
  the dataset is unlabelled.
* 8-bit (``L``) and 16-bit (``I;16``, ``I``) grayscale are scaled to ``[0, 1]`` by their bit depth (``I``
  is taken as 16-bit and clipped); bilevel and gray+alpha images are read as 8-bit gray. RGB (and
  palette, RGBA, CMYK, YCbCr) images are RGB. If any image is RGB, all are read as RGB (gray repeated
  three times); this is decided from the file headers, without decoding pixels. A file whose header cannot
  be read (empty, not an image, a decompression bomb) does not stop the opening: it is recorded in
  ``open_errors`` and fails when its item is read, so ``--skip-bad`` can skip it (see
  :meth:`~medssl.data.base.ImageDataset.check_open_errors`).
* Every image is zero-padded to a centred square and then resized (bilinear, antialiased) to
  ``image_size`` (224 by default): the aspect ratio is preserved, so lesion shapes are not distorted.
  EXIF orientation is applied; multi-page TIFFs contribute their first page.
* The patient id is the file stem; splits are patient-level (70/10/20 by patient, seeded).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageOps

from medssl.errors import DataError

from .base import ImageDataset, resize_image
from .readers import constant_value, note_constant, open_pil
from .splits import assign_patient_splits

log = logging.getLogger("medssl")

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
FOLDER_DEFAULT_SIZE = 224
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_RGB_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _scan(root: Path, follow_symlinks: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """All image files under ``root`` (sorted, hidden entries skipped) and the directory symlinks not followed.

    A symlinked directory is followed when its target lies inside ``root`` (or always, with
    ``follow_symlinks``); each real directory is walked once, so symlink cycles terminate.

    Returns:
        ``(files, skipped)``: image paths (under ``root``, as walked) and ``(link, target)`` of every
        directory symlink left out because it leads out of ``root``.
    """
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    top = os.path.realpath(root)
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            if os.path.islink(full) and not follow_symlinks:
                target = os.path.realpath(full)
                if not _inside(target, top):
                    skipped.append((full, target))
                    continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / f)
    return found, skipped


def _header_mode(path: Path) -> str:
    """The PIL mode of ``path`` from its header (no pixel decoding).

    Raises:
        DataError: the header cannot be read (empty file, not an image, a decompression bomb) or the mode is
            not one medssl reads.
    """
    try:
        with open_pil(path) as img:
            mode = img.mode
            size = img.size
    except DataError:
        raise
    except Exception as exc:  # Pillow raises many types for odd headers
        raise DataError(f"{path}: cannot read the image header ({type(exc).__name__}: {exc})") from exc
    if mode not in _GRAY_MODES and mode not in _RGB_MODES:
        raise DataError(
            f"{path}: unsupported image mode {mode!r}; supported: 8/16-bit grayscale and RGB images"
        )
    if min(size) < 1:
        raise DataError(f"{path}: empty image ({size[0]}x{size[1]} pixels)")
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
        with open_pil(path) as img, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img)
            mode = img.mode
            scale = 255.0
            if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                scale = 65535.0
                array = np.asarray(img).astype(np.float32)
                array = np.clip(array / scale, 0.0, 1.0)
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
    if array.size == 0:
        raise DataError(f"{path}: empty image (shape {array.shape})")
    value = constant_value(array)
    if value is not None:  # kept (harmless to train on) but worth a line in the run log
        note_constant(str(path), round(value * scale))
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
        follow_symlinks: Follow symlinked directories that lead out of ``root`` (see the module docstring).

    Attributes:
        skipped_links: ``(link, target)`` of the directory symlinks that were not followed.

    Raises:
        DataError: If the directory is missing or holds no images, no image header can be read, the layout
            mixes loose images with class folders, or an unknown task is asked for. Single unreadable
            headers go to :attr:`open_errors` instead.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | None = None,
        task: str | None = None,
        seed: int = 0,
        name: str | None = None,
        follow_symlinks: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"folder not found: {self.root}")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory (folder: expects a directory of images)")
        files, self.skipped_links = _scan(self.root, follow_symlinks)
        if self.skipped_links:
            link, target = self.skipped_links[0]
            log.warning("%s: not following %d symlinked folder(s) that lead out of it (first: %s -> %s); set "
                        "data.follow_symlinks=true to read them", self.root, len(self.skipped_links), link, target)
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
        modes: list[str | None] = []
        open_errors: dict[int, str] = {}
        for i, p in enumerate(files):
            try:
                modes.append(_header_mode(p))
            except DataError as exc:  # kept, and raised when the item is read: --skip-bad can drop it
                modes.append(None)
                open_errors[i] = str(exc)
        if len(open_errors) == len(files):
            raise DataError(f"{self.root}: none of its {len(files)} image(s) can be read "
                            f"(first: {open_errors[0]})")
        self.open_errors = open_errors
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
