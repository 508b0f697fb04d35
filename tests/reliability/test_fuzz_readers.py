"""Readers under fuzzing: truncated, bit-flipped and random files.

The only outcomes allowed are a valid image (float32, channels first, 2D or 3D, every side >= 1, consistent with
what the file says) or medssl's own :class:`DataError` naming the file — never another exception, a hang (the
pytest-timeout marker) or a wrong shape.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medssl.data.readers import read_file
from medssl.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


def _seed_files(tmp: Path) -> dict[str, bytes]:
    import nibabel as nib
    from PIL import Image

    out = {name: Path(get_testdata_file(name)).read_bytes()
           for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm")}
    buf = io.BytesIO()
    nib.Nifti1Image(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), np.eye(4)).to_file_map(
        {"image": nib.FileHolder(fileobj=buf), "header": nib.FileHolder(fileobj=buf)})
    out["vol.nii"] = buf.getvalue()
    b = io.BytesIO()
    Image.fromarray((np.arange(20 * 30) % 251).astype(np.uint8).reshape(20, 30)).save(b, format="PNG")
    out["img.png"] = b.getvalue()
    return out


SEEDS = _seed_files(Path("."))


def _check(path: Path) -> None:
    try:
        r = read_file(path)
    except DataError as exc:
        assert path.name in str(exc), f"error does not name the file: {exc}"
        return
    a = r.array
    assert a.dtype == np.float32 and a.ndim == r.spatial_dims + 1 and r.spatial_dims in (2, 3)
    assert min(a.shape) >= 1 and a.shape[0] <= 4
    if path.suffix == ".dcm":  # the decoded shape agrees with the header that survived
        ds = pydicom.dcmread(path, force=True)
        assert tuple(a.shape[-2:]) == (int(ds.Rows), int(ds.Columns))


@pytest.mark.parametrize("name", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_truncated_files(tmp_path: Path, name: str, data: st.DataObject) -> None:
    raw = SEEDS[name]
    cut = data.draw(st.integers(0, len(raw) - 1))
    p = tmp_path / name
    p.write_bytes(raw[:cut])
    _check(p)


@pytest.mark.parametrize("name", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_bit_flipped_files(tmp_path: Path, name: str, data: st.DataObject) -> None:
    raw = bytearray(SEEDS[name])
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 7)), min_size=1, max_size=16))
    for pos, bit in flips:
        raw[pos] ^= 1 << bit
    p = tmp_path / name
    p.write_bytes(bytes(raw))
    _check(p)


@pytest.mark.parametrize("suffix", [".dcm", ".nii", ".nii.gz", ".png", ".mha", ".jpg"])
@FUZZ
@given(blob=st.binary(min_size=0, max_size=4096))
def test_random_bytes(tmp_path: Path, suffix: str, blob: bytes) -> None:
    p = tmp_path / f"random{suffix}"
    p.write_bytes(blob)
    _check(p)


@FUZZ
@given(blob=st.binary(min_size=0, max_size=2048))
def test_random_npz_is_a_clear_error(tmp_path: Path, blob: bytes) -> None:
    from medssl.data.npz import NpzDataset

    p = tmp_path / "x.npz"
    p.write_bytes(blob)
    with pytest.raises(DataError, match="x.npz"):
        NpzDataset(p)


@FUZZ
@given(text=st.text(max_size=400))
def test_random_csv_manifests(tmp_path: Path, text: str) -> None:
    from medssl.data.manifest import CsvDataset

    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "a.dcm")
    p = tmp_path / "m.csv"
    p.write_text("path,label\na.dcm,0\n" + text, encoding="utf-8")
    try:
        ds = CsvDataset(p, image_size=8)
    except DataError as exc:
        assert "m.csv" in str(exc) or str(tmp_path) in str(exc)
        return
    for i in range(len(ds)):  # every row it accepted must load or fail clearly
        try:
            item = ds[i]
        except DataError:
            continue
        assert item["image"].shape == (ds.in_chans, 8, 8)
