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

A manifest that leaks or contradicts itself is refused with one line naming the row(s): a patient in two
splits (when ``patient_id`` and ``split`` are both given), one file (after resolving ``..`` and symlinks) with
two labels, splits or patients, one integer class written two ways (``1`` / ``1.0`` / ``01``; integers are
compared exactly, never through a float), a label or patient id that is a missing value written out
(:data:`MISSING_TOKENS`), more than :data:`~medssl.data.base.MAX_CLASSES` classes.

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
import logging
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import DataError

from .base import MAX_CLASSES, ImageDataset, resize_image
from .folder import pad_to_square
from .splits import SPLIT_NAMES, assign_patient_splits

log = logging.getLogger("medssl")

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


def first_readable(files: list[Path], where: str) -> Any:
    """The :class:`~medssl.data.readers.ReadResult` of the first of ``files`` that reads.

    Raises:
        DataError: none of them reads (naming ``where`` and the first problem).
    """
    first_problem = None
    for p in files:
        try:
            return read_result(p)
        except DataError as exc:
            first_problem = first_problem or str(exc)
    raise DataError(f"{where}: no readable file among {len(files)} (first problem: {first_problem})")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


#: Label / patient values that are a missing value written out (pandas writes NaN as ``nan``), not a class.
MISSING_TOKENS = frozenset({"nan", "na", "n/a", "none", "null", "nat"})


