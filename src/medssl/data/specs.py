"""Data spec strings: one string names a dataset on the command line and in recipes.

>>> ds = open_dataset("phantom2d:200", image_size=32)   # doctest: +SKIP

A spec is ``PREFIX`` or ``PREFIX:ARG``; each prefix is an opener registered with :func:`register_spec`, which also
carries its syntax and help. The command line's ``--data`` help (:func:`spec_help`) and the list of valid specs in
every error (:func:`valid_specs`) are generated from the registry: adding a dataset is one registered opener.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import DataError

from .base import ImageDataset
from .folder import FolderDataset
from .npz import NpzDataset
from .phantoms import PHANTOM2D_DEFAULT_N, PHANTOM3D_DEFAULT_N, PhantomDataset


@dataclass(frozen=True)
class SpecEntry:
    """A registered data spec prefix.

    Attributes:
        name: the prefix (``npz`` in ``npz:PATH``).
        opener: ``opener(spec, arg, image_size, task, seed[, intensity=...]) -> ImageDataset``; ``arg`` is the text
            after the first ``:`` (``None`` without one).
        syntax: how the spec is written (``npz:PATH``), listed in errors and in the help.
        help: what it opens, for the command line's ``--data`` help.
        options: the ``data:`` settings the opener takes as keywords besides the five positional arguments, e.g.
            ``intensity`` (an :class:`~medssl.data.readers.IntensityConfig`: files whose values need windowing,
            such as DICOM / NIfTI / MHA) or ``follow_symlinks`` (``folder:``).
    """

    name: str
    opener: Callable[..., ImageDataset]
    syntax: str
    help: str
    options: tuple[str, ...] = ()

    @property
    def takes_intensity(self) -> bool:
        """The opener takes ``intensity=``."""
        return "intensity" in self.options


SPECS: dict[str, SpecEntry] = {}
"""Every registered data spec by prefix, in registration order (:func:`register_spec`)."""

SPEC_NOTES = ("Splits are patient-level 70/10/20 unless the source defines them (npz keys). The phantoms are "
              "synthetic test data, not a substitute for real images.")


Opener = Callable[..., ImageDataset]


def register_spec(name: str, *, help: str, syntax: str | None = None, takes_intensity: bool = False,
                  options: tuple[str, ...] = ()) -> Callable[[Opener], Opener]:
    """Decorator registering an opener for the data spec prefix ``name`` (see :class:`SpecEntry`).

    ``takes_intensity=True`` is short for ``"intensity"`` in ``options``.

    The ``--data`` help (:func:`spec_help`) and the list of valid specs in every error are generated from the
    registered entries, so a new dataset is one registered opener.

    Raises:
        DataError: ``name`` is already registered or is not a lower-case prefix without ``:``.
    """
    if name != name.lower() or ":" in name or not name:
        raise DataError(f"data spec prefix {name!r}: must be non-empty, lower case and without ':'")

    def decorator(opener: Opener) -> Opener:
        if name in SPECS:
            raise DataError(f"data spec {name!r} is already registered")
        keywords = (("intensity",) if takes_intensity else ()) + tuple(options)
        SPECS[name] = SpecEntry(name, opener, syntax or f"{name}:PATH", help, tuple(dict.fromkeys(keywords)))
        return opener

    return decorator


def valid_specs() -> str:
    """How every registered spec is written, comma-separated (``phantom2d[:N], npz:PATH, ...``)."""
    return ", ".join(e.syntax for e in SPECS.values())


def spec_help() -> str:
    """The ``--data`` help: every registered spec with what it opens, then the notes on splits and phantoms."""
    return ("Data spec: " + ", ".join(f"'{e.syntax}' ({e.help})" for e in SPECS.values()) + ". " + SPEC_NOTES)


def _parse_count(spec: str, text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1 or not text.strip().isdigit():
        raise DataError(
            f"bad data spec {spec!r}: N must be a positive integer, got {text!r} (valid: {valid_specs()})"
        )
    return n


def _is_positive_int(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return bool(np.isfinite(value)) and int(value) == value and value >= 1


@dataclass(frozen=True)
class VolumeOptions:
    """How 3D volumes are read (``data.spacing`` / ``data.volume_mode``), for openers with the ``volume`` option.

    Attributes:
        spacing: ``(z, y, x)`` mm every file volume is resampled to; ``None`` = native.
        native_size: keep volumes at their own (resampled) size, for sub-volume sampling; else resize them to
            the ``image_size`` cube. Phantoms are then rendered at their native size, whatever ``image_size``.
    """

    spacing: tuple[float, float, float] | None = None
    native_size: bool = False


def _open_phantom(kind: str) -> Callable[..., ImageDataset]:
    def opener(
        spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int,
        volume: VolumeOptions | None = None,
    ) -> ImageDataset:
        n = None if arg is None else _parse_count(spec, arg)
        if volume is not None and volume.native_size and kind == "phantom3d":
            image_size = None  # crops are cut from the volume at its native size
        return PhantomDataset(kind, n=n, image_size=image_size, task=task, seed=seed, name=spec)

    return opener


register_spec("phantom2d", syntax="phantom2d[:N]", help=(
    f"built-in synthetic mammography-like 64x64 patches, default N={PHANTOM2D_DEFAULT_N}; tasks margin "
    "(4 classes, default) and pathology; lesion masks"))(_open_phantom("phantom2d"))
register_spec("phantom3d", syntax="phantom3d[:N]", options=("volume",), help=(
    f"built-in synthetic 32^3 gland volumes, default N={PHANTOM3D_DEFAULT_N}; task lesion; lesion masks"))(
    _open_phantom("phantom3d"))


def _require_arg(spec: str, arg: str | None, what: str) -> Path:
    if not arg:
        raise DataError(f"bad data spec {spec!r}: {what} is missing (valid: {valid_specs()})")
    return Path(arg).expanduser()


@register_spec("npz", syntax="npz:PATH",
               help="MedMNIST-layout .npz with train/val/test _images and _labels")
def _open_npz(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int
) -> ImageDataset:
    return NpzDataset(_require_arg(spec, arg, "PATH"), image_size=image_size, task=task, name=spec)


@register_spec("folder", syntax="folder:DIR", options=("follow_symlinks",), help=(
    "PNG/JPEG/TIFF/BMP images found recursively; class = top-level sub-folder name if there are sub-folders, "
    "else unlabelled; padded to square and resized to 224 unless --image-size is given"))
def _open_folder(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int, follow_symlinks: bool = False
) -> ImageDataset:
    return FolderDataset(
        _require_arg(spec, arg, "DIR"), image_size=image_size, task=task, seed=seed, name=spec,
        follow_symlinks=follow_symlinks,
    )


def _open_manifest(require_3d: bool) -> Callable[..., ImageDataset]:
    """The opener of ``csv:`` (any image or volume file) or ``volumes:`` (3D files only) manifests."""

    def opener(
        spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int, intensity: Any = None,
        volume: VolumeOptions | None = None,
    ) -> ImageDataset:
        from .manifest import CsvDataset

        volume = volume or VolumeOptions()
        return CsvDataset(
            _require_arg(spec, arg, "FILE.csv"), image_size=image_size, task=task, seed=seed, name=spec,
            require_3d=require_3d, intensity=intensity, spacing=volume.spacing, native_size=volume.native_size,
        )

    return opener


register_spec("csv", syntax="csv:FILE.csv", takes_intensity=True, options=("volume",), help=(
    "manifest: 'path' relative to the CSV, optional 'label' or 'label:<name>' 0/1 columns, 'patient_id', 'split'; "
    "PNG/JPEG/TIFF, DICOM, NIfTI, MHA/NRRD; 2D resized to 224, 3D to 64 by default"))(_open_manifest(require_3d=False))
register_spec("volumes", syntax="volumes:FILE.csv", takes_intensity=True, options=("volume",),
              help="the same for 3D files only")(_open_manifest(require_3d=True))


@register_spec("isic2017", syntax="isic2017:ROOT", help=(
    "ISIC 2017 release folders; tasks melanoma (default) and seborrheic_keratosis; lesion masks"))
def _open_isic2017(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int
) -> ImageDataset:
    from .isic import Isic2017Dataset

    return Isic2017Dataset(_require_arg(spec, arg, "ROOT"), image_size=image_size, task=task, name=spec)


@register_spec("cbis-ddsm", syntax="cbis-ddsm:ROOT[@roi]", takes_intensity=True, help=(
    "CBIS-DDSM TCIA tree + case CSVs; full mammograms or @roi lesion crops; tasks pathology (default), pathology4, "
    "mass_margins (multi-label)"))
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


@register_spec("medmnist", syntax="medmnist:NAME[@SIZE]", help=(
    "MedMNIST v2 by name, from ~/.medmnist or downloaded by the medmnist package"))
def _open_medmnist(
    spec: str, arg: str | None, image_size: int | None, task: str | None, seed: int
) -> ImageDataset:
    from .medmnist import open_medmnist

    return open_medmnist(spec, arg, image_size, task)


def open_dataset(
    spec: str, image_size: int | None = None, task: str | None = None, seed: int = 0, intensity: Any = None,
    follow_symlinks: bool = False, volume: VolumeOptions | None = None,
) -> ImageDataset:
    """Opens the dataset a spec string names.

    Args:
        spec: ``PREFIX`` or ``PREFIX:ARG`` with a prefix registered in :data:`SPECS` (:func:`spec_help` lists them
            with what they open: ``phantom2d[:N]``, ``npz:PATH``, ``folder:DIR``, ``csv:FILE.csv`` ...).
        image_size: Side length of the items; ``None`` for the dataset's native size (given in the spec's help).
            Phantoms are rendered at that size, files are resized.
        task: Labelling task for datasets with several (``None``: the default task).
        seed: Seed of the phantom generator and of patient-level splits (npz splits come from the file).
        intensity: :class:`~medssl.data.readers.IntensityConfig` for the specs registered with
            ``takes_intensity=True`` (files read from DICOM / NIfTI / MHA); ``None`` = ``auto``.
        follow_symlinks: ``folder:`` follows symlinked directories leading out of its root.
        volume: :class:`VolumeOptions` (spacing, native size) for the specs that read volumes.

    Returns:
        The dataset, with ``name == spec``.

    Raises:
        DataError: For an unknown prefix, a bad ``N``, a missing path, an unknown task or invalid data,
            with a message listing what is valid.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; valid: {valid_specs()}")
    spec = spec.strip()
    if image_size is not None and not _is_positive_int(image_size):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    prefix, sep, arg = spec.partition(":")
    prefix = prefix.lower()
    if prefix not in SPECS:
        raise DataError(f"unknown data spec {spec!r}; valid: {valid_specs()}")
    entry = SPECS[prefix]
    args = (spec, arg if sep else None, None if image_size is None else int(image_size), task, int(seed))
    given = {"intensity": intensity, "follow_symlinks": follow_symlinks, "volume": volume}
    return entry.opener(*args, **{k: given[k] for k in entry.options if k in given})


