"""``medssl inspect``: what a data spec holds, and every file that cannot be read.

:func:`inspect_data` opens the dataset, then reads every item once: through
:func:`medssl.data.readers.read_file` where the dataset is backed by files (the dataset's ``item_files(i)``
where it has one -- e.g. an ISIC image and its mask -- else its ``sources`` when they are files), otherwise
(phantoms, npz) through the dataset's own items. It gathers shapes, voxel spacings, bit depths,
modalities and intensity ranges, and lists every unreadable or inconsistent file (wrong number of spatial
dimensions for the dataset, unsupported channel count, non-finite values, a mask whose shape differs from
its image) with the reason. Constant images (every pixel equal: a RescaleSlope of 0, an all-black export)
are readable but carry no information: they are listed as warnings, not as bad files (training on them is
harmless, the run log warns too). For 3D files it also tabulates each file's own orientation code (before
medssl brings it to RAS, stored as ``(S, A, R)``), spacing and size in mm by format, and warns about mixed
orientations and extreme anisotropy (largest / smallest spacing above :data:`ANISOTROPY_WARN`).
:func:`format_report` renders the text the CLI prints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import DataError

from .base import ImageDataset
from .readers import constant_value
from .splits import SPLIT_NAMES

#: Largest / smallest voxel spacing of a volume above which ``medssl inspect`` warns (the prostate T2w seed's
#: 0.5 x 0.5 x 3 mm is 6).
ANISOTROPY_WARN = 3.0


@dataclass
class VolumeInfo:
    """One 3D file's geometry as read (``orientation`` is the file's own code; spacing / shape in ``(z, y, x)``)."""

    source: str
    format: str
    orientation: str
    spacing: tuple[float, ...] | None
    shape: tuple[int, ...]

    @property
    def size_mm(self) -> tuple[float, ...] | None:
        return None if self.spacing is None else tuple(n * s for n, s in zip(self.shape, self.spacing, strict=True))


@dataclass
class InspectReport:
    """What :func:`inspect_data` found.

    Attributes:
        summary: :meth:`ImageDataset.describe` of the dataset.
        files_read: Number of files (or in-memory items) read.
        shapes: Count per array shape (channels first, original size).
        spacings: Count per voxel spacing (``"none"`` when the file has none).
        bit_depths: Count per stored bit depth (``"none"`` when unknown).
        modalities: Count per modality (``"none"`` when unknown).
        intensity_min: Smallest value seen (original units), ``None`` when nothing was read.
        intensity_max: Largest value seen (original units).
        bad: ``(file, reason)`` for every unreadable or inconsistent file.
        warnings: ``(file, note)`` for readable files that look wrong (constant images).
        volumes: the geometry of every 3D file read.
        geometry_warnings: one line each about the volumes' geometry (mixed orientations, extreme anisotropy).
    """

    summary: dict[str, Any]
    files_read: int = 0
    shapes: Counter = field(default_factory=Counter)
    spacings: Counter = field(default_factory=Counter)
    bit_depths: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    intensity_min: float | None = None
    intensity_max: float | None = None
    bad: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    volumes: list[VolumeInfo] = field(default_factory=list)
    geometry_warnings: list[str] = field(default_factory=list)

    def _constant(self, source: str, array: np.ndarray) -> None:
        value = constant_value(array)
        if value is not None:
            self.warnings.append((source, f"constant image: every pixel is {value:g}"))

    def _range(self, array: np.ndarray) -> None:
        lo, hi = float(np.min(array)), float(np.max(array))
        self.intensity_min = lo if self.intensity_min is None else min(self.intensity_min, lo)
        self.intensity_max = hi if self.intensity_max is None else max(self.intensity_max, hi)


def _files_of(dataset: ImageDataset) -> Any:
    item_files = getattr(dataset, "item_files", None)
    if callable(item_files):
        return item_files
    if len(dataset) and all(Path(s).is_file() for s in dataset.sources):
        return lambda i: [dataset.sources[i]]
    return None


def _fmt_spacing(spacing: Any) -> str:
    if spacing is None:
        return "none"
    return "(" + ", ".join(f"{float(s):.3g}" for s in spacing) + ")"


def _check_file(
    report: InspectReport,
    dataset: ImageDataset,
    path: str,
    image_shape: tuple[int, ...] | None,
    is_mask: bool,
) -> tuple[int, ...] | None:
    from .manifest import read_result

    try:
        result = read_result(path)
    except DataError as exc:
        report.bad.append((path, str(exc)))
        return None
    report.files_read += 1
    array = np.asarray(result.array)
    report.shapes[tuple(int(s) for s in array.shape)] += 1
    report.spacings[_fmt_spacing(result.spacing)] += 1
    report.bit_depths["none" if result.bit_depth is None else str(result.bit_depth)] += 1
    report.modalities[result.modality or "none"] += 1
    if int(result.spatial_dims) == 3 and not is_mask:
        _note_volume(report, path, result)
    problems = []
    if int(result.spatial_dims) != dataset.spatial_dims:
        problems.append(f"{result.spatial_dims}D, but the dataset is {dataset.spatial_dims}D")
    if not is_mask and array.shape[0] not in (1, 2, 3, 4):
        problems.append(f"{array.shape[0]} channels (expected gray or RGB)")
    if array.size == 0:
        problems.append("empty image")
    elif not np.isfinite(array).all():
        problems.append("non-finite values (NaN or inf)")
    elif not is_mask:
        report._range(array)
        report._constant(path, array)
    spatial = tuple(int(s) for s in array.shape[1:])
    if is_mask and image_shape is not None and spatial != image_shape:
        problems.append(f"mask shape {spatial} differs from its image's {image_shape}")
    if problems:
        report.bad.append((path, "inconsistent: " + "; ".join(problems)))
    return spatial


def _format_of(path: str) -> str:
    name = path.lower()
    if Path(path).is_dir():
        return "dicom series"
    for suffix, fmt in ((".nii.gz", "nifti"), (".nii", "nifti"), (".mha", "mha"), (".mhd", "mhd"), (".nrrd", "nrrd"),
                        (".nhdr", "nrrd")):
        if name.endswith(suffix):
            return fmt
    return "dicom"


def _note_volume(report: InspectReport, path: str, result: Any) -> None:
    spacing = tuple(float(s) for s in result.spacing) if result.spacing else None
    info = VolumeInfo(path, _format_of(path), result.orientation or "unknown", spacing,
                      tuple(int(s) for s in result.shape))
    report.volumes.append(info)


def inspect_data(spec: str, task: str | None = None, image_size: int | None = None) -> InspectReport:
    """Opens ``spec`` and reads every item once (see the module docstring).

    Raises:
        DataError: If the spec itself is invalid (unknown prefix, missing manifest, ...); unreadable files
            are reported in :attr:`InspectReport.bad` instead.
    """
    from .specs import open_dataset

    dataset = open_dataset(spec, image_size=image_size, task=task)
    report = InspectReport(summary=dataset.describe())
    files_of = _files_of(dataset)
    for i in range(len(dataset)):
        if i in dataset.open_errors:  # found unreadable while opening (e.g. a folder image's header)
            report.bad.append((dataset.sources[i], dataset.open_errors[i]))
            continue
        if files_of is not None:
            image_shape = None
            for k, path in enumerate(files_of(i)):
                shape = _check_file(report, dataset, str(path), image_shape, is_mask=k > 0)
                if k == 0:
                    image_shape = shape
            continue
        try:
            item = dataset[i]
        except DataError as exc:
            report.bad.append((dataset.sources[i], str(exc)))
            continue
        image = item["image"].numpy()  # type: ignore[union-attr]
        report.files_read += 1
        report.shapes[tuple(int(s) for s in image.shape)] += 1
        report.spacings["none"] += 1
        report.bit_depths["none"] += 1
        report.modalities["none"] += 1
        report._range(image)
        report._constant(dataset.sources[i], image)
    report.geometry_warnings = geometry_warnings(report.volumes)
    return report


def geometry_warnings(volumes: list[VolumeInfo]) -> list[str]:
    """Mixed orientations and extreme anisotropy (largest / smallest spacing > :data:`ANISOTROPY_WARN`)."""
    out = []
    codes = Counter(v.orientation for v in volumes)
    if len(codes) > 1:
        out.append(f"mixed orientations ({_counts(codes)}): medssl reads every file as RAS, stored (S, A, R), so "
                   "they agree once loaded; other tools may not")
    ratios = [(max(v.spacing) / min(v.spacing), v) for v in volumes if v.spacing and min(v.spacing) > 0]
    steep = [(r, v) for r, v in ratios if r > ANISOTROPY_WARN]
    if steep:
        r, v = max(steep, key=lambda t: t[0])
        out.append(f"extreme anisotropy in {len(steep)} volume(s): largest / smallest spacing up to {r:.1f} (e.g. "
                   f"{v.source}: z, y, x {_fmt_spacing(v.spacing)} mm); set data.spacing (e.g. [{min(v.spacing):.3g}, "
                   f"{min(v.spacing):.3g}, {min(v.spacing):.3g}] or a compromise) so patches and kernels are "
                   "isotropic in mm")
    return out


def _range_text(values: list[tuple[float, ...]], unit: str) -> str:
    """``z a..b, y c..d, x e..f UNIT`` over ``(z, y, x)`` tuples."""
    arr = np.array(values, dtype=float)
    parts = []
    for k, axis in enumerate("zyx"):
        lo, hi = arr[:, k].min(), arr[:, k].max()
        parts.append(f"{axis} {lo:.3g}" + ("" if lo == hi else f"..{hi:.3g}"))
    return ", ".join(parts) + f" {unit}"


def volume_table(report: InspectReport) -> list[str]:
    """The orientation / spacing table of the 3D files: one row per (format, orientation, spacing)."""
    if not report.volumes:
        return []
    groups: dict[tuple[str, str, str], list[VolumeInfo]] = {}
    for v in report.volumes:
        groups.setdefault((v.format, v.orientation, _fmt_spacing(v.spacing)), []).append(v)
    rows = [("format", "orientation", "files", "spacing z,y,x (mm)", "voxels z,y,x", "size z,y,x (mm)")]
    for (fmt, code, spacing), vs in sorted(groups.items()):
        shapes = sorted({"x".join(map(str, v.shape)) for v in vs})
        sizes = [v.size_mm for v in vs if v.size_mm is not None]
        size = "-" if not sizes else _range_text(sizes, "").strip().replace("z ", "").replace("y ", "").replace(
            "x ", "").replace(", ", " x ")
        rows.append((fmt, f"{code} -> RAS", str(len(vs)), spacing, shapes[0] + (" ..." if len(shapes) > 1 else ""),
                     size))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _counts(counter: Counter) -> str:
    if not counter:
        return "-"
    return ", ".join(f"{k if isinstance(k, str) else str(k)} x{n}" for k, n in counter.most_common())


def format_report(report: InspectReport) -> str:
    """The plain-text report ``medssl inspect`` prints."""
    s = report.summary
    lines = [
        f"data: {s['name']}",
        f"items: {s['num_items']}  patients: {s['num_patients']}  {s['spatial_dims']}D  channels: {s['in_chans']}  "
        f"image size: {s['image_size']}  masks: {'yes' if s['has_masks'] else 'no'}",
        "splits: "
        + ", ".join(
            f"{sp} {s['split_counts'][sp]} ({s['split_patients'][sp]} patients)" for sp in SPLIT_NAMES
        ),
    ]
    if s["label_counts"] is None:
        lines.append("labels: none (unlabelled)")
    else:
        kind = "multi-label, positives per class" if s["multilabel"] else "classes"
        lines.append(
            f"task: {s['task']} (tasks: {', '.join(s['tasks'])}); {kind}: {', '.join(s['class_names'])}"
        )
        for part in ("all", *SPLIT_NAMES):
            counts = ", ".join(f"{k}: {v}" for k, v in s["label_counts"][part].items())
            lines.append(f"  labels {part}: {counts}")
    lines += [
        f"read: {report.files_read} file(s)/item(s)",
        f"shapes (original): {_counts(report.shapes)}",
        f"spacings: {_counts(report.spacings)}",
        f"bit depths: {_counts(report.bit_depths)}",
        f"modalities: {_counts(report.modalities)}",
    ]
    if report.volumes:
        spaced = [v.spacing for v in report.volumes if v.spacing]
        sized = [v.size_mm for v in report.volumes if v.size_mm]
        lines.append("volumes: orientation of each file (medssl loads every one as RAS, arrays (D, H, W) = (S, A, R)): "
                     + _counts(Counter(v.orientation for v in report.volumes)))
        if spaced:
            lines.append(f"spacing range: {_range_text(spaced, 'mm')}")
            lines.append(f"size range: {_range_text(sized, 'mm')}")
        lines += volume_table(report)
        lines += [f"warning: {w}" for w in report.geometry_warnings]
    if report.intensity_min is not None:
        lines.append(
            f"intensity range (original units): {report.intensity_min:g} .. {report.intensity_max:g}"
        )
    if report.bad:
        lines.append(f"unreadable or inconsistent files: {len(report.bad)}")
        lines += [f"  {_named(path, reason)}" for path, reason in report.bad]
    else:
        lines.append("all files readable")
    if report.warnings:
        lines.append(f"warnings: {len(report.warnings)} (kept for training; often a broken export)")
        lines += [f"  {_named(path, note)}" for path, note in report.warnings]
    return "\n".join(lines)


def _named(path: str, reason: str) -> str:
    """``path: reason`` without repeating the path when the reason already starts with it."""
    return reason if reason.startswith(f"{path}:") else f"{path}: {reason}"