class _Rows:
    """Names manifest rows in messages: ``FILE: row 3 (line 4)`` (rows count data rows from 1; lines are the
    CSV's own, header and blank lines included)."""

    def __init__(self, csv_path: Path, lines: list[int]) -> None:
        self.csv_path, self.lines = csv_path, lines

    def row(self, i: int) -> str:
        return f"row {i + 1} (line {self.lines[i]})"

    def at(self, i: int) -> str:
        return f"{self.csv_path}: {self.row(i)}"


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """The header, the non-blank rows (values stripped) and each row's line number.

    Raises:
        DataError: unreadable or non-UTF-8 file, no ``path`` column (with a hint when the file looks
            separated by ``;``, tab or ``|`` rather than commas), or no rows.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows, lines = [], []
            for r in reader:
                row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()}
                if any(row.values()):
                    rows.append(row)
                    lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {csv_path}: {exc}") from exc
    if "path" not in header:
        seps = [name for sep, name in ((";", "';'"), ("\t", "tab"), ("|", "'|'")) if any(sep in h for h in header)]
        hint = f"; it looks {seps[0]}-separated, medssl reads comma-separated manifests" if seps else ""
        raise DataError(
            f"{csv_path}: no 'path' column (columns: {', '.join(header) or 'none'}){hint}; a manifest needs "
            "'path' and optionally 'label' or 'label:<name>' columns, 'patient_id', 'split'"
        )
    if not rows:
        raise DataError(f"{csv_path}: empty manifest (no rows)")
    return header, rows, lines


def _check_no_leakage(patient_ids: np.ndarray, splits: list[str], where: _Rows) -> None:
    """With a ``split`` and a ``patient_id`` column, each patient must be in one split (else the test leaks)."""
    first: dict[str, int] = {}
    for i, (pid, split) in enumerate(zip(patient_ids.tolist(), splits, strict=True)):
        j = first.setdefault(pid, i)
        if splits[j] != split:
            raise DataError(
                f"{where.csv_path}: patient {pid!r} is in split {splits[j]!r} ({where.row(j)}) and {split!r} "
                f"({where.row(i)}): test leakage — all images of a patient must be in one split"
            )


def _check_duplicates(files: list[Path], rows: list[dict[str, str]], label_cols: list[str], splits: list[str],
                      where: _Rows) -> None:
    """The same file (after resolving ``..`` and symlinks) listed twice must not contradict itself.

    Different labels, splits or patients for one file is an error naming both rows; an exact repeat is
    kept (it weighs the file twice) with a warning.
    """
    first: dict[str, int] = {}
    repeats = []
    for i, p in enumerate(files):
        key = os.path.normcase(os.path.realpath(p))
        j = first.setdefault(key, i)
        if j == i:
            continue
        both = f"{where.row(j)} and {where.row(i)}"
        for col in label_cols:
            if rows[j].get(col, "") != rows[i].get(col, ""):
                raise DataError(f"{where.csv_path}: {both} list the same file {p} with different {col} "
                                f"({rows[j].get(col, '')!r} and {rows[i].get(col, '')!r})")
        if splits[j] != splits[i]:
            raise DataError(f"{where.csv_path}: {both} list the same file {p} in splits {splits[j]!r} and "
                            f"{splits[i]!r}: test leakage")
        if rows[j].get("patient_id", "") != rows[i].get("patient_id", ""):
            raise DataError(f"{where.csv_path}: {both} list the same file {p} for patients "
                            f"{rows[j].get('patient_id', '')!r} and {rows[i].get('patient_id', '')!r}")
        repeats.append(both)
    if repeats:
        log.warning("%s: %d file(s) listed more than once with the same values (first: %s); each copy is an item",
                    where.csv_path, len(repeats), repeats[0])


def _integer(text: str) -> int | None:
    """``text`` as an exact integer (``3``, ``03``, ``3.0``, ``3e2``), else ``None``.

    Parsed with :class:`decimal.Decimal`, never through a float, so ``9007199254740993`` stays distinct from
    ``9007199254740992``; numbers with more than 18 digits are not taken as integers (no giant ints).
    """
    try:
        d = Decimal(text)
    except InvalidOperation:
        return None
    if not d.is_finite() or d.adjusted() > 18 or d != d.to_integral_value():
        return None
    return int(d)


def _to_int_labels(values: list[str], where: _Rows) -> tuple[np.ndarray, list[str]]:
    """Class indices and sorted class names for one ``label`` column.

    When every value is an integer, classes are the integers, sorted numerically; one class written two
    ways (``1`` and ``1.0``, ``1`` and ``01``) is an error naming both rows rather than a silent merge.
    Otherwise classes are the strings, sorted.

    Raises:
        DataError: a class spelled two ways, or more than :data:`MAX_CLASSES` classes.
    """
    ints = [_integer(v) for v in values]
    if all(x is not None for x in ints):
        spelled: dict[int, int] = {}
        for i, x in enumerate(ints):
            j = spelled.setdefault(x, i)  # type: ignore[arg-type]
            if values[j] != values[i]:
                raise DataError(
                    f"{where.csv_path}: labels {values[j]!r} ({where.row(j)}) and {values[i]!r} ({where.row(i)}) are "
                    "the same number written two ways; write each class one way"
                )
        names_int = sorted(spelled)
        _check_class_count(len(names_int), where)
        lookup_int = {c: k for k, c in enumerate(names_int)}
        return np.array([lookup_int[x] for x in ints], dtype=np.int64), [str(c) for c in names_int]  # type: ignore[index]
    names = sorted(set(values))
    _check_class_count(len(names), where)
    lookup = {c: k for k, c in enumerate(names)}
    return np.array([lookup[v] for v in values], dtype=np.int64), names


def _check_class_count(n: int, where: _Rows) -> None:
    if n > MAX_CLASSES:
        raise DataError(f"{where.csv_path}: {n} distinct labels; medssl takes at most {MAX_CLASSES} classes — "
                        "is the label column an id?")


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
        spacing: 3D files: ``(z, y, x)`` mm every volume is resampled to first (``None``: native spacing).
        native_size: 3D files: keep each (resampled) volume at its own size instead of resizing it to an
            ``image_size`` cube (``data.volume_mode: patches``; crops are cut later, :mod:`medssl.data.patches`).

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
        spacing: tuple[float, float, float] | None = None,
        native_size: bool = False,
    ) -> None:
        from .readers import IntensityConfig

        self.intensity = intensity if intensity is not None else IntensityConfig()
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)
        self.native_size = bool(native_size)
        self.csv_path = Path(csv_path)
        kind = "volumes" if require_3d else "csv"
        if not self.csv_path.exists():
            raise DataError(f"manifest not found: {self.csv_path}")
        if not self.csv_path.is_file():
            raise DataError(f"{self.csv_path}: not a file ({kind}: expects a CSV manifest)")
        header, rows, lines = _read_rows(self.csv_path)
        where = _Rows(self.csv_path, lines)
        base = self.csv_path.parent
        files: list[Path] = []
        for i, r in enumerate(rows):
            text = r.get("path", "")
            if not text:
                raise DataError(f"{where.at(i)}: empty 'path'")
            p = Path(text).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.exists():
                raise DataError(f"{where.at(i)}: file not found: {text} ({p})")
            files.append(p)

        # Labels.
        def column(col: str) -> list[str]:
            values = [r.get(col, "") for r in rows]
            empty = [i for i, v in enumerate(values) if v == ""]
            if empty:
                raise DataError(
                    f"{self.csv_path}: column {col!r} has {len(empty)} empty value(s) (first: "
                    f"{where.row(empty[0])})"
                )
            missing = [i for i, v in enumerate(values) if v.lower() in MISSING_TOKENS]
            if missing:
                raise DataError(
                    f"{where.at(missing[0])}: {col} {values[missing[0]]!r} looks like a missing value "
                    f"({len(missing)} such row(s)); give every row a value or leave the rows out"
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
            labels, class_names = _to_int_labels(column("label"), where)
        elif chosen == "multilabel":
            class_names = [h.removeprefix("label:") for h in ml_cols]
            if len(class_names) > MAX_CLASSES:
                raise DataError(f"{self.csv_path}: {len(class_names)} label: columns; medssl takes at most "
                                f"{MAX_CLASSES} classes")
            matrix = np.zeros((len(rows), len(ml_cols)), dtype=np.int64)
            for j, col in enumerate(ml_cols):
                for i, v in enumerate(column(col)):
                    try:
                        f = float(v)
                    except ValueError:
                        f = -1.0
                    if f not in (0.0, 1.0):
                        raise DataError(
                            f"{self.csv_path}: column {col!r} {where.row(i)}: {v!r} is not 0 or 1"
                        )
                    matrix[i, j] = int(f)
            labels = matrix

        # Patients and splits.
        if "patient_id" in header:
            for i, r in enumerate(rows):
                if r.get("patient_id", "").lower() in MISSING_TOKENS:
                    raise DataError(f"{where.at(i)}: patient_id {r['patient_id']!r} looks like a missing value; "
                                    "leave it empty to use the file name")
        pids = [r.get("patient_id", "") or _stem(p) for r, p in zip(rows, files, strict=True)]
        patient_ids = np.array(pids)
        if "split" in header:
            split_list = []
            for i, v in enumerate(column("split")):
                s = _SPLIT_ALIASES.get(v.lower())
                if s is None:
                    raise DataError(f"{where.at(i)}: split {v!r} is not one of {', '.join(SPLIT_NAMES)}")
                split_list.append(s)
            splits = np.array(split_list)
            if "patient_id" in header:
                _check_no_leakage(patient_ids, split_list, where)
        else:
            splits = assign_patient_splits(patient_ids, seed=seed)
        _check_duplicates(files, rows, [h for h in header if h == "label" or h.startswith("label:")],
                          [str(s) for s in splits], where)

        # Geometry from the first readable file.
        self.files = files
        self._require_3d = require_3d
        first = first_readable(files, str(self.csv_path))
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

        out = {**super().preprocessing(), "intensity": dataclasses.asdict(self.intensity)}
        if self.spatial_dims == 3:  # new keys only for volumes: 2D cache entries keep their keys
            out.update(spacing=list(self.spacing) if self.spacing else "native", native_size=self.native_size)
        return out

    def item_files(self, index: int) -> list[str]:
        """The files item ``index`` is read from (for ``medssl inspect``)."""
        return [str(self.files[index])]

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return load_file_image(self.files[index], self.intensity, self.spatial_dims, self.in_chans, self.image_size,
                               spacing=self.spacing, native_size=self.native_size), None


def resample_result(result: Any, spacing: tuple[float, float, float] | None) -> Any:
    """A 3D :class:`~medssl.data.readers.ReadResult` resampled (trilinear) to ``spacing`` (``(z, y, x)`` mm), in
    the file's units, before any intensity mapping; the result itself when ``spacing`` is ``None`` or 2D.

    Raises:
        DataError: the file records no voxel spacing.
    """
    if spacing is None or int(result.spatial_dims) != 3:
        return result
    if not result.spacing or len(result.spacing) != 3:
        raise DataError(f"{result.source}: records no voxel spacing, so it cannot be resampled to data.spacing "
                        f"{list(spacing)}; set data.spacing: native")
    import dataclasses

    from .volumes import resample

    array = resample(np.asarray(result.array, dtype=np.float32), result.spacing, spacing, mode="linear").numpy()
    affine = result.affine
    if affine is not None:
        affine = affine.copy()
        affine[:3, :3] = affine[:3, :3] * (np.array(spacing) / np.array(result.spacing))[None, :]
    return dataclasses.replace(result, array=array, spacing=tuple(spacing), affine=affine)


def load_file_image(path: Path, intensity: Any, spatial_dims: int, in_chans: int, image_size: int, *,
                    spacing: tuple[float, float, float] | None = None, native_size: bool = False) -> torch.Tensor:
    """Read one file and make it a model input: 3D volumes resampled to ``spacing`` (when given), ``[0, 1]`` via
    ``intensity``, ``in_chans`` channels, 2D images zero-padded to a centred square, resized to ``image_size`` per
    side (3D volumes keep their size with ``native_size``).

    A constant file (every value equal) is kept, with one warning per file in the run log.

    Raises:
        DataError: unreadable file, or a file with another number of spatial dimensions than the dataset.
    """
    result = read_result(path)
    readers = _readers()
    if int(result.spatial_dims) == spatial_dims == 3:
        result = resample_result(result, spacing)
    value = readers.constant_value(result.array)
    if value is not None:
        readers.note_constant(str(path), value)
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
    elif native_size:
        return image.contiguous()
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
