"""Readers for medical image files: one function, :func:`read_file`, for every format medssl takes.

* PNG / JPEG / TIFF / BMP (Pillow): 8 and 16 bit, grayscale, RGB (alpha dropped, palettes expanded).
* DICOM (pydicom): modality LUT (rescale slope / intercept), MONOCHROME1 inversion, window centre / width
  and VOI LUT kept for :func:`to_unit_range`, multi-frame files (→ a volume), colour (YBR → RGB), and the
  compressed transfer syntaxes pydicom's pixel handlers decode (JPEG baseline / extended / lossless,
  JPEG-LS and JPEG 2000 through pylibjpeg, RLE natively).
* NIfTI-1/2 (nibabel), MHA / MHD / NRRD (SimpleITK; vector pixels become channels) and a folder of DICOM files
  of one series (slices ordered along the slice normal from ``ImagePositionPatient`` /
  ``ImageOrientationPatient``; ``InstanceNumber`` when positions are missing) all load in ONE layout: the
  closest RAS+ orientation stored as ``(D, H, W) = (S, A, R)`` axes, with the voxel spacing in that order and
  the affine kept (:mod:`medssl.data.volumes`, docs/volumes.md).

A reader returns a :class:`ReadResult`: the array as float32 in the file's own units (Hounsfield units for
CT, raw values for MR, 0..255 / 0..65535 for images), channels first — ``(C, H, W)`` or ``(C, D, H, W)`` —
plus what :func:`to_unit_range` needs to map it to ``[0, 1]``. Every failure is a
:class:`~medssl.errors.DataError` whose message names the file and the problem.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.checks import FieldError, check_choice, check_range
from medssl.errors import DataError

__all__ = ["IntensityConfig", "ReadResult", "read_file", "to_unit_range", "INTENSITY_MODES", "IMAGE_SUFFIXES",
           "VOLUME_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
INTENSITY_MODES = ("auto", "window", "percentile", "minmax", "bitdepth", "zscore")
_MAX_CHANNELS = 4


def _pair(name: str, value: Any) -> tuple[float, float]:
    """``value`` as two floats, or a FieldError naming ``name``."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise FieldError(name, f"must be two numbers [a, b], got {value!r}") from None
    return a, b


@dataclass
class IntensityConfig:
    """How file values become the model's ``[0, 1]`` input (the ``data.intensity`` section of a config).

    Attributes:
        mode: ``auto``, ``window``, ``percentile``, ``minmax``, ``bitdepth`` or ``zscore`` (see
            :func:`to_unit_range`).
        percentiles: Clipping percentiles of ``percentile`` mode (and of ``auto`` when it falls back to it).
        window: ``[centre, width]`` in the file's units (e.g. ``[40, 400]`` for abdomen CT in HU); ``None`` =
            the file's own DICOM window where it has one.
    """

    mode: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, INTENSITY_MODES)
        pct = _pair("percentiles", self.percentiles)
        for v in pct:
            check_range("percentiles", v, ge=0.0, le=100.0)
        if pct[0] >= pct[1]:
            raise FieldError("percentiles", f"must be [low, high] with low < high, got {list(pct)}")
        self.percentiles = pct
        if self.window is not None:
            win = _pair("window", self.window)
            if not (math.isfinite(win[0]) and math.isfinite(win[1]) and win[1] > 0):
                raise FieldError("window", f"must be [centre, width] with finite values and width > 0, got {list(win)}")
            self.window = win

    def apply(self, result: ReadResult) -> np.ndarray:
        """:func:`to_unit_range` with these settings."""
        return to_unit_range(result, self.mode, self.percentiles, self.window)


