"""Data spec strings: one string names a dataset on the command line and in recipes.

>>> ds = open_dataset("phantom2d:200", image_size=32)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import DataError

from .base import ImageDataset
from .folder import FolderDataset
from .npz import NpzDataset
from .phantoms import PHANTOM2D_DEFAULT_N, PHANTOM3D_DEFAULT_N, PhantomDataset

SPEC_HELP: str = (
    "Data spec: 'phantom2d[:N]' (built-in synthetic mammography-like 64x64 patches, default N="
    f"{PHANTOM2D_DEFAULT_N}; tasks margin (4 classes, default) and pathology; lesion masks), "
    f"'phantom3d[:N]' (built-in synthetic 32^3 gland volumes, default N={PHANTOM3D_DEFAULT_N}; task lesion; "
    "lesion masks), 'npz:PATH' (MedMNIST-layout .npz with train/val/test _images and _labels), or "
    "'folder:DIR' (PNG/JPEG/TIFF/BMP images found recursively; class = top-level sub-folder name if "
    "there are sub-folders, else unlabelled; padded to square and resized to 224 unless --image-size "
    "is given), 'csv:FILE.csv' (manifest: 'path' relative to the CSV, optional 'label' or 'label:<name>' "
    "0/1 columns, 'patient_id', 'split'; PNG/JPEG/TIFF, DICOM, NIfTI, MHA/NRRD; 2D resized to 224, 3D to "
    "64 by default), 'volumes:FILE.csv' (the same for 3D files only), 'isic2017:ROOT' (ISIC 2017 "
    "release folders; tasks melanoma (default) and seborrheic_keratosis; lesion masks), 'cbis-ddsm:ROOT[@roi]' "
    "(CBIS-DDSM TCIA tree + case CSVs; full mammograms or @roi lesion crops; tasks pathology (default), "
    "pathology4, mass_margins (multi-label)), or 'medmnist:NAME[@SIZE]' (MedMNIST v2 by name, from ~/.medmnist "
    "or downloaded by the medmnist package). Splits are patient-level 70/10/20 unless the source defines them (npz keys). The "
    "phantoms are synthetic test data, not a substitute for real images."
)

_VALID = ("phantom2d[:N], phantom3d[:N], npz:PATH, medmnist:NAME[@SIZE], folder:DIR, csv:FILE.csv, volumes:FILE.csv, "
          "isic2017:ROOT, cbis-ddsm:ROOT[@roi]")


def _parse_count(spec: str, text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1 or not text.strip().isdigit():
        raise DataError(
            f"bad data spec {spec!r}: N must be a positive integer, got {text!r} (valid: {_VALID})"
        )
    return n


def _is_positive_int(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return bool(np.isfinite(value)) and int(value) == value and value >= 1


def _open_phantom(kind: str) -> Callable[[str, str | None, int | None, str | None, int], ImageDataset]:
    def opener(
        spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int
    ) -> ImageDataset:
        n = None if arg is None else _parse_count(spec, arg)
        return PhantomDataset(kind, n=n, image_size=image_size, task=task, seed=seed, name=spec)

    return opener


def _require_arg(spec: str, arg: str | None, what: str) -> Path:
    if not arg:
        raise DataError(f"bad data spec {spec!r}: {what} is missing (valid: {_VALID})")
    return Path(arg).expanduser()


def _open_npz(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int
) -> ImageDataset:
    return NpzDataset(_require_arg(spec, arg, "PATH"), image_size=image_size, task=task, name=spec)


def _open_folder(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int, follow_symlinks: bool = False
) -> ImageDataset:
    return FolderDataset(
        _require_arg(spec, arg, "DIR"), image_size=image_size, task=task, seed=seed, name=spec,
        follow_symlinks=follow_symlinks,
    )


def _open_manifest(require_3d: bool) -> Callable[..., ImageDataset]:
    def opener(
        spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int, intensity: Any = None
    ) -> ImageDataset:
        from .manifest import CsvDataset

        return CsvDataset(
            _require_arg(spec, arg, "FILE.csv"), image_size=image_size, task=task, seed=seed, name=spec,
            require_3d=require_3d, intensity=intensity,
        )

    return opener


def _open_isic2017(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int
) -> ImageDataset:
    from .isic import Isic2017Dataset

    return Isic2017Dataset(_require_arg(spec, arg, "ROOT"), image_size=image_size, task=task, name=spec)


def _open_cbis(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int, intensity: Any = None
) -> ImageDataset:
    from .cbis import CbisDdsmDataset

    root = str(_require_arg(spec, arg, "ROOT"))
    view = "full"
    if "@" in root:
        root, view = root.rsplit("@", 1)
    return CbisDdsmDataset(root, view=view, image_size=image_size, task=task, seed=seed, intensity=intensity,
                           name=spec)


def _open_medmnist(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int
) -> ImageDataset:
    from .medmnist import open_medmnist

    return open_medmnist(spec, arg, image_size, task)


_TAKES_INTENSITY = {"csv", "volumes", "cbis-ddsm"}
_OPENERS: dict[str, Callable[..., ImageDataset]] = {
    "phantom2d": _open_phantom("phantom2d"),
    "phantom3d": _open_phantom("phantom3d"),
    "npz": _open_npz,
    "folder": _open_folder,
    "csv": _open_manifest(require_3d=False),
    "volumes": _open_manifest(require_3d=True),
    "isic2017": _open_isic2017,
    "cbis-ddsm": _open_cbis,
    "medmnist": _open_medmnist,
}


def open_dataset(
    spec: str, image_size: int | None = None, task: str | None = None, seed: int = 0, intensity: Any = None,
    follow_symlinks: bool = False,
) -> ImageDataset:
    """Opens the dataset a spec string names.

    Args:
        spec: ``"phantom2d"``, ``"phantom2d:N"``, ``"phantom3d"``, ``"phantom3d:N"``, ``"npz:PATH"``,
            ``"folder:DIR"``, ``"csv:FILE.csv"``, ``"volumes:FILE.csv"`` or ``"isic2017:ROOT"`` (see
            :data:`SPEC_HELP`).
        image_size: Side length of the items; ``None`` for the dataset's native size (phantom2d 64,
            phantom3d 32, npz its stored size, folder, csv and isic2017 224,
            volumes 64). Phantoms are rendered at that size, files
            are resized.
        task: Labelling task for datasets with several (``None``: the default task).
        seed: Seed of the phantom generator and of patient-level splits (npz splits come from the file).
        intensity: :class:`~medssl.data.readers.IntensityConfig` for datasets read from DICOM / NIfTI / MHA
            files (``csv:``, ``volumes:``, ``cbis-ddsm:``); ``None`` = ``auto``.
        follow_symlinks: ``folder:`` follows symlinked directories leading out of its root.

    Returns:
        The dataset, with ``name == spec``.

    Raises:
        DataError: For an unknown prefix, a bad ``N``, a missing path, an unknown task or invalid data,
            with a message listing what is valid.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; valid: {_VALID}")
    spec = spec.strip()
    if image_size is not None and not _is_positive_int(image_size):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    prefix, sep, arg = spec.partition(":")
    prefix = prefix.lower()
    if prefix not in _OPENERS:
        raise DataError(f"unknown data spec {spec!r}; valid: {_VALID}")
    opener = _OPENERS[prefix]
    args = (spec, arg if sep else None, None if image_size is None else int(image_size), task, int(seed))
    if prefix in _TAKES_INTENSITY:
        return opener(*args, intensity=intensity)
    if prefix == "folder":
        return opener(*args, follow_symlinks=follow_symlinks)
    return opener(*args)


def open_from_config(data: Any, *, cache: bool | None = None) -> ImageDataset:
    """Open the dataset of a config's ``data`` section with all its settings.

    Applies, in order: the spec with ``image_size``, ``task`` and ``intensity``; the split manifest
    ``splits`` (``--splits FILE``); the item cache (``cache``, ``cache_dir``) for file-backed datasets.
    ``skip_bad`` is left to the caller, which decides where the list of skipped files goes; without it, files
    found unreadable while opening raise here (:meth:`~medssl.data.base.ImageDataset.check_open_errors`).

    Args:
        data: a :class:`~medssl.config.DataConfig`.
        cache: override ``data.cache``.
    """
    from .cache import default_cache_dir
    from .splits import apply_split_manifest

    ds = open_dataset(data.spec, image_size=data.image_size, task=data.task, intensity=data.intensity,
                      follow_symlinks=data.follow_symlinks)
    if not data.skip_bad:
        ds.check_open_errors()
    if data.splits:
        apply_split_manifest(ds, data.splits)
    use_cache = data.cache if cache is None else cache
    if use_cache:
        ds.enable_cache(Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir())
    return ds
