"""Hostile data through the real CLI, in subprocesses (issue 13).

Every case builds one hostile input in a temporary folder — bad images, DICOMs, NIfTIs, manifests, npz files,
folders, data settings — and runs ``medssl inspect`` or ``medssl pretrain --max-steps 1`` on it as a user would.
The contract, checked for each:

* the documented exit code: 2 for a user error (the spec, manifest or archive itself is unusable, or a run stops
  on a bad file), ``inspect``'s 1 when it lists unreadable files, 0 where the input is odd but fine (then the
  output still says what is odd, e.g. a constant image or a symlink not followed);
* the offending file, key or row named in the output;
* no ``Traceback`` anywhere, and no hang (each run has a timeout).
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medssl

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from pydicom.data import get_testdata_file  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SRC = str(Path(medssl.__file__).resolve().parents[1])


# -- builders -------------------------------------------------------------------------------------------------
def _png(path: Path, array: np.ndarray | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(seed).integers(0, 256, (12, 12)).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def _png_header(width: int, height: int) -> bytes:
    """PNG signature + IHDR (8-bit gray, ``width`` x ``height``) + an empty IDAT: a header with no pixels."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _folder_with(tmp: Path, name: str, content: bytes) -> list[str]:
    _png(tmp / "d" / "good0.png")
    _png(tmp / "d" / "good1.png", seed=1)
    (tmp / "d" / name).write_bytes(content)
    return ["inspect", "--data", f"folder:{tmp / 'd'}"]


def _nii(path: Path, array: np.ndarray) -> Path:
    nib.Nifti1Image(array, np.eye(4)).to_filename(path)
    return path


def _vol(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, (8, 8, 8)).astype(np.float32)


def _volumes_with(tmp: Path, name: str, make: Callable[[Path], object]) -> list[str]:
    _nii(tmp / "good.nii.gz", _vol())
    make(tmp / name)
    (tmp / "v.csv").write_text(f"path\ngood.nii.gz\n{name}\n")
    return ["inspect", "--data", f"volumes:{tmp / 'v.csv'}"]


def _dicoms_with(tmp: Path, name: str, content: bytes) -> list[str]:
    (tmp / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (tmp / name).write_bytes(content)
    (tmp / "d.csv").write_text(f"path\nct.dcm\n{name}\n")
    return ["inspect", "--data", f"csv:{tmp / 'd.csv'}"]


def _manifest(tmp: Path, text: str | bytes, n: int = 3) -> list[str]:
    for i in range(n):
        _png(tmp / "img" / f"c{i}.png", seed=i)
    path = tmp / "m.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["inspect", "--data", f"csv:{path}"]


def _npz_arrays(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 7), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = np.random.default_rng(n).integers(0, 256, (n, 8, 8)).astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None].astype(np.uint8)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


def _npz(tmp: Path, **changes: np.ndarray | None) -> list[str]:
    np.savez(tmp / "x.npz", **_npz_arrays(**changes))
    return ["inspect", "--data", f"npz:{tmp / 'x.npz'}"]


def _npz_members(tmp: Path, members: dict[str, bytes]) -> list[str]:
    with zipfile.ZipFile(tmp / "x.npz", "w") as z:
        for key, arr in _npz_arrays().items():
            buf = io.BytesIO()
            np.save(buf, arr)
            z.writestr(f"{key}.npy", buf.getvalue())
        for name, data in members.items():
            z.writestr(name, data)
    return ["inspect", "--data", f"npz:{tmp / 'x.npz'}"]