@dataclass
class ReadResult:
    """A decoded image in the file's own units.

    Attributes:
        array: float32, ``(C, H, W)`` in 2D or ``(C, D, H, W)`` in 3D, in the file's units (after the DICOM
            modality LUT; MONOCHROME1 inverted so that higher always means brighter).
        spatial_dims: 2 or 3.
        spacing: Pixel / voxel spacing in mm along ``(H, W)`` or ``(D, H, W)``, where the file records it.
        bit_depth: Bits per stored sample (8, 12, 16, ...) for integer sources, else ``None``.
        window: DICOM window ``(centre, width)`` in the array's units (first one if several), else ``None``.
        modality: DICOM modality (``CT``, ``MR``, ``MG`` ...) or the format (``png``, ``nifti``, ``mha``).
        source: The path read.
        voi_lut: For DICOM with a VOI LUT sequence: a function mapping the array to display values.
        affine: For volumes in the canonical layout (NIfTI, MHA / NRRD, DICOM series): the 4x4 map from the
            ``(d, h, w)`` voxel index to RAS millimetres; else ``None``.
        orientation: The file's own orientation code (``RAS``, ``LPS`` ...) where it has one, else ``None``.
    """

    array: np.ndarray
    spatial_dims: int
    spacing: tuple[float, ...] | None
    bit_depth: int | None
    window: tuple[float, float] | None
    modality: str | None
    source: str
    voi_lut: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    affine: np.ndarray | None = field(default=None, repr=False)
    orientation: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (without the channel axis)."""
        return tuple(self.array.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz",):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_file(path: str | Path) -> ReadResult:
    """Read any supported file (or DICOM series folder) into a :class:`ReadResult`.

    The format is chosen by the suffix; files without a known suffix are sniffed for the DICOM preamble.
    A file holding any non-finite value (NaN, ±inf) is an error: medssl does not guess whether NaN means
    background, missing or a failed reconstruction, and one NaN would otherwise turn every normalised value
    into NaN (see docs/datasets.md).

    Raises:
        DataError: missing file, unknown format, truncated or corrupt file, unsupported compression,
            unexpected dimensions, non-finite values — naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    result = _read_any(p)
    check_finite(result.array, str(p))
    return result


def _read_any(p: Path) -> ReadResult:
    if p.is_dir():
        return read_dicom_series(p)
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file (0 bytes)")
    sfx = _suffix(p)
    if sfx in IMAGE_SUFFIXES:
        return read_image(p)
    if sfx in NIFTI_SUFFIXES:
        return read_nifti(p)
    if sfx in ITK_SUFFIXES:
        return read_itk(p)
    if sfx in DICOM_SUFFIXES or _is_dicom_file(p):
        return read_dicom(p)
    raise DataError(
        f"{p}: unsupported file type '{sfx or '(no suffix)'}'; medssl reads "
        f"{', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES + VOLUME_SUFFIXES)} files and DICOM series folders"
    )


def check_finite(array: np.ndarray, source: str) -> None:
    """Raise a :class:`DataError` naming ``source`` and the count when ``array`` holds NaN or ±inf.

    Integer arrays cannot hold them and pass without a scan.
    """
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.inexact):
        return
    finite = np.isfinite(a)
    if finite.all():
        return
    bad = int(a.size - np.count_nonzero(finite))
    n_nan = int(np.count_nonzero(np.isnan(a)))
    raise DataError(
        f"{source}: {bad} non-finite value(s) ({n_nan} NaN, {bad - n_nan} inf) among {a.size}; medssl does not "
        "guess what they mean — replace them in the file, or skip it with --skip-bad"
    )


def constant_value(array: np.ndarray) -> float | None:
    """The single value of an array whose every element is equal (a constant image), else ``None``."""
    a = np.asarray(array)
    if a.size == 0:
        return None
    lo, hi = a.min(), a.max()
    return float(lo) if lo == hi else None


_CONSTANT_NOTED: set[str] = set()


def note_constant(source: str, value: float) -> None:
    """Log (once per file and process) that ``source`` is a constant image — kept, but likely a broken export."""
    if source in _CONSTANT_NOTED:
        return
    _CONSTANT_NOTED.add(source)
    logging.getLogger("medssl").warning(
        "%s: constant image: every pixel is %g (kept; it carries no information — often a broken export, "
        "see `medssl inspect`)", source, value)


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-fix messages (printed to stderr); medssl reports what matters itself."""
    logger = logging.getLogger("nibabel.global")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, ``None`` where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(source: Any, shape: Sequence[int], itemsize: int) -> None:
    """Refuse, before reading, an array whose header-declared size exceeds the machine's memory.

    A few bytes of header (or a compressed file of zeros) can declare terabytes; reading it would end in the
    out-of-memory killer instead of a message.

    Raises:
        DataError: naming ``source``, the size needed and the memory available.
    """
    need = float(np.prod([float(s) for s in shape])) * itemsize
    memory = physical_memory()
    if memory is not None and need > memory:
        raise DataError(f"{source}: its arrays need {need / 2**30:.1f} GiB once decompressed, more than this "
                        f"machine's {memory / 2**30:.1f} GiB of memory")


def open_pil(path: Path) -> Any:
    """``PIL.Image.open`` with its failures as one-line :class:`DataError` naming the file.

    Pillow refuses images over ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels (about 179 million by default, e.g.
    13 400 x 13 400) as decompression bombs: a header can claim billions of pixels in a few bytes. medssl keeps
    that limit (it does not change Pillow's global setting) and reports such a file as bad; below it, Pillow's
    ``DecompressionBombWarning`` is silenced.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        if Path(path).stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)") from exc
        raise DataError(f"{path}: not a readable image (Pillow cannot identify it)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: truncated or corrupt image ({type(exc).__name__}: {exc})") from exc