def open_from_config(data: Any, *, cache: bool | None = None) -> ImageDataset:
    """Open the dataset of a config's ``data`` section with all its settings.

    Applies, in order: the spec with ``image_size``, ``task``, ``intensity`` and the volume settings (``spacing``,
    ``volume_mode: patches`` keeps volumes at their native size, :class:`VolumeOptions`); the split manifest
    ``splits`` (``--splits FILE``); the item cache (``cache``, ``cache_dir``) for file-backed datasets.
    ``skip_bad`` is left to the caller, which decides where the list of skipped files goes; without it, files
    found unreadable while opening raise here (:meth:`~medssl.data.base.ImageDataset.check_open_errors`).

    Args:
        data: a :class:`~medssl.config.DataConfig`.
        cache: override ``data.cache``.
    """
    from .cache import default_cache_dir
    from .splits import apply_split_manifest

    volume = VolumeOptions(spacing=getattr(data, "target_spacing", None),
                           native_size=getattr(data, "volume_mode", "resize") == "patches")
    ds = open_dataset(data.spec, image_size=data.image_size, task=data.task, intensity=data.intensity,
                      follow_symlinks=data.follow_symlinks, volume=volume)
    if not data.skip_bad:
        ds.check_open_errors()
    if data.splits:
        apply_split_manifest(ds, data.splits)
    use_cache = data.cache if cache is None else cache
    if use_cache:
        ds.enable_cache(Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir())
    return ds


SPEC_HELP: str = spec_help()
"""The ``--data`` help of the built-in specs (:func:`spec_help` includes specs registered later too)."""
