"""CSV manifests (``csv:FILE.csv`` and ``volumes:FILE.csv``) and the generic bad-file filter.

Manifest columns (header names are case-sensitive, surrounding spaces ignored):

* ``path`` (required) -- the file, relative to the CSV's folder or absolute. Anything
  :func:`medssl.data.readers.read_file` reads: PNG/JPEG/TIFF/BMP, DICOM, NIfTI, MHA/NRRD, or a DICOM series
  folder.
* ``label`` (optional) -- one class per row, strings or integers; class names are sorted (numerically when
  every value is an integer). Task ``label``.
* ``label:<name>`` (optional, several) -- a multi-label manifest: one 0/1 column per class ``<name>``.
  Task ``multilabel``. When both kinds exist ``label`` is the default task.
* ``patient_id`` (optional) -- else the file name without its extension.
* ``split`` (optional) -- ``train``/``val``/``test`` per row; else patient-level 70/10/20 splits (seeded).

Items are read lazily: ``read_file`` -> ``to_unit_range`` -> (2D: zero-padded to a centred square) ->
resized to ``image_size`` (2D default 224, 3D default 64). The dataset's ``spatial_dims`` and ``in_chans``
come from the FIRST readable file of the manifest, read once at construction; later items with another
channel count are converted (gray repeated to RGB, RGB averaged to gray), items with another number of
spatial dimensions are an error naming the file. ``volumes:`` is the same reader but requires 3D files.

:func:`drop_bad` works on any :class:`ImageDataset`: it loads every item once and returns a view without
the unreadable ones, listing them (path, reason) in ``.skipped``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import DataError

from .base import ImageDataset, resize_image
from .folder import pad_to_square
from .splits import SPLIT_NAMES, assign_patient_splits

CSV_DEFAULT_SIZE_2D = 224
CSV_DEFAULT_SIZE_3D = 64
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")


def _readers() -> Any:
    """The reader module (imported lazily so the manifest code loads without optional dependencies)."""
    from . import readers

    return readers


def read_result(path: str | Path) -> Any:
    """``read_file(path)`` with every failure turned into a :class:`DataError` naming the file."""
    try:
        return _readers().read_file(path)
    except DataError:
        raise
    except Exception as exc:  # a reader bug or an unexpected library error must still name the file
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def _to_int_labels(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class indices and sorted class names for one ``label`` column."""
    as_int: list[int] | None = []
    for v in values:
        try:
            f = float(v)
        except ValueError:
            as_int = None
            break
        if not np.isfinite(f) or int(f) != f:
            as_int = None
            break
        as_int.append(int(f))
    if as_int is not None:
        names_int = sorted(set(as_int))
        lookup_int = {c: i for i, c in enumerate(names_int)}
        return np.array([lookup_int[v] for v in as_int], dtype=np.int64), [str(c) for c in names_int]
    names = sorted(set(values))
    lookup = {c: i for i, c in enumerate(names)}
    return np.array([lookup[v] for v in values], dtype=np.int64), names


def _to_channels(array: np.ndarray, path: str) -> np.ndarray:
    c = array.shape[0]
    if c in (1, 3):
        return array
    if c == 4:  # RGBA: drop alpha
        return array[:3]
    if c == 2:  # gray + alpha
        return array[:1]
    raise DataError(f"{path}: {c} channels; medssl reads 1-channel (gray) or 3-channel (RGB) images")


