"""Readers on real files: pydicom's and nibabel's test data, SimpleITK-written volumes, Pillow images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medssl.data.readers import read_file, to_unit_range
from medssl.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def dcm(name: str) -> Path:
    p = get_testdata_file(name)
    assert p is not None, name
    return Path(p)


def test_ct_small_applies_rescale_to_hounsfield_units() -> None:
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    r = read_file(dcm("CT_small.dcm"))
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert r.array.shape == (1, 128, 128) and r.spatial_dims == 2
    np.testing.assert_allclose(r.array[0], expected)
    assert r.modality == "CT" and r.bit_depth == int(ds.BitsStored)
    assert r.spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert r.array.min() < -500  # air in HU, impossible without the intercept


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
             "MR_small_implicit.dcm"]
)
def test_compressed_and_big_endian_syntaxes_equal_the_uncompressed_file(name: str) -> None:
    ref = read_file(dcm("MR_small.dcm"))
    r = read_file(dcm(name))
    np.testing.assert_array_equal(r.array, ref.array)
    assert r.window == ref.window == (600.0, 1600.0)


def test_jpeg2000_lossy_and_rgb_files_decode() -> None:
    r = read_file(dcm("JPEG2000.dcm"))
    assert r.array.shape == (1, 1024, 256)
    rgb = read_file(dcm("SC_rgb_rle.dcm"))
    assert rgb.array.shape == (3, 100, 100) and rgb.bit_depth == 8
    # the uncompressed YBR_FULL_422 file becomes RGB close to the RLE RGB original (same test image)
    ybr = read_file(dcm("SC_ybr_full_422_uncompressed.dcm"))
    assert np.abs(ybr.array - rgb.array).mean() < 8


def test_multiframe_becomes_a_volume() -> None:
    r = read_file(dcm("SC_rgb_rle_2frame.dcm"))
    assert r.spatial_dims == 3 and r.array.shape == (3, 2, 100, 100)
    gray = read_file(dcm("rtdose.dcm"))
    assert gray.spatial_dims == 3 and gray.array.shape[0] == 1 and gray.array.shape[1] == 15


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    ref = read_file(dcm("MR_small.dcm"))
    r = read_file(tmp_path / "m1.dcm")
    top = 2 ** int(ds.BitsStored) - 1
    np.testing.assert_allclose(r.array, top - ref.array)
    assert r.window == (top - 600.0, 1600.0)
    # after windowing the two files are mirror images of each other in brightness
    np.testing.assert_allclose(to_unit_range(r), 1.0 - to_unit_range(ref), atol=1e-3)


def test_window_mode_follows_the_dicom_linear_formula() -> None:
    r = read_file(dcm("MR_small.dcm"))
    c, w = r.window
    y = to_unit_range(r, mode="window")
    x = r.array
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    ct = read_file(dcm("CT_small.dcm"))
    y = to_unit_range(ct, window=(40, 400))  # an abdomen window given by the user
    assert y[ct.array < -200].max() == 0.0 and y[ct.array > 300].min() == 1.0
    with pytest.raises(DataError, match="window"):
        to_unit_range(ct, mode="window")


def test_percentile_minmax_zscore_and_bitdepth_modes() -> None:
    r = read_file(dcm("CT_small.dcm"))
    x = r.array
    lo, hi = np.percentile(x, [1, 99])
    np.testing.assert_allclose(to_unit_range(r, "percentile", (1, 99)), np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-6)
    mm = to_unit_range(r, "minmax")
    assert mm.min() == 0.0 and mm.max() == 1.0
    z = to_unit_range(r, "zscore")
    np.testing.assert_allclose(z, np.clip(((x - x.mean()) / x.std() + 3) / 6, 0, 1), atol=1e-5)
    with pytest.raises(DataError, match="unknown intensity mode"):
        to_unit_range(r, "hu")


def test_truncated_and_undecodable_dicoms_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"MR_truncated\.dcm: truncated or corrupt"):
        read_file(dcm("MR_truncated.dcm"))
    with pytest.raises(DataError, match=r"JPEG-lossy\.dcm: cannot decode pixel data in JPEG Extended"):
        read_file(dcm("JPEG-lossy.dcm"))
    good = dcm("CT_small.dcm").read_bytes()
    for frac in (0.05, 0.3, 0.9):
        p = tmp_path / f"cut{frac}.dcm"
        p.write_bytes(good[: int(len(good) * frac)])
        with pytest.raises(DataError, match=p.name):
            read_file(p)
    with pytest.raises(DataError, match="no pixel data"):
        read_file(dcm("rtplan.dcm"))


def test_dicom_series_folder_is_sorted_by_position(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    base = ds.pixel_array.copy()
    folder = tmp_path / "series"
    folder.mkdir()
    z_positions = [10.0, -5.0, 2.5, 5.0]  # written out of order, with names that sort differently
    for k, z in enumerate(z_positions):
        s = pydicom.dcmread(dcm("CT_small.dcm"))
        s.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        s.ImagePositionPatient = [0.0, 0.0, z]
        s.InstanceNumber = k + 1
        s.PixelData = (base + k).astype(base.dtype).tobytes()
        s.save_as(folder / f"img{9 - k}.dcm")
    r = read_file(folder)
    assert r.spatial_dims == 3 and r.array.shape == (1, 4, 128, 128)
    order = np.argsort(z_positions)
    slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    for d, k in enumerate(order):  # rows run to P, columns to L (LPS): flipped to (S, A, R)
        np.testing.assert_allclose(r.array[0, d], ((base + k) * slope + icpt)[::-1, ::-1])
    assert r.spacing[0] == pytest.approx(np.median(np.diff(sorted(z_positions))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM files"):
        read_file(tmp_path / "empty")


def test_nifti_canonical_orientation_and_spacing(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (x, y, z)
    aff = np.diag([1.5, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "ras.nii.gz")
    r = read_file(tmp_path / "ras.nii.gz")
    assert r.array.shape == (1, 6, 5, 4) and r.spacing == (3.0, 2.0, 1.5)
    # value at voxel (x, y, z) sits at (D=z, H=y, W=x): (S, A, R), MONAI's RAS array with its axes reversed
    assert r.array[0, 2, 3, 1] == data[1, 3, 2] and r.orientation == "RAS"
    # the same image stored with a flipped x axis (LAS) reads identically after canonicalisation
    flip = np.diag([-1.5, 2.0, 3.0, 1.0])
    flip[0, 3] = 1.5 * 3
    nib.save(nib.Nifti1Image(data[::-1].copy(), flip), tmp_path / "las.nii")
    np.testing.assert_array_equal(read_file(tmp_path / "las.nii").array, r.array)
    real = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    a = read_file(real)
    assert a.spatial_dims == 3 and a.array.shape[0] == 1 and a.spacing == (2.0, 2.0, 2.0)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 9), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(DataError, match=r"t\.nii: 4D NIfTI with 9 volumes"):
        read_file(tmp_path / "t.nii")
    good = (tmp_path / "ras.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz"):
        read_file(tmp_path / "cut.nii.gz")


def test_mha_and_nrrd_through_simpleitk(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    a = (np.random.default_rng(0).random((5, 6, 7)) * 1000).astype(np.int16)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.5, 0.6, 3.0))  # ITK order: x, y, z
    for name in ("v.mha", "v.nrrd"):
        sitk.WriteImage(img, str(tmp_path / name))
        r = read_file(tmp_path / name)  # identity direction = LPS: the (y, x) axes are flipped to (A, R)
        np.testing.assert_array_equal(r.array[0], a[:, ::-1, ::-1])
        assert r.orientation == "LPS"
        assert r.spacing == pytest.approx((3.0, 0.6, 0.5)) and r.spatial_dims == 3
    raw = (tmp_path / "v.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(raw[: len(raw) - 200])
    with pytest.raises(DataError, match=r"cut\.mha: truncated or corrupt MHA"):
        read_file(tmp_path / "cut.mha")


def test_png_8_and_16_bit_rgba_and_errors(tmp_path: Path) -> None:
    from PIL import Image

    a16 = (np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    r = read_file(tmp_path / "g16.png")
    np.testing.assert_array_equal(r.array[0], a16)
    assert r.bit_depth == 16
    rgba = np.random.default_rng(1).integers(0, 255, (8, 9, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    r = read_file(tmp_path / "c.png")
    assert r.array.shape == (3, 8, 9) and r.bit_depth == 8
    np.testing.assert_array_equal(r.array, np.moveaxis(rgba[..., :3], -1, 0))
    np.testing.assert_allclose(to_unit_range(r), r.array / 255.0, rtol=1e-6)  # auto = bit depth for 8-bit
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"bad\.png"):
        read_file(tmp_path / "bad.png")
    with pytest.raises(DataError, match="file not found"):
        read_file(tmp_path / "missing.png")
    (tmp_path / "x.xyz").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        read_file(tmp_path / "x.xyz")


def test_dicom_without_suffix_is_sniffed(tmp_path: Path) -> None:
    shutil.copy(dcm("CT_small.dcm"), tmp_path / "IM0001")
    assert read_file(tmp_path / "IM0001").modality == "CT"


# -- hostile files (issue 13) ------------------------------------------------------------------------------
def _nifti(path: Path, array: np.ndarray) -> Path:
    import nibabel as nib

    nib.Nifti1Image(array, np.eye(4)).to_filename(path)
    return path


def test_non_finite_values_make_a_bad_file_not_a_blank_image(tmp_path: Path) -> None:
    """One NaN used to make the percentiles NaN and nan_to_num blanked the whole volume to 0, silently."""
    vol = np.random.default_rng(0).uniform(0, 100, (6, 7, 8)).astype(np.float32)
    vol[1, 2, 3] = np.nan
    vol[4, 5, 6] = np.inf
    vol[0, 0, 0] = -np.inf
    path = _nifti(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 3 non-finite value\(s\) \(1 NaN, 2 inf\) among 336"):
        read_file(path)
    import SimpleITK as sitk

    mha = tmp_path / "nan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.where(np.isinf(vol), 1.0, vol).astype(np.float32)), str(mha))
    with pytest.raises(DataError, match=r"nan\.mha: 1 non-finite value\(s\) \(1 NaN, 0 inf\)"):
        read_file(mha)
    # to_unit_range refuses them too (a ReadResult built by hand), instead of returning zeros
    ok = read_file(_nifti(tmp_path / "ok.nii.gz", np.nan_to_num(vol, posinf=5.0, neginf=5.0)))
    ok.array[0, 0, 0, 0] = np.nan
    for mode in ("percentile", "minmax", "zscore"):
        with pytest.raises(DataError, match=r"ok\.nii\.gz: 1 non-finite"):
            to_unit_range(ok, mode)


def test_a_text_file_named_dcm_is_not_a_dicom_and_a_cut_dicom_is_truncated(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("this is a text file, not a DICOM\n" * 20)
    with pytest.raises(DataError, match=r"notes\.dcm: not a DICOM file \(no 'DICM' marker"):
        read_file(text)
    good = dcm("CT_small.dcm").read_bytes()
    for n, needle in [(200, "it ends inside its header"), (1000, "it ends at byte 1000, inside element"),
                      (2000, "it ends inside a tag header"), (7000, "it ends at byte 7000, inside element")]:
        cut = tmp_path / f"cut{n}.dcm"
        cut.write_bytes(good[:n])
        with pytest.raises(DataError, match=rf"cut{n}\.dcm: truncated") as info:
            read_file(cut)
        assert needle in str(info.value) and "no pixel data" not in str(info.value)
    short = tmp_path / "short.dcm"
    short.write_bytes(good[:100])
    with pytest.raises(DataError, match=r"short\.dcm: not a DICOM file, or truncated: 100 bytes"):
        read_file(short)
    with pytest.raises(DataError, match=r"MR_truncated\.dcm: .*the file is truncated, it ends at byte 9630"):
        read_file(dcm("MR_truncated.dcm"))
    with pytest.raises(DataError, match=r"test-SR\.dcm: DICOM file has no pixel data \(Comprehensive SR Storage: "
                                        r"not an image\)"):
        read_file(dcm("test-SR.dcm"))


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR chunk declaring ``width`` x ``height`` 8-bit gray (no pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_empty_and_zero_size_images_are_bad_files(tmp_path: Path) -> None:
    from PIL import Image

    limit_before = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(100_000, 100_000))  # 10^10 pixels declared in 57 bytes
    with pytest.raises(DataError, match=r"bomb\.png: refused as a possible decompression bomb"):
        read_file(bomb)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # medssl leaves Pillow's global limit alone
    zero = tmp_path / "zero.png"
    zero.write_bytes(_png_header(0, 0))
    with pytest.raises(DataError, match=r"zero\.png: not a readable image"):
        read_file(zero)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: empty file \(0 bytes\)"):
        read_file(empty)


def test_constant_value() -> None:
    from medssl.data.readers import constant_value

    assert constant_value(np.full((1, 4, 4), -1024.0, np.float32)) == -1024.0
    assert constant_value(np.arange(4.0)) is None and constant_value(np.zeros(0)) is None


def _patched_nifti(tmp_path: Path, name: str, offset: int, fmt: str, *values: float) -> Path:
    """A real NIfTI-1 file with header bytes at ``offset`` overwritten (pixdim at 76, dim at 40)."""
    import struct

    path = _nifti(tmp_path / name, np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8))
    raw = bytearray(path.read_bytes())
    raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    path.write_bytes(bytes(raw))
    return path


def test_bad_voxel_sizes_and_header_bombs_are_refused_before_reading(tmp_path: Path, capfd) -> None:
    zero = _patched_nifti(tmp_path, "zero.nii", 80, "<f", 0.0)  # pixdim[1]: nibabel would take 0 as 1 mm
    with pytest.raises(DataError, match=r"zero\.nii: invalid voxel size \(0\.0, 1\.0, 1\.0\) in the NIfTI header"):
        read_file(zero)
    assert "pixdim" not in capfd.readouterr().err  # nibabel's own stderr line is silenced
    with pytest.raises(DataError, match=r"nan\.nii: invalid voxel size \(nan, 1\.0, 1\.0\)"):
        read_file(_patched_nifti(tmp_path, "nan.nii", 80, "<f", float("nan")))
    big = _patched_nifti(tmp_path, "big.nii", 42, "<hhh", 30000, 30000, 30000)  # dim[1..3]
    with pytest.raises(DataError, match=r"big\.nii: its arrays need 100582\.8 GiB once decompressed"):
        read_file(big)
    header = "ObjectType = Image\nNDims = 3\nDimSize = {}\nElementSpacing = {}\nElementType = MET_UCHAR\n" \
             "ElementDataFile = LOCAL\n"
    for name, size, spacing, needle in [("s0.mha", "2 2 2", "0 1 1", r"s0\.mha: invalid spacing \(0\.0, 1\.0, 1\.0\)"),
                                        ("huge.mha", "100000 100000 1000", "1 1 1", r"huge\.mha: its arrays need")]:
        (tmp_path / name).write_bytes(header.format(size, spacing).encode() + bytes(range(8)))
        with pytest.raises(DataError, match=needle):
            read_file(tmp_path / name)
    five = tmp_path / "five.nii.gz"
    _nifti(five, np.zeros((4, 4, 4, 2, 3), np.float32))
    with pytest.raises(DataError, match=r"five\.nii\.gz: NIfTI with unsupported dimensions \(4, 4, 4, 2, 3\)"):
        read_file(five)