# -- 2D images ----------------------------------------------------------------------------------------
def read_image(path: Path) -> ReadResult:
    """PNG / JPEG / TIFF / BMP through Pillow, keeping 16-bit values."""
    img0 = open_pil(path)
    try:
        with img0 as img, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                mode = img.mode
            if mode in ("RGBA", "LA", "PA"):
                img = img.convert("RGB" if mode != "LA" else "L")
                mode = img.mode
            if mode == "CMYK" or mode == "YCbCr":
                img = img.convert("RGB")
                mode = "RGB"
            if mode == "1":
                img = img.convert("L")
                mode = "L"
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: truncated or corrupt image ({type(exc).__name__}: {exc})") from exc
    if arr.size == 0:
        raise DataError(f"{path}: empty image (shape {arr.shape})")
    if arr.dtype == np.uint8:
        bits: int | None = 8
    elif arr.dtype in (np.uint16, np.int32) and mode.startswith("I"):
        bits = 16 if arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0 else 32
    elif arr.dtype == bool:
        arr, bits = arr.astype(np.uint8) * 255, 8
    else:
        bits = None
    arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise DataError(f"{path}: unexpected image array shape {arr.shape}")
    return ReadResult(np.ascontiguousarray(arr), 2, None, bits, None, _suffix(path).lstrip("."), str(path))


# -- DICOM --------------------------------------------------------------------------------------------
def _first(value: Any) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


#: Elements one of which any DICOM image (or any DICOM object worth the name) carries.
_DICOM_EVIDENCE = ("SOPClassUID", "Modality", "Rows", "Columns", "PixelData", "StudyInstanceUID", "PatientID")
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _dcmread(path: Path) -> Any:
    """``pydicom.dcmread`` with one-line errors that say *not a DICOM file* or *truncated* as the case is.

    Files with the ``DICM`` marker at byte 128 are read normally. Files without it are read with ``force``
    (old ACR-NEMA files without the 128-byte preamble are still common) and must then hold at least one of
    the elements every DICOM object carries (:data:`_DICOM_EVIDENCE`): a text file named ``.dcm`` parses into
    a few meaningless tags under ``force`` and is *not a DICOM file*. Whether the file ends inside an element
    is noted on the dataset (``_medssl_truncated``) for the pixel-data errors of :func:`_decode_pixels`.
    """
    import pydicom

    marker = _is_dicom_file(path)
    size = path.stat().st_size
    if not marker and size < 132:
        raise DataError(f"{path}: not a DICOM file, or truncated: {size} bytes, shorter than the 128-byte preamble "
                        "and 'DICM' marker that start a DICOM file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=not marker)
    except Exception as exc:
        if not marker:
            raise DataError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128, and it does not parse as "
                            f"DICOM without one: {type(exc).__name__})") from exc
        raise DataError(f"{path}: truncated or corrupt DICOM ({type(exc).__name__}: {exc})") from exc
    if not marker and not any(k in ds for k in _DICOM_EVIDENCE):
        raise DataError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128, and none of the elements a "
                        "DICOM image carries: SOP class, modality, rows, columns, pixel data)")
    try:
        ds._medssl_truncated = _truncation(ds, size)
    except Exception:  # a corrupt element that pydicom cannot even hand over raw: the decode reports it
        ds._medssl_truncated = None
    return ds