class CsvDataset(ImageDataset):
    """A dataset listed in a CSV manifest (see the module docstring for the columns and rules).

    Args:
        csv_path: The manifest.
        image_size: Side length of the items (default 224 for 2D files, 64 for 3D).
        task: ``"label"``, ``"multilabel"`` or ``None`` (the default task).
        seed: Seed of the patient-level split when the manifest has no ``split`` column.
        name: Spec string to record (defaults to ``csv:FILE``).
        require_3d: Reject 2D files (``volumes:``).
        intensity: :class:`~medssl.data.readers.IntensityConfig` (default: ``auto``).

    Attributes:
        files: Resolved path of every item.

    Raises:
        DataError: Missing CSV, no ``path`` column, an empty manifest, a row whose file does not exist,
            an empty or invalid label / split value, an unknown task, or no readable file.
    """

    def __init__(
        self,
        csv_path: str | Path,
        image_size: int | None = None,
        task: str | None = None,
        seed: int = 0,
        name: str | None = None,
        require_3d: bool = False,
        intensity: Any = None,
    ) -> None:
        from .readers import IntensityConfig

        self.intensity = intensity if intensity is not None else IntensityConfig()
        self.csv_path = Path(csv_path)
        kind = "volumes" if require_3d else "csv"
        if not self.csv_path.exists():
            raise DataError(f"manifest not found: {self.csv_path}")
        if not self.csv_path.is_file():
            raise DataError(f"{self.csv_path}: not a file ({kind}: expects a CSV manifest)")
        try:
            with open(self.csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = [h.strip() for h in (reader.fieldnames or [])]
                raw_rows = [
                    {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()}
                    for r in reader
                ]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot read manifest {self.csv_path}: {exc}") from exc
        if "path" not in header:
            raise DataError(
                f"{self.csv_path}: no 'path' column (columns: {', '.join(header) or 'none'}); a manifest needs "
                "'path' and optionally 'label' or 'label:<name>' columns, 'patient_id', 'split'"
            )
        rows = [r for r in raw_rows if any(r.values())]
        if not rows:
            raise DataError(f"{self.csv_path}: empty manifest (no rows)")
        base = self.csv_path.parent
        files: list[Path] = []
        for i, r in enumerate(rows, start=1):
            text = r.get("path", "")
            if not text:
                raise DataError(f"{self.csv_path}: row {i} (line {i + 1}): empty 'path'")
            p = Path(text).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.exists():
                raise DataError(f"{self.csv_path}: row {i} (line {i + 1}): file not found: {text} ({p})")
            files.append(p)

        # Labels.
        def column(col: str) -> list[str]:
            values = [r.get(col, "") for r in rows]
            empty = [i for i, v in enumerate(values, start=1) if v == ""]
            if empty:
                raise DataError(
                    f"{self.csv_path}: column {col!r} has {len(empty)} empty value(s) (first: row {empty[0]}, "
                    f"line {empty[0] + 1})"
                )
            return values

        ml_cols = [h for h in header if h.startswith("label:")]
        tasks: list[str] = []
        if "label" in header:
            tasks.append("label")
        if ml_cols:
            tasks.append("multilabel")
        if task is not None and task not in tasks:
            raise DataError(
                f"{self.csv_path}: no task {task!r}; valid tasks: {', '.join(tasks) or 'none (no label columns)'}"
            )
        chosen = task or (tasks[0] if tasks else None)
        labels: np.ndarray | None = None
        class_names: list[str] = []
        if chosen == "label":
            labels, class_names = _to_int_labels(column("label"))
        elif chosen == "multilabel":
            class_names = [h.removeprefix("label:") for h in ml_cols]
            matrix = np.zeros((len(rows), len(ml_cols)), dtype=np.int64)
            for j, col in enumerate(ml_cols):
                for i, v in enumerate(column(col)):
                    try:
                        f = float(v)
                    except ValueError:
                        f = -1.0
                    if f not in (0.0, 1.0):
                        raise DataError(
                            f"{self.csv_path}: column {col!r} row {i + 1} (line {i + 2}): {v!r} is not 0 or 1"
                        )
                    matrix[i, j] = int(f)
            labels = matrix

        # Patients and splits.
        pids = [r.get("patient_id", "") or _stem(p) for r, p in zip(rows, files, strict=True)]
        patient_ids = np.array(pids)
        if "split" in header:
            split_list = []
            for i, v in enumerate(column("split"), start=1):
                s = _SPLIT_ALIASES.get(v.lower())
                if s is None:
                    raise DataError(
                        f"{self.csv_path}: row {i} (line {i + 1}): split {v!r} is not one of {', '.join(SPLIT_NAMES)}"
                    )
                split_list.append(s)
            splits = np.array(split_list)
        else:
            splits = assign_patient_splits(patient_ids, seed=seed)

        # Geometry from the first readable file.
        self.files = files
        self._require_3d = require_3d
        first = None
        errors: list[str] = []
        for p in files:
            try:
                first = read_result(p)
                break
            except DataError as exc:
                errors.append(str(exc))
        if first is None:
            raise DataError(
                f"{self.csv_path}: no readable file among {len(files)} (first problem: {errors[0]})"
            )
        dims = int(first.spatial_dims)
        if require_3d and dims != 3:
            raise DataError(
                f"{self.csv_path}: volumes: needs 3D files, but {first.source} is {dims}D (use csv: for 2D images)"
            )
        chans = _to_channels(np.asarray(first.array), str(first.source)).shape[0]
        if image_size is None:
            size = CSV_DEFAULT_SIZE_3D if dims == 3 else CSV_DEFAULT_SIZE_2D
        else:
            size = int(image_size)
        self._set_metadata(
            name=name or f"{kind}:{self.csv_path}",
            spatial_dims=dims,
            in_chans=chans,
            image_size=size,
            labels=labels,
            class_names=class_names,
            multilabel=chosen == "multilabel",
            patient_ids=patient_ids,
            splits=splits,
            sources=[str(p) for p in files],
            task=chosen,
            tasks=tuple(tasks),
            has_masks=False,
        )

    def preprocessing(self) -> dict[str, Any]:
        import dataclasses

        return {**super().preprocessing(), "intensity": dataclasses.asdict(self.intensity)}

    def item_files(self, index: int) -> list[str]:
        """The files item ``index`` is read from (for ``medssl inspect``)."""
        return [str(self.files[index])]

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return load_file_image(self.files[index], self.intensity, self.spatial_dims, self.in_chans, self.image_size), None


def load_file_image(path: Path, intensity: Any, spatial_dims: int, in_chans: int, image_size: int) -> torch.Tensor:
    """Read one file and make it a model input: ``[0, 1]`` via ``intensity``, ``in_chans`` channels, 2D images
    zero-padded to a centred square, resized to ``image_size`` per side.

    Raises:
        DataError: unreadable file, or a file with another number of spatial dimensions than the dataset.
    """
    result = read_result(path)
    if int(result.spatial_dims) != spatial_dims:
        raise DataError(
            f"{path}: {result.spatial_dims}D, but this dataset is {spatial_dims}D (decided by its first readable file)"
        )
    try:
        unit = intensity.apply(result)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot scale {path} to [0, 1]: {type(exc).__name__}: {exc}") from exc
    array = _to_channels(np.asarray(unit, dtype=np.float32), str(path))
    image = torch.from_numpy(np.ascontiguousarray(array))
    if image.shape[0] == 1 and in_chans == 3:
        image = image.expand(3, *image.shape[1:])
    elif image.shape[0] == 3 and in_chans == 1:
        image = image.mean(dim=0, keepdim=True)
    if spatial_dims == 2:
        image = pad_to_square(image)
    return resize_image(image.contiguous(), image_size).contiguous()


class SubsetDataset(ImageDataset):
    """A view of some items of another dataset (same geometry, labels and splits, re-indexed).

    Args:
        base: The dataset.
        keep: Indices of ``base`` to keep, in order.
        skipped: ``(path, reason)`` of the dropped items (stored as ``.skipped``).
    """

    def __init__(
        self, base: ImageDataset, keep: np.ndarray, skipped: list[tuple[str, str]] | None = None
    ) -> None:
        self.base = base
        self.keep = np.asarray(keep, dtype=np.int64)
        self.skipped = list(skipped or [])
        k = self.keep
        self._set_metadata(
            name=base.name,
            spatial_dims=base.spatial_dims,
            in_chans=base.in_chans,
            image_size=base.image_size,
            labels=None if base.labels is None else base.labels[k],
            class_names=base.class_names,
            multilabel=base.multilabel,
            patient_ids=base.patient_ids[k],
            splits=base.splits[k],
            sources=[base.sources[i] for i in k],
            task=base.task,
            tasks=base.tasks,
            has_masks=base.has_masks,
        )

    def item_files(self, index: int) -> list[str]:
        inner = getattr(self.base, "item_files", None)
        return inner(int(self.keep[index])) if inner else [self.sources[index]]

    def preprocessing(self) -> dict[str, Any]:
        return self.base.preprocessing()

    def enable_cache(self, root: Any) -> bool:
        """Caches through the base dataset (the same entries whether or not items were dropped)."""
        return self.base.enable_cache(root)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.base._load_item(int(self.keep[index]))


def drop_bad(dataset: ImageDataset) -> SubsetDataset:
    """Loads every item of ``dataset`` once and drops the ones that fail with a :class:`DataError`.

    Args:
        dataset: Any :class:`ImageDataset`.

    Returns:
        A :class:`SubsetDataset` of the readable items; ``.skipped`` lists ``(source, reason)`` of the others
        (empty when all are readable).

    Raises:
        DataError: If no item is readable.
    """
    keep: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i in range(len(dataset)):
        try:
            dataset[i]
        except DataError as exc:
            skipped.append((dataset.sources[i], str(exc)))
        else:
            keep.append(i)
    if not keep:
        first = skipped[0][1] if skipped else "the dataset is empty"
        raise DataError(f"data {dataset.name}: no readable item (first problem: {first})")
    return SubsetDataset(dataset, np.array(keep, dtype=np.int64), skipped)


def write_skipped(skipped: list[tuple[str, str]], path: str | Path) -> Path:
    """Writes ``(path, reason)`` pairs as a CSV with columns ``path, reason``."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)
    return path