class _Payload:
    """Unpickling it would create the file ``pwned`` (it must never happen)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_npz(tmp: Path) -> list[str]:
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(str(tmp / "pwned"))], dtype=object), allow_pickle=True)
    return _npz_members(tmp, {"extra.npy": buf.getvalue()})


def _header_bomb_npz(tmp: Path) -> list[str]:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (2**40,)})
    return _npz_members(tmp, {"big.npy": header.getvalue()})


def _single_npy(tmp: Path) -> list[str]:
    with open(tmp / "x.npz", "wb") as f:
        np.save(f, np.zeros(3))
    return ["inspect", "--data", f"npz:{tmp / 'x.npz'}"]


def _nifti_patched(path: Path, offset: int, fmt: str, *values: float) -> None:
    _nii(path, _vol())
    raw = bytearray(path.read_bytes())
    raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    path.write_bytes(bytes(raw))


def _truncated_nii(path: Path) -> None:
    _nii(path, _vol(3))
    path.write_bytes(path.read_bytes()[:200])


def _mha(path: Path, size: str, spacing: str) -> None:
    head = "ObjectType = Image\nNDims = 3\nDimSize = {}\nElementSpacing = {}\nElementType = MET_UCHAR\n" \
           "ElementDataFile = LOCAL\n"
    path.write_bytes(head.format(size, spacing).encode() + bytes(range(8)))


def _slope0(tmp: Path) -> list[str]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.RescaleSlope = 0
    buf = io.BytesIO()
    ds.save_as(buf)
    return _dicoms_with(tmp, "slope0.dcm", buf.getvalue())


def _mixed_channels(tmp: Path) -> list[str]:
    rng = np.random.default_rng(0)
    d = tmp / "d"
    _png(d / "gray.png")
    Image.fromarray(rng.integers(0, 256, (10, 14, 3)).astype(np.uint8)).save(d / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 4)).astype(np.uint8)).save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 2)).astype(np.uint8), mode="LA").save(d / "la.png")
    Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).convert("P").save(d / "palette.png")
    Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).save(d / "jpeg.jpg")
    return ["inspect", "--data", f"folder:{d}"]


def _sixteen_bit(tmp: Path) -> list[str]:
    _png(tmp / "d" / "a16.png", np.random.default_rng(0).integers(0, 65536, (12, 12)).astype(np.uint16))
    _png(tmp / "d" / "b16.png", np.random.default_rng(1).integers(0, 65536, (12, 12)).astype(np.uint16))
    return ["inspect", "--data", f"folder:{tmp / 'd'}"]


def _symlink_to_root(tmp: Path) -> list[str]:
    _png(tmp / "d" / "cls" / "a.png")
    (tmp / "d" / "cls" / "everything").symlink_to("/", target_is_directory=True)
    return ["inspect", "--data", f"folder:{tmp / 'd'}"]


def _symlink_cycle(tmp: Path) -> list[str]:
    _png(tmp / "d" / "a" / "x.png")
    _png(tmp / "d" / "b" / "y.png", seed=1)
    (tmp / "d" / "a" / "to_b").symlink_to(tmp / "d" / "b", target_is_directory=True)
    (tmp / "d" / "b" / "to_a").symlink_to(tmp / "d" / "a", target_is_directory=True)
    (tmp / "d" / "b" / "up").symlink_to(tmp / "d", target_is_directory=True)
    return ["inspect", "--data", f"folder:{tmp / 'd'}"]


def _float_tiff(tmp: Path) -> list[str]:
    _png(tmp / "d" / "good.png")
    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32)).save(tmp / "d" / "float.tif")
    return ["inspect", "--data", f"folder:{tmp / 'd'}"]


def _loose_and_classes(tmp: Path) -> list[str]:
    _png(tmp / "d" / "benign" / "a.png")
    _png(tmp / "d" / "loose.png", seed=1)
    return ["inspect", "--data", f"folder:{tmp / 'd'}"]


def _all_unreadable(tmp: Path) -> list[str]:
    (tmp / "d").mkdir()
    (tmp / "d" / "a.png").write_text("text")
    (tmp / "d" / "b.jpg").write_bytes(b"")
    return ["inspect", "--data", f"folder:{tmp / 'd'}"]


def _empty_folder(tmp: Path) -> list[str]:
    (tmp / "d" / "sub").mkdir(parents=True)
    (tmp / "d" / "sub" / "notes.txt").write_text("no images here")
    return ["inspect", "--data", f"folder:{tmp / 'd'}"]


def _dotdot(tmp: Path) -> list[str]:
    _png(tmp / "outside.png")
    _png(tmp / "sub" / "inside.png", seed=1)
    (tmp / "sub" / "m.csv").write_text("path\n../outside.png\ninside.png\n")
    return ["inspect", "--data", f"csv:{tmp / 'sub' / 'm.csv'}"]


def _two_d_for_volumes(tmp: Path) -> list[str]:
    _png(tmp / "slice.png")
    (tmp / "v.csv").write_text("path\nslice.png\n")
    return ["inspect", "--data", f"volumes:{tmp / 'v.csv'}"]


# pretraining: enough training items for one batch of 2 in every case
_PRETRAIN = ["--method", "mocov2", "--image-size", "16", "--batch-size", "2", "--max-steps", "1", "--quiet",
             "--no-cache", "--set", "data.split=all"]


def _pretrain_nan_volume(tmp: Path, skip_bad: bool) -> list[str]:
    rows = ["path"]
    for i in range(4):
        vol = _vol(i)
        if i == 1:
            vol[2, 3, 4] = np.nan
        _nii(tmp / f"v{i}.nii.gz", vol)
        rows.append(f"v{i}.nii.gz")
    (tmp / "v.csv").write_text("\n".join(rows) + "\n")
    return ["pretrain", "--data", f"volumes:{tmp / 'v.csv'}", "--out", str(tmp / "run"), *_PRETRAIN,
            *(["--skip-bad"] if skip_bad else [])]


def _pretrain_bad_headers(tmp: Path, skip_bad: bool) -> list[str]:
    for i in range(3):
        _png(tmp / "d" / f"good{i}.png", seed=i)
    (tmp / "d" / "zero.png").write_bytes(b"")
    (tmp / "d" / "text.png").write_text("not an image")
    (tmp / "d" / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    return ["pretrain", "--data", f"folder:{tmp / 'd'}", "--out", str(tmp / "run"), *_PRETRAIN,
            *(["--skip-bad"] if skip_bad else [])]


def _pretrain_set(*overrides: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        sets = [a for o in overrides for a in ("--set", o)]
        return ["pretrain", "--data", "phantom2d:8", "--out", str(tmp / "run"), *_PRETRAIN, *sets]

    return make


def _pretrain_npz_bomb(tmp: Path) -> list[str]:
    argv = _npz(tmp, train_labels=np.array([[0]] * 6 + [[2**40]], np.int64))
    return ["pretrain", "--data", argv[-1], "--out", str(tmp / "run"), *_PRETRAIN]


def _skipped(tmp: Path) -> list[str]:
    with open(tmp / "run" / "skipped.csv", newline="") as f:
        return sorted(Path(r["path"]).name for r in csv.DictReader(f))


# -- the cases ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], list[str]]
    code: int
    needles: tuple[str, ...]
    check: Callable[[Path], None] | None = None


BAD_FILE = 1  # `medssl inspect`: readable spec, but files it lists as unreadable / inconsistent (documented)
CT = Path(get_testdata_file("CT_small.dcm")).read_bytes()

CASES = [
    # images and folders
    Case("png-zero-bytes", lambda t: _folder_with(t, "zero.png", b""), BAD_FILE, ("zero.png: empty file (0 bytes)",)),
    Case("png-is-text", lambda t: _folder_with(t, "text.png", b"just text"), BAD_FILE,
         ("text.png: not a readable image",)),
    Case("png-decompression-bomb", lambda t: _folder_with(t, "bomb.png", _png_header(100_000, 100_000)), BAD_FILE,
         ("bomb.png: refused as a possible decompression bomb",)),
    Case("png-0x0", lambda t: _folder_with(t, "empty0.png", _png_header(0, 0)), BAD_FILE,
         ("empty0.png: not a readable image",)),
    Case("png-truncated-pixels",
         lambda t: _folder_with(t, "cut.png", _png(t / "src.png", np.random.default_rng(9).integers(
             0, 256, (64, 64)).astype(np.uint8)).read_bytes()[:300]), BAD_FILE, ("cut.png", "truncated or corrupt")),
    Case("tiff-float32-mode", _float_tiff, BAD_FILE, ("float.tif: unsupported image mode 'F'",)),
    Case("folder-all-unreadable", _all_unreadable, 2, ("none of its 2 image(s) can be read",)),
    Case("folder-without-images", _empty_folder, 2, ("no images found",)),
    Case("folder-loose-and-class-images", _loose_and_classes, 2, ("lie directly in the folder", "loose.png")),
    Case("folder-symlink-to-fs-root", _symlink_to_root, 0,
         ("not following 1 symlinked folder(s) that lead out of it", "everything -> /", "items: 1")),
    Case("folder-symlink-cycle", _symlink_cycle, 0, ("items: 2", "all files readable")),
    Case("folder-mixed-channels", _mixed_channels, 0, ("items: 6", "channels: 3", "all files readable")),
    Case("png-16-bit", _sixteen_bit, 0, ("bit depths: 16 x2", "all files readable")),
    # DICOM
    Case("dicom-text-file", lambda t: _dicoms_with(t, "notes.dcm", b"patient: nobody\n" * 20), BAD_FILE,
         ("notes.dcm: not a DICOM file",)),
    Case("dicom-cut-at-200-bytes", lambda t: _dicoms_with(t, "cut.dcm", CT[:200]), BAD_FILE,
         ("cut.dcm: truncated DICOM file: it ends inside its header",)),
    Case("dicom-cut-in-pixel-data", lambda t: _dicoms_with(t, "cut.dcm", CT[:7000]), BAD_FILE,
         ("cut.dcm: truncated or corrupt DICOM: the file is truncated, it ends at byte 7000",)),
    Case("dicom-pydicom-MR_truncated",
         lambda t: _dicoms_with(t, "MR_truncated.dcm", Path(get_testdata_file("MR_truncated.dcm")).read_bytes()),
         BAD_FILE, ("MR_truncated.dcm: truncated or corrupt DICOM: the file is truncated",)),
    Case("dicom-100-bytes", lambda t: _dicoms_with(t, "short.dcm", CT[:100]), BAD_FILE,
         ("short.dcm: not a DICOM file, or truncated: 100 bytes",)),
    Case("dicom-structured-report",
         lambda t: _dicoms_with(t, "sr.dcm", Path(get_testdata_file("test-SR.dcm")).read_bytes()), BAD_FILE,
         ("sr.dcm: DICOM file has no pixel data (Comprehensive SR Storage: not an image)",)),
    Case("dicom-rescale-slope-0", _slope0, 0, ("slope0.dcm: constant image: every pixel is -1024", "warnings: 1")),
    # NIfTI and other volumes
    Case("nifti-nan-voxel", lambda t: _volumes_with(t, "nan.nii.gz", lambda p: _nii(p, np.where(
        np.arange(512).reshape(8, 8, 8) == 100, np.nan, _vol(1)).astype(np.float32))), BAD_FILE,
         ("nan.nii.gz: 1 non-finite value(s) (1 NaN, 0 inf) among 512",)),
    Case("nifti-inf-voxels", lambda t: _volumes_with(t, "inf.nii.gz", lambda p: _nii(p, np.full(
        (8, 8, 8), np.inf, np.float32))), BAD_FILE, ("inf.nii.gz: 512 non-finite value(s) (0 NaN, 512 inf)",)),
    Case("nifti-zero-voxel-size", lambda t: _volumes_with(t, "zero.nii", lambda p: _nifti_patched(
        p, 80, "<f", 0.0)), BAD_FILE, ("zero.nii: invalid voxel size (0.0, 1.0, 1.0)",)),
    Case("nifti-5d", lambda t: _volumes_with(t, "five.nii.gz", lambda p: _nii(p, np.zeros(
        (4, 4, 4, 2, 3), np.float32))), BAD_FILE, ("five.nii.gz: NIfTI with unsupported dimensions (4, 4, 4, 2, 3)",)),
    Case("nifti-time-series", lambda t: _volumes_with(t, "series.nii.gz", lambda p: _nii(p, np.zeros(
        (4, 4, 4, 10), np.float32))), BAD_FILE, ("series.nii.gz: 4D NIfTI with 10 volumes",)),
    Case("nifti-truncated", lambda t: _volumes_with(t, "trunc.nii.gz", _truncated_nii), BAD_FILE,
         ("trunc.nii.gz: truncated or corrupt NIfTI",)),
    Case("nifti-header-declares-100-TiB", lambda t: _volumes_with(t, "big.nii", lambda p: _nifti_patched(
        p, 42, "<hhh", 30000, 30000, 30000)), BAD_FILE, ("big.nii: its arrays need 100582.8 GiB",)),
    Case("nifti-constant-volume", lambda t: _volumes_with(t, "const.nii.gz", lambda p: _nii(p, np.full(
        (8, 8, 8), 5.0, np.float32))), 0, ("const.nii.gz: constant image: every pixel is 5",)),
    Case("mha-zero-spacing", lambda t: _volumes_with(t, "s0.mha", lambda p: _mha(p, "2 2 2", "0 1 1")), BAD_FILE,
         ("s0.mha: invalid spacing (0.0, 1.0, 1.0)",)),
    Case("volumes-with-a-2d-file", _two_d_for_volumes, 2, ("volumes: needs 3D files", "slice.png is 2D")),
    # manifests
    Case("csv-patient-in-train-and-test", lambda t: _manifest(
        t, "path,label,patient_id,split\nimg/c0.png,0,P1,train\nimg/c1.png,1,P2,train\nimg/c2.png,0,P1,test\n"), 2,
         ("m.csv: patient 'P1' is in split 'train' (row 1 (line 2)) and 'test' (row 3 (line 4)): test leakage",)),
    Case("csv-same-file-two-labels", lambda t: _manifest(t, "path,label\nimg/c0.png,a\nimg/c1.png,b\nimg/c0.png,b\n"),
         2, ("m.csv: row 1 (line 2) and row 3 (line 4) list the same file", "with different label ('a' and 'b')")),
    Case("csv-same-file-train-and-test", lambda t: _manifest(
        t, "path,split\nimg/c0.png,train\nimg/c1.png,train\nimg/./c0.png,test\n"), 2,
         ("in splits 'train' and 'test': test leakage",)),
    Case("csv-label-1-and-1.0", lambda t: _manifest(t, "path,label\nimg/c0.png,1\nimg/c1.png,0\nimg/c2.png,1.0\n"), 2,
         ("m.csv: labels '1' (row 1 (line 2)) and '1.0' (row 3 (line 4)) are the same number written two ways",)),
    Case("csv-label-nan", lambda t: _manifest(t, "path,label\nimg/c0.png,0\nimg/c1.png,nan\n"), 2,
         ("m.csv: row 2 (line 3): label 'nan' looks like a missing value",)),
    Case("csv-semicolons", lambda t: _manifest(t, "path;label\nimg/c0.png;0\n"), 2,
         ("m.csv: no 'path' column (columns: path;label); it looks ';'-separated",)),
    Case("csv-no-path-column", lambda t: _manifest(t, "file,label\nimg/c0.png,0\n"), 2,
         ("m.csv: no 'path' column (columns: file, label)",)),
    Case("csv-latin-1", lambda t: _manifest(t, "path,label\nimg/c0.png,bénin\n".encode("latin-1")), 2,
         ("cannot read manifest", "m.csv")),
    Case("csv-row-file-missing", lambda t: _manifest(t, "path\nimg/c0.png\nimg/gone.png\n"), 2,
         ("m.csv: row 2 (line 3): file not found: img/gone.png",)),
    Case("csv-with-bom", lambda t: _manifest(t, "\ufeffpath,label\nimg/c0.png,a\nimg/c1.png,b\n"), 0,
         ("items: 2", "classes: a, b")),
    Case("csv-path-leaving-its-folder", _dotdot, 0, ("items: 2", "all files readable")),
    # npz archives
    Case("npz-label-2**40", lambda t: _npz(t, train_labels=np.array([[0]] * 6 + [[2**40]], np.int64)), 2,
         ("x.npz: 'train_labels' holds label 1099511627776", "below 10000")),
    Case("npz-nan-label", lambda t: _npz(t, val_labels=np.array([[0.0], [np.nan]])), 2,
         ("x.npz: 'val_labels' has dtype float64 with 1 NaN / inf label(s)",)),
    Case("npz-label-ids", lambda t: _npz(t, train_labels=np.arange(500, 507)[:, None]), 2,
         ("x.npz: the largest label is 506, so 507 classes for 12 images",)),
    Case("npz-pickled-object-array", _pickled_npz, 2,
         ("x.npz: key 'extra' holds Python objects (a pickled object array); medssl never unpickles",),
         check=lambda t: None if not (t / "pwned").exists() else pytest.fail("the pickle was executed")),
    Case("npz-missing-keys", lambda t: _npz(t, val_images=None), 2, ("x.npz: missing key 'val_images'",)),
    Case("npz-float-images", lambda t: _npz(t, train_images=np.zeros((7, 8, 8), np.float32)), 2,
         ("x.npz: 'train_images' has dtype float32",)),
    Case("npz-header-declares-1-TiB", _header_bomb_npz, 2, ("x.npz: its arrays need 1024.0 GiB",)),
    Case("npz-is-a-single-npy", lambda t: _single_npy(t), 2, ("x.npz: holds a single array",)),
    # pretraining
    Case("pretrain-nan-volume", lambda t: _pretrain_nan_volume(t, skip_bad=False), 2,
         ("v1.nii.gz: 1 non-finite value(s)",)),
    Case("pretrain-nan-volume-skip-bad", lambda t: _pretrain_nan_volume(t, skip_bad=True), 0,
         ("skipped 1 unreadable item(s)",),
         check=lambda t: None if _skipped(t) == ["v1.nii.gz"] else pytest.fail(f"skipped.csv: {_skipped(t)}")),
    Case("pretrain-unreadable-headers", lambda t: _pretrain_bad_headers(t, skip_bad=False), 2,
         ("(and 2 more unreadable file(s)); skip them with --skip-bad",)),
    Case("pretrain-unreadable-headers-skip-bad", lambda t: _pretrain_bad_headers(t, skip_bad=True), 0,
         ("skipped 3 unreadable item(s)",),
         check=lambda t: None if _skipped(t) == ["bomb.png", "text.png", "zero.png"]
         else pytest.fail(str(_skipped(t)))),
    Case("pretrain-npz-label-2**40", _pretrain_npz_bomb, 2, ("x.npz: 'train_labels' holds label 1099511627776",)),
    Case("pretrain-num-workers--1", _pretrain_set("data.num_workers=-1"), 2,
         ("data.num_workers must be >= 0, got -1",)),
    Case("pretrain-percentiles-reversed", _pretrain_set("data.intensity.percentiles=[99,1]"), 2,
         ("data.intensity.percentiles must be [low, high] with low < high",)),
    Case("pretrain-split-test", _pretrain_set("data.split=test"), 2,
         ("data.split must be one of train, train+val, all, got 'test'",)),
    Case("pretrain-window-width-0", _pretrain_set("data.intensity.window=[40,0]"), 2,
         ("data.intensity.window must be [centre, width]",)),
]


def _run(argv: list[str], cwd: Path) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "MEDSSL_CACHE_DIR": str(cwd / "cache")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "medssl", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_the_suite_is_large_enough() -> None:
    hostile = [c for c in CASES if c.code != 0]
    assert len(CASES) >= 50 and len(hostile) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path) -> None:
    argv = case.make(tmp_path)
    code, out, seconds = _run(argv, tmp_path)
    assert "Traceback" not in out, out
    assert code == case.code, f"exit {code}, expected {case.code}:\n{out}"
    for needle in case.needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    if case.code == 2:
        assert "medssl: error: " in out and len([ln for ln in out.splitlines() if "error:" in ln]) == 1, out
    assert seconds < 240, f"took {seconds:.0f} s"  # a hang is caught by the 300 s subprocess timeout
    if case.check is not None:
        case.check(tmp_path)


def test_pickled_npz_never_runs_even_through_numpy_directly(tmp_path: Path) -> None:
    """Sanity of the payload used above: unpickling it does create the marker (so its absence means something)."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(str(marker)))).close()
    assert marker.exists()