def _truncation(ds: Any, size: int) -> str | None:
    """Why ``ds`` (read from a file of ``size`` bytes) looks cut short, or ``None``.

    pydicom stops silently at the end of the file, even inside an element or its tag header. The file is
    truncated when a top-level element's declared length runs past the end, when fewer bytes than a tag
    header (8) remain after the last element, or when nothing but (part of) the file meta header was read.
    Must run before elements are accessed: only raw (unconverted) elements keep their file offsets.
    """
    end = None
    last = None
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if tell is None or length is None or length == _UNDEFINED_LENGTH:
            end = None  # a sequence of undefined length: its end is unknown here
            continue
        if tell + length > size:
            return f"it ends at byte {size}, inside element {elem.tag}, which needs {tell + length} bytes"
        end, last = tell + length, elem.tag
    if len(ds) == 0:
        return f"it ends inside its header ({size} bytes, no data elements)"
    if end is not None and 0 < size - end < 8:
        return f"it ends inside a tag header ({size - end} stray byte(s) after element {last})"
    return None


def _sop_name(ds: Any) -> str:
    uid = getattr(ds, "SOPClassUID", None) or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return f"{getattr(uid, 'name', uid)}" if uid else "unknown SOP class"


def _decode_pixels(ds: Any, path: Path) -> np.ndarray:
    truncated = getattr(ds, "_medssl_truncated", None)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if truncated:
            raise DataError(f"{path}: truncated DICOM file: {truncated}, before any pixel data")
        sop = _sop_name(ds)
        what = f"although its SOP class is {sop}" if "Image" in sop else f"({sop}: not an image)"
        raise DataError(f"{path}: DICOM file has no pixel data {what}")
    try:
        tsyntax = ds.file_meta.TransferSyntaxUID
        ts_name = f"{tsyntax.name} ({tsyntax})"
    except AttributeError:
        ts_name = "unknown transfer syntax"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:
        msg = str(exc)
        if truncated:
            raise DataError(f"{path}: truncated or corrupt DICOM: the file is truncated, {truncated}") from exc
        if "missing required" in msg.lower() or "plugin" in msg.lower() or "decod" in msg.lower() \
                or "not supported" in msg.lower() or "handler" in msg.lower():
            raise DataError(
                f"{path}: cannot decode pixel data in {ts_name} ({type(exc).__name__}: {msg.splitlines()[0]}). "
                "Install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg for JPEG / JPEG-LS / JPEG 2000, "
                "or convert the file (e.g. `gdcmconv --raw`)"
            ) from exc
        raise DataError(
            f"{path}: truncated or corrupt DICOM pixel data in {ts_name} "
            f"({type(exc).__name__}: {msg.splitlines()[0] if msg else ''})"
        ) from exc
    return np.asarray(arr)


def _dicom_spacing(ds: Any, frames: bool) -> tuple[float, ...] | None:
    ps = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    try:
        hw = (float(ps[0]), float(ps[1])) if ps is not None else None
    except (TypeError, ValueError, IndexError):
        hw = None
    if not frames:
        return hw
    dz = _first(getattr(ds, "SpacingBetweenSlices", None)) or _first(getattr(ds, "SliceThickness", None))
    if hw is None and dz is None:
        return None
    return (dz or 1.0, *(hw or (1.0, 1.0)))


