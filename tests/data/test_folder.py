"""Folder-of-images reader on real PNG / JPEG / TIFF files written by PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.data import open_dataset
from medssl.data.folder import FolderDataset, pad_to_square
from medssl.errors import DataError


def _save(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def _rng_image(shape: tuple[int, ...], dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    high = 256 if dtype == np.uint8 else 65536
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def test_labelled_gray_8_and_16_bit(tmp_path: Path) -> None:
    a8 = _save(tmp_path / "benign" / "case1.png", _rng_image((32, 32), seed=1))
    a16 = _save(tmp_path / "malignant" / "deep" / "case2.png", _rng_image((32, 32), np.uint16, seed=2))
    _save(tmp_path / "benign" / "case3.tif", _rng_image((32, 32), np.uint16, seed=3))
    (tmp_path / "benign" / "notes.txt").write_text("not an image")
    _save(tmp_path / ".hidden" / "x.png", _rng_image((8, 8)))
    ds = open_dataset(f"folder:{tmp_path}", image_size=32)
    assert isinstance(ds, FolderDataset) and len(ds) == 3
    assert ds.class_names == ["benign", "malignant"] and ds.in_chans == 1 and ds.image_size == 32
    names = [Path(s).name for s in ds.sources]
    assert names == ["case1.png", "case3.tif", "case2.png"]
    assert ds.labels is not None and list(ds.labels) == [0, 0, 1]
    assert list(ds.patient_ids) == ["case1", "case3", "case2"]
    assert torch.allclose(ds[0]["image"][0], torch.from_numpy(a8 / 255.0).float())
    assert torch.allclose(ds[2]["image"][0], torch.from_numpy(a16 / 65535.0).float())
    assert ds[2]["label"].item() == 1 and ds[0]["image"].dtype == torch.float32
    assert set(ds.splits) <= {"train", "val", "test"}


def test_rgb_forces_three_channels_and_unlabelled(tmp_path: Path) -> None:
    gray = _save(tmp_path / "a.png", _rng_image((16, 16), seed=4))
    rgb = _save(tmp_path / "b.jpg", np.full((16, 16, 3), (200, 100, 50), np.uint8))
    ds = open_dataset(f"folder:{tmp_path}", image_size=16)
    assert ds.labels is None and ds.tasks == () and ds.in_chans == 3
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and "label" not in item
    for c in range(3):
        assert torch.allclose(item["image"][c], torch.from_numpy(gray / 255.0).float())
    colour = ds[1]["image"].mean((1, 2)).numpy() * 255
    np.testing.assert_allclose(colour, rgb[0, 0], atol=3)  # JPEG is lossy on flat colour, barely


def test_default_size_and_aspect_preserving_padding(tmp_path: Path) -> None:
    wide = np.zeros((20, 40), np.uint8)
    wide[:, :] = 255
    _save(tmp_path / "wide.png", wide)
    assert open_dataset(f"folder:{tmp_path}").image_size == 224
    ds = open_dataset(f"folder:{tmp_path}", image_size=40)
    image = ds[0]["image"][0]
    assert image.shape == (40, 40)
    assert torch.all(image[:10] == 0) and torch.all(image[30:] == 0) and torch.all(image[10:30] == 1)
    small = open_dataset(f"folder:{tmp_path}", image_size=8)[0]["image"][0]
    reference = np.asarray(
        Image.fromarray(
            pad_to_square(torch.from_numpy(wide / 255.0).float()[None])[0].numpy(), mode="F"
        ).resize((8, 8), Image.BILINEAR)
    )
    np.testing.assert_allclose(small.numpy(), reference, atol=1e-5)


def test_truncated_file_is_named_when_read(tmp_path: Path) -> None:
    _save(tmp_path / "good.png", _rng_image((64, 64), seed=5))
    bad = tmp_path / "broken.png"
    _save(bad, _rng_image((64, 64), seed=6))
    bad.write_bytes(bad.read_bytes()[:2000])
    ds = open_dataset(f"folder:{tmp_path}", image_size=32)
    assert ds[1]["image"].shape == (1, 32, 32)
    with pytest.raises(DataError, match="broken.png"):
        ds[0]


def test_garbage_file_is_named_at_open(tmp_path: Path) -> None:
    """A run (open_from_config without skip_bad) still stops at open; the dataset itself keeps the file so that
    --skip-bad and inspect can list it (its item raises the same error)."""
    from medssl.config import DataConfig
    from medssl.data.specs import open_from_config

    _save(tmp_path / "good.png", _rng_image((8, 8)))
    (tmp_path / "fake.png").write_bytes(b"\x00\x01 definitely not a png")
    with pytest.raises(DataError, match="fake.png"):
        open_from_config(DataConfig(spec=f"folder:{tmp_path}", cache=False))
    ds = open_dataset(f"folder:{tmp_path}")
    bad = ds.sources.index(str(tmp_path / "fake.png"))
    assert list(ds.open_errors) == [bad] and "fake.png: not a readable image" in ds.open_errors[bad]
    with pytest.raises(DataError, match="fake.png"):
        ds[bad]


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        open_dataset(f"folder:{tmp_path / 'missing'}")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        open_dataset(f"folder:{empty}")
    mixed = tmp_path / "mixed"
    _save(mixed / "loose.png", _rng_image((8, 8)))
    _save(mixed / "cls" / "inner.png", _rng_image((8, 8)))
    with pytest.raises(DataError, match="loose.png"):
        open_dataset(f"folder:{mixed}")
    flat = tmp_path / "flat"
    _save(flat / "x.png", _rng_image((8, 8)))
    with pytest.raises(DataError, match="no task 'label'"):
        open_dataset(f"folder:{flat}", task="label")
    afile = flat / "x.png"
    with pytest.raises(DataError, match="not a directory"):
        open_dataset(f"folder:{afile}")


def test_unsupported_mode_is_named(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="float.tif.*mode 'F'"):
        open_dataset(f"folder:{tmp_path}")


def test_patient_level_splits_group_by_stem(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for k in range(10):
            _save(tmp_path / cls / f"p{k}.png", _rng_image((8, 8), seed=k))
    ds = open_dataset(f"folder:{tmp_path}", image_size=8, seed=1)
    for k in range(10):
        assert len(set(ds.splits[ds.patient_ids == f"p{k}"])) == 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 8, 8) and batch["label"].dtype == torch.int64
