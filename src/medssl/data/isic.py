"""ISIC 2017 (skin lesion) in the layout of the public release.

``ROOT`` holds, for each part ``P`` in ``Training`` (-> split ``train``), ``Validation`` (-> ``val``) and
``Test_v2`` (-> ``test``):

* ``ISIC-2017_P_Data/ISIC_XXXXXXX.jpg`` -- the dermoscopy images (RGB). The ``ISIC_XXXXXXX_superpixels.png``
  files beside them are ignored;
* ``ISIC-2017_P_Part3_GroundTruth.csv`` -- ``image_id, melanoma, seborrheic_keratosis`` (0/1, also
  accepted as ``0.0``/``1.0``); the CSV lists the items;
* ``ISIC-2017_P_Part1_GroundTruth/ISIC_XXXXXXX_segmentation.png`` -- lesion masks (optional as a whole:
  when no part has this folder the dataset has no masks; when some part has it, every part needs it).

Tasks: ``melanoma`` (default; classes ``other``, ``melanoma``) and ``seborrheic_keratosis`` (``other``,
``seborrheic_keratosis``). The release has no patient ids, so the image id stands in. Images and masks are
zero-padded to a centred square and resized to ``image_size`` (224 by default; masks with nearest
neighbour) so the lesion's aspect ratio is kept.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medssl.errors import DataError

from .base import ImageDataset, resize_image
from .folder import pad_to_square, read_image

ISIC2017_PARTS: tuple[tuple[str, str], ...] = (
    ("Training", "train"),
    ("Validation", "val"),
    ("Test_v2", "test"),
)
ISIC2017_TASKS: tuple[str, str] = ("melanoma", "seborrheic_keratosis")
ISIC_DEFAULT_SIZE = 224
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _flag(value: str, csv_path: Path, line: int, column: str) -> int:
    try:
        f = float(value)
    except ValueError:
        f = -1.0
    if f not in (0.0, 1.0):
        raise DataError(f"{csv_path}: line {line}: {column} = {value!r}, expected 0 or 1")
    return int(f)


def _read_ground_truth(csv_path: Path) -> list[tuple[str, int, int]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("image_id", *ISIC2017_TASKS) if c not in header]
            if missing:
                raise DataError(
                    f"{csv_path}: missing column(s) {', '.join(missing)} (has: {', '.join(header) or 'none'})"
                )
            out = []
            for line, row in enumerate(reader, start=2):
                r = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str)}
                if not any(r.values()):
                    continue
                if not r.get("image_id"):
                    raise DataError(f"{csv_path}: line {line}: empty image_id")
                out.append((r["image_id"], *(_flag(r.get(c, ""), csv_path, line, c) for c in ISIC2017_TASKS)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {csv_path}: {exc}") from exc
    if not out:
        raise DataError(f"{csv_path}: no images listed")
    return out  # type: ignore[return-value]


class Isic2017Dataset(ImageDataset):
    """ISIC 2017 from its release folders (see the module docstring).

    Args:
        root: Folder holding the ``ISIC-2017_*`` folders and CSVs.
        image_size: Side length of the items (default 224).
        task: ``"melanoma"`` (default) or ``"seborrheic_keratosis"``.
        name: Spec string to record (defaults to ``isic2017:ROOT``).

    Raises:
        DataError: If ``root``, a ``_Data`` folder, a ``Part3`` CSV, a listed image or a mask is missing, a
            label is not 0/1, or the task is unknown.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | None = None,
        task: str | None = None,
        name: str | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"ISIC 2017 root not found or not a directory: {self.root}")
        chosen = task or ISIC2017_TASKS[0]
        if chosen not in ISIC2017_TASKS:
            raise DataError(f"isic2017: no task {task!r}; valid tasks: {', '.join(ISIC2017_TASKS)}")
        mask_dirs = {p: self.root / f"ISIC-2017_{p}_Part1_GroundTruth" for p, _ in ISIC2017_PARTS}
        has_masks = any(d.is_dir() for d in mask_dirs.values())
        files: list[Path] = []
        masks: list[Path] = []
        splits: list[str] = []
        ids: list[str] = []
        flags: list[tuple[int, int]] = []
        for part, split in ISIC2017_PARTS:
            data_dir = self.root / f"ISIC-2017_{part}_Data"
            gt_csv = self.root / f"ISIC-2017_{part}_Part3_GroundTruth.csv"
            if not data_dir.is_dir():
                raise DataError(f"isic2017: missing folder {data_dir}")
            if not gt_csv.is_file():
                raise DataError(f"isic2017: missing ground-truth CSV {gt_csv}")
            if has_masks and not mask_dirs[part].is_dir():
                raise DataError(
                    f"isic2017: missing mask folder {mask_dirs[part]} (other parts have Part1 masks)"
                )
            for image_id, mel, sk in _read_ground_truth(gt_csv):
                image = next(
                    (
                        data_dir / f"{image_id}{e}"
                        for e in _IMAGE_EXTS
                        if (data_dir / f"{image_id}{e}").is_file()
                    ),
                    None,
                )
                if image is None:
                    raise DataError(
                        f"isic2017: {gt_csv.name} lists {image_id}, but {data_dir / image_id}.jpg is missing"
                    )
                if has_masks:
                    mask = mask_dirs[part] / f"{image_id}_segmentation.png"
                    if not mask.is_file():
                        raise DataError(f"isic2017: mask {mask} is missing")
                    masks.append(mask)
                files.append(image)
                splits.append(split)
                ids.append(image_id)
                flags.append((mel, sk))
        self.files = files
        self.mask_files = masks
        col = ISIC2017_TASKS.index(chosen)
        labels = np.array([f[col] for f in flags], dtype=np.int64)
        size = ISIC_DEFAULT_SIZE if image_size is None else int(image_size)
        self._set_metadata(
            name=name or f"isic2017:{self.root}",
            spatial_dims=2,
            in_chans=3,
            image_size=size,
            labels=labels,
            class_names=["other", chosen],
            multilabel=False,
            patient_ids=np.array(ids),
            splits=np.array(splits),
            sources=[str(p) for p in files],
            task=chosen,
            tasks=ISIC2017_TASKS,
            has_masks=has_masks,
        )

    def item_files(self, index: int) -> list[str]:
        """The files item ``index`` is read from (image, then mask where present)."""
        out = [str(self.files[index])]
        if self.has_masks:
            out.append(str(self.mask_files[index]))
        return out

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = read_image(self.files[index], rgb=True)
        out = resize_image(pad_to_square(image), self.image_size).contiguous()
        if not self.has_masks:
            return out, None
        path = self.mask_files[index]
        try:
            with Image.open(path) as img:
                m = np.asarray(img.convert("L")) > 127
        except Exception as exc:
            raise DataError(f"cannot decode mask {path}: {type(exc).__name__}: {exc}") from exc
        if m.shape != tuple(image.shape[1:]):
            raise DataError(
                f"{path}: mask is {m.shape[1]}x{m.shape[0]}, its image {image.shape[2]}x{image.shape[1]}"
            )
        mt = pad_to_square(torch.from_numpy(m.astype(np.float32))[None])
        mt = F.interpolate(mt[None], size=(self.image_size, self.image_size), mode="nearest")[0, 0]
        return out, mt.to(torch.int64)