def _dicom_to_result(ds: Any, path: Path, arr: np.ndarray) -> ReadResult:
    """Modality LUT, photometric handling, channel layout for one decoded DICOM dataset."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    n_frames = int(_first(getattr(ds, "NumberOfFrames", 1)) or 1)
    bits = int(getattr(ds, "BitsStored", 0) or 0) or None
    try:
        if spp == 1:
            if photometric == "PALETTE COLOR":
                from pydicom.pixels import apply_color_lut

                arr = apply_color_lut(arr, ds)
                spp = 3
                bits = 16 if int(np.max(arr, initial=0)) > 255 else 8  # palette entries are 8 or 16 bit
            else:
                arr = apply_modality_lut(arr, ds)
        elif photometric.startswith("YBR") and not getattr(ds, "_medssl_rgb", False):
            # pydicom 3 converts YBR_FULL(_422) to RGB when decoding; JPEG-coded YBR is converted by the codec
            if photometric in ("YBR_FULL", "YBR_FULL_422") and _looks_ybr(arr):
                arr = convert_color_space(arr, photometric, "RGB")
    except Exception as exc:
        raise DataError(f"{path}: invalid DICOM LUT or colour attributes ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr, dtype=np.float32)
    window = None
    voi = None
    if spp == 1:
        c = _first(getattr(ds, "WindowCenter", None))
        w = _first(getattr(ds, "WindowWidth", None))
        if c is not None and w is not None and w > 0:
            window = (c, w)
        if "VOILUTSequence" in ds:
            def voi(x: np.ndarray, _ds: Any = ds) -> np.ndarray:
                return np.asarray(apply_voi_lut(x, _ds), dtype=np.float32)

        if photometric == "MONOCHROME1":
            slope = _first(getattr(ds, "RescaleSlope", 1.0)) or 1.0
            intercept = _first(getattr(ds, "RescaleIntercept", 0.0)) or 0.0
            if slope == 1.0 and intercept == 0.0 and bits:
                top = float(2**bits - 1)  # invert within the stored range: stays in the file's units
            else:
                top = 0.0  # negate: brighter = higher, units flipped in sign
            arr = top - arr
            if window is not None:
                window = (top - window[0], window[1])
            if voi is not None:
                inner = voi

                def voi(x: np.ndarray, _inner: Callable = inner, _top: float = top) -> np.ndarray:
                    y = _inner(_top - x)  # the LUT applies to the stored orientation; invert its output
                    return y.max() + y.min() - y

    # layout: (frames?, H, W, samples?) -> channels first
    if n_frames > 1:
        if spp == 1:
            arr = arr[None]  # (1, F, H, W)
        else:
            arr = np.moveaxis(arr, -1, 0)  # (3, F, H, W)
        dims = 3
    else:
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3 and spp > 1:
            arr = np.moveaxis(arr, -1, 0)
        else:
            raise DataError(f"{path}: unexpected DICOM pixel array shape {arr.shape} for {n_frames} frame(s)")
        dims = 2
    modality = str(getattr(ds, "Modality", "") or "") or None
    spacing = _dicom_spacing(ds, frames=n_frames > 1)
    pixels = np.ascontiguousarray(arr, dtype=np.float32)
    return ReadResult(pixels, dims, spacing, bits, window, modality, str(path), voi)


def _looks_ybr(arr: np.ndarray) -> bool:
    """pydicom 3 already returns RGB for uncompressed YBR; this is a guard for older handlers (always False)."""
    return False


def read_dicom(path: Path) -> ReadResult:
    """One DICOM file (single- or multi-frame)."""
    ds = _dcmread(path)
    arr = _decode_pixels(ds, path)
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if rows and cols and arr.shape[-2:] != (rows, cols) and arr.shape[-3:-1] != (rows, cols):
        raise DataError(f"{path}: decoded pixel shape {arr.shape} does not match Rows×Columns {rows}×{cols}")
    return _dicom_to_result(ds, path, arr)


def read_dicom_series(folder: Path) -> ReadResult:
    """A folder holding the DICOM slices of ONE series → a ``(1, D, H, W)`` volume.

    Slices are sorted by their position along the slice normal; the slice spacing is the median distance
    between consecutive positions. Each slice gets its own modality LUT (rescale may differ per slice).
    """
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    files = [f for f in files if _suffix(f) in DICOM_SUFFIXES or _is_dicom_file(f)]
    if not files:
        raise DataError(f"{folder}: folder holds no DICOM files (a DICOM series folder was expected)")
    slices = []
    series: set[str] = set()
    for f in files:
        ds = _dcmread(f)
        series.add(str(getattr(ds, "SeriesInstanceUID", "")))
        slices.append((f, ds))
    if len(series) > 1:
        raise DataError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    positions = []
    normal = None
    iop = getattr(slices[0][1], "ImageOrientationPatient", None)
    if iop is not None and len(iop) == 6:
        r, c = np.array(iop[:3], float), np.array(iop[3:], float)
        normal = np.cross(r, c)
    for _f, ds in slices:
        ipp = getattr(ds, "ImagePositionPatient", None)
        if normal is not None and ipp is not None and len(ipp) == 3:
            positions.append(float(np.dot(normal, np.array(ipp, float))))
        else:
            positions.append(None)
    if all(p is not None for p in positions):
        order = np.argsort(np.array(positions, dtype=float), kind="stable")
        pos = np.array(positions, dtype=float)[order]
        dz = float(np.median(np.diff(pos))) if len(pos) > 1 else None
        if dz is not None and dz == 0.0:
            raise DataError(f"{folder}: several slices share one position (duplicate slices in the series)")
    else:
        inst = [_first(getattr(ds, "InstanceNumber", None)) for _, ds in slices]
        numbers = np.array([i if i is not None else k for k, i in enumerate(inst)], dtype=float)
        order = np.argsort(numbers, kind="stable")
        first = slices[0][1]
        dz = _first(getattr(first, "SpacingBetweenSlices", None)) or _first(getattr(first, "SliceThickness", None))
    planes = []
    first = None
    for k in order:
        f, ds = slices[int(k)]
        res = _dicom_to_result(ds, f, _decode_pixels(ds, f))
        if res.spatial_dims != 2 or res.channels != 1:
            raise DataError(f"{f}: a series slice must be a single-frame grayscale image, got shape {res.array.shape}")
        if first is None:
            first = res
        elif res.array.shape != first.array.shape:
            raise DataError(f"{f}: slice shape {res.array.shape[1:]} differs from the series' {first.array.shape[1:]}")
        planes.append(res.array[0])
    assert first is not None
    vol = np.stack(planes)  # (k, j, i): slices along the normal, rows, columns
    row_sp, col_sp = first.spacing or (1.0, 1.0)
    if normal is None:  # no orientation: take the axial LPS default
        r, c = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
        normal = np.cross(r, c)
    ipp = getattr(slices[int(order[0])][1], "ImagePositionPatient", None)
    origin = np.array(ipp, float) if ipp is not None and len(ipp) == 3 else np.zeros(3)
    lps = np.eye(4)
    # column index i runs along the row cosine, row index j along the column cosine (DICOM PS3.3 C.7.6.2.1.1)
    lps[:3, 0], lps[:3, 1] = r * col_sp, c * row_sp
    lps[:3, 2] = normal / (np.linalg.norm(normal) or 1.0) * (abs(dz) if dz else 1.0)
    lps[:3, 3] = origin
    from .volumes import LPS_TO_RAS

    res = _canonical_result(np.transpose(vol, (2, 1, 0)), LPS_TO_RAS @ lps, folder)
    res.bit_depth, res.window, res.modality = first.bit_depth, first.window, first.modality
    return res


# -- volumes ------------------------------------------------------------------------------------------
def _volume_layout(arr: np.ndarray, path: Path, spacing: tuple[float, ...], channels_last: bool) -> ReadResult:
    """Arrays in ``(D, H, W[, C])`` order (channels last when ``channels_last``) → a ReadResult."""
    if channels_last and arr.ndim >= 3 and arr.shape[-1] <= _MAX_CHANNELS and arr.ndim in (3, 4):
        chans = arr.shape[-1]
        spatial = arr.shape[:-1]
        arr = np.moveaxis(arr, -1, 0)
    else:
        chans, spatial = 1, arr.shape
        arr = arr[None]
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) == 3 and spatial[0] == 1:
        arr, spatial, spacing = arr[:, 0], spatial[1:], spacing[1:]
    if len(spatial) not in (2, 3) or min(spatial) < 1:
        raise DataError(f"{path}: expected a 2D image or 3D volume, "
                        f"got spatial shape {spatial} with {chans} channel(s)")
    voxel = tuple(float(s) for s in spacing[-len(spatial):])
    return ReadResult(np.ascontiguousarray(arr, dtype=np.float32), len(spatial), voxel,
                      None, None, None, str(path))


def read_nifti(path: Path) -> ReadResult:
    """NIfTI-1/2 → closest canonical (RAS+) orientation → ``(D, H, W) = (S, A, R)`` axes (affine kept).

    3D volumes, 4D files whose 4th axis has at most 4 entries (channels: modalities, vector data) and 5D
    files with a singleton 4th axis are accepted; time series and other shapes are an error.
    A voxel size of 0 or a non-finite one in the header is an error (nibabel would silently take 0 as 1 mm),
    and so is a header whose shape needs more memory than the machine has (checked before reading).
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
            with ImageOpener(str(path)) as fh:  # the header as written, before nibabel's fixes
                pixdim = type(img.header).from_fileobj(fh, check=False)["pixdim"]
        check_memory(path, img.shape, 4)
        spatial = [float(v) for v in pixdim[1 : 1 + min(3, len(img.shape))]]
        if not all(math.isfinite(v) and v != 0 for v in spatial):
            raise DataError(f"{path}: invalid voxel size {tuple(spatial)} in the NIfTI header (pixdim[1..3] must be "
                            "finite and non-zero)")
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms())
        affine = np.asarray(img.affine, dtype=float)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: truncated or corrupt NIfTI ({type(exc).__name__}: {exc})") from exc
    shape = data.shape
    if data.ndim == 5 and shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim == 2:
        arr = data.T  # (x, y) -> (H=y, W=x)
        return _volume_layout(arr, path, (zooms[1], zooms[0]), channels_last=False)
    if data.ndim == 4 and data.shape[3] > _MAX_CHANNELS:
        raise DataError(
            f"{path}: 4D NIfTI with {data.shape[3]} volumes (shape {shape}); medssl reads 3D volumes or up to "
            f"{_MAX_CHANNELS} channels — split the time series into 3D files"
        )
    if data.ndim in (3, 4):
        return _canonical_result(data, affine, path)
    raise DataError(f"{path}: NIfTI with unsupported dimensions {shape} "
                    f"(expected 3D, or 4D with ≤ {_MAX_CHANNELS} channels)")


def _canonical_result(data: np.ndarray, affine: np.ndarray, path: Path) -> ReadResult:
    """A volume in voxel order ``(i, j, k[, C])`` with its RAS affine → a ReadResult in the canonical layout
    (``(C, S, A, R)``, spacing ``(z, y, x)``, affine and orientation code kept; :mod:`medssl.data.volumes`).
    A single slice (``S`` of 1) becomes a 2D image ``(C, A, R)``."""
    from .volumes import canonical, spacing_of

    arr, aff, code = canonical(data, affine, path)
    if min(arr.shape[1:]) < 1:
        raise DataError(f"{path}: expected a 2D image or 3D volume, got spatial shape {arr.shape[1:]}")
    spacing = spacing_of(aff)
    if arr.shape[1] == 1:
        return ReadResult(np.ascontiguousarray(arr[:, 0], dtype=np.float32), 2, spacing[1:], None, None, None,
                          str(path), orientation=code)
    return ReadResult(np.ascontiguousarray(arr, dtype=np.float32), 3, spacing, None, None, None, str(path),
                      affine=aff, orientation=code)


def read_itk(path: Path) -> ReadResult:
    """MHA / MHD / NRRD through SimpleITK; 3D images go to the canonical ``(S, A, R)`` layout through their
    direction matrix and origin (ITK's LPS world), vector pixels become channels; 2D images keep ``(H, W)``.

    The header is read first: a size beyond the machine's memory or a spacing that is not finite and > 0 is
    an error before any pixel is read.
    """
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise DataError(f"{path}: reading {_suffix(path)} needs SimpleITK (pip install SimpleITK)") from exc
    kind = _suffix(path).lstrip(".").upper()
    try:
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()
        header_spacing = tuple(float(s) for s in info.GetSpacing())
        header_size = (*info.GetSize(), info.GetNumberOfComponents())
    except Exception as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[-200:] or type(exc).__name__
        raise DataError(f"{path}: truncated or corrupt {kind} file ({detail})") from exc
    check_memory(path, header_size, 4)
    if not all(math.isfinite(v) and v > 0 for v in header_spacing):
        raise DataError(f"{path}: invalid spacing {header_spacing} in the {kind} header (must be finite and > 0)")
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        spacing = tuple(float(s) for s in reversed(img.GetSpacing()))
        vector = img.GetNumberOfComponentsPerPixel() > 1
        dim = img.GetDimension()
        direction = np.array(img.GetDirection(), dtype=float).reshape(dim, dim)
        origin = np.array(img.GetOrigin(), dtype=float)
    except Exception as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[-200:] or type(exc).__name__
        raise DataError(f"{path}: truncated or corrupt {kind} file ({detail})") from exc
    if dim == 3 and (not vector or arr.shape[-1] <= _MAX_CHANNELS):
        from .volumes import LPS_TO_RAS

        lps = np.eye(4)
        lps[:3, :3] = direction @ np.diag(img.GetSpacing())
        lps[:3, 3] = origin
        data = np.transpose(arr, (2, 1, 0, 3) if vector else (2, 1, 0))  # (k, j, i[, c]) -> (i, j, k[, c])
        res = _canonical_result(data, LPS_TO_RAS @ lps, path)
    else:
        res = _volume_layout(arr, path, spacing, channels_last=vector)
    res.modality = _suffix(path).lstrip(".")
    return res


# -- intensity ----------------------------------------------------------------------------------------
def to_unit_range(
    result: ReadResult,
    mode: str = "auto",
    percentiles: Sequence[float] = (0.5, 99.5),
    window: Sequence[float] | None = None,
) -> np.ndarray:
    """Map a :class:`ReadResult`'s array to float32 ``[0, 1]``.

    Modes:
        ``window``: a DICOM-style linear window (centre, width) — the ``window`` argument if given (e.g.
            ``(40, 400)`` for an abdomen CT), else the file's VOI LUT or window; an error without either.
        ``percentile``: clip to the image's ``percentiles`` (over all channels) and rescale.
        ``minmax``: the image's minimum → 0, maximum → 1.
        ``bitdepth``: divide by ``2**bit_depth - 1`` (integer sources).
        ``zscore``: per-image z-score, clipped to ±3 σ and mapped to ``[0, 1]`` (``(z + 3) / 6``), so that
            z-scored MR keeps the model's input range.
        ``auto``: a given ``window``, else the file's window / VOI LUT (DICOM), else ``bitdepth`` for 8-bit
            sources (PNG/JPEG: keeps their absolute brightness), else ``percentile`` (16-bit images, MR, CT
            without a window, NIfTI / MHA volumes).

    A constant image maps to a constant output (0 in ``percentile`` / ``minmax`` / ``zscore``).

    Raises:
        DataError: unknown mode, ``window`` without a window to apply, or an array holding NaN / ±inf (they would
            make the percentiles, min / max or mean NaN and blank the whole image).
    """
    x = result.array
    check_finite(x, result.source)
    if mode not in INTENSITY_MODES:
        raise DataError(f"unknown intensity mode '{mode}'; choose one of {', '.join(INTENSITY_MODES)}")
    if mode == "auto":
        if window is not None or result.window is not None or result.voi_lut is not None:
            mode = "window"
        elif result.bit_depth == 8:
            mode = "bitdepth"
        else:
            mode = "percentile"
    if mode == "window":
        if window is not None:
            c, w = float(window[0]), float(window[1])
        elif result.voi_lut is not None:
            y = result.voi_lut(x)
            lo, hi = float(y.min()), float(y.max())
            return _finish((y - lo) / (hi - lo) if hi > lo else np.zeros_like(y))
        elif result.window is not None:
            c, w = result.window
        else:
            raise DataError(f"{result.source}: intensity mode 'window' needs a window: "
                            "the file has none, pass one (centre, width)")
        # DICOM PS3.3 C.11.2.1.2.1 linear window
        w = max(w, 1.0) if w >= 1 else max(w, 1e-6)
        y = (x - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5 if w > 1 else (x - c) / w + 0.5
        return _finish(y)
    if mode == "bitdepth":
        bits = result.bit_depth or (8 if float(x.max(initial=0)) <= 255 else 16)
        return _finish(x / float(2**bits - 1))
    if mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return _finish((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x))
    if mode == "percentile":
        p_lo, p_hi = float(percentiles[0]), float(percentiles[1])
        if not 0.0 <= p_lo < p_hi <= 100.0:
            raise DataError(f"percentiles must satisfy 0 <= low < high <= 100, got {tuple(percentiles)}")
        lo, hi = (float(v) for v in np.percentile(x, [p_lo, p_hi]))
        if hi <= lo:
            lo, hi = float(x.min()), float(x.max())
        return _finish((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x))
    # zscore
    mu, sd = float(x.mean()), float(x.std())
    z = (x - mu) / sd if sd > 0 else np.zeros_like(x)
    return _finish((np.clip(z, -3.0, 3.0) + 3.0) / 6.0)


def _finish(y: np.ndarray) -> np.ndarray:
    y = np.clip(np.nan_to_num(np.asarray(y, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.ascontiguousarray(y, dtype=np.float32)


def describe(result: ReadResult) -> dict[str, Any]:
    """A short, JSON-friendly description used by ``medssl inspect``."""
    x = result.array
    return {
        "shape": list(result.shape),
        "channels": result.channels,
        "spatial_dims": result.spatial_dims,
        "spacing": [round(s, 4) for s in result.spacing] if result.spacing else None,
        "bit_depth": result.bit_depth,
        "modality": result.modality,
        "min": float(x.min()) if x.size else math.nan,
        "max": float(x.max()) if x.size else math.nan,
    }
