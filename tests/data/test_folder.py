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


# -- hostile folders (issue 13) ----------------------------------------------------------------------------
def _bad_headers(root: Path) -> list[str]:
    """Three unreadable headers (empty, text, a 10^10-pixel PNG) next to four good images in two classes."""
    from tests.data.test_readers import _png_header

    for i in range(2):
        _save(root / "a" / f"good{i}.png", _rng_image((8, 8), seed=i))
        _save(root / "b" / f"good{i}.png", _rng_image((8, 8), seed=10 + i))
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / "text.png").write_text("not an image")
    (root / "b" / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    return ["empty.png", "text.png", "bomb.png"]


def test_unreadable_headers_do_not_stop_the_opening_and_skip_bad_drops_them(tmp_path: Path) -> None:
    from medssl.config import DataConfig
    from medssl.data import drop_bad
    from medssl.data.specs import open_from_config

    bad = _bad_headers(tmp_path)
    ds = open_dataset(f"folder:{tmp_path}", image_size=8)
    assert len(ds) == 7 and sorted(Path(ds.sources[i]).name for i in ds.open_errors) == sorted(bad)
    kept = drop_bad(ds)
    assert len(kept) == 4 and sorted(Path(p).name for p, _ in kept.skipped) == sorted(bad)
    reasons = {Path(p).name: r for p, r in kept.skipped}
    assert "empty file (0 bytes)" in reasons["empty.png"] and "not a readable image" in reasons["text.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert kept.class_names == ["a", "b"] and all(kept[i]["image"].shape == (1, 8, 8) for i in range(4))
    # without --skip-bad a run stops at open, naming the first file and the count
    with pytest.raises(DataError, match=r"empty\.png: empty file \(0 bytes\) \(and 2 more unreadable file\(s\)\); "
                                        r"skip them with --skip-bad"):
        open_from_config(DataConfig(spec=f"folder:{tmp_path}", image_size=8, cache=False))
    assert len(open_from_config(DataConfig(spec=f"folder:{tmp_path}", image_size=8, cache=False,
                                           skip_bad=True))) == 7
    none_readable = tmp_path / "none"
    (none_readable / "x.png").parent.mkdir()
    (none_readable / "x.png").write_text("text")
    with pytest.raises(DataError, match=r"none of its 1 image\(s\) can be read \(first: .*x\.png"):
        open_dataset(f"folder:{none_readable}")


def test_directory_symlinks_out_of_the_root_are_not_followed(tmp_path: Path, caplog) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _save(root / "cls" / "in.png", _rng_image((8, 8)))
    _save(outside / "out.png", _rng_image((8, 8), seed=1))
    (root / "cls" / "to_outside").symlink_to(outside, target_is_directory=True)
    (root / "cls" / "to_fs_root").symlink_to("/", target_is_directory=True)
    (root / "cls" / "loop").symlink_to(root, target_is_directory=True)  # a cycle inside the root
    (root / "cls" / "file_link.png").symlink_to(outside / "out.png")  # file symlinks are read
    with caplog.at_level("WARNING", logger="medssl"):
        ds = open_dataset(f"folder:{root}", image_size=8)
    assert sorted(Path(s).name for s in ds.sources) == ["file_link.png", "in.png"]
    assert sorted(Path(link).name for link, _ in ds.skipped_links) == ["to_fs_root", "to_outside"]
    assert "not following 2 symlinked folder(s) that lead out of it" in caplog.text
    assert "data.follow_symlinks=true" in caplog.text
    (root / "cls" / "to_fs_root").unlink()  # with follow_symlinks "/" would be walked too
    followed = FolderDataset(root, image_size=8, follow_symlinks=True)
    assert any(Path(s).name == "out.png" for s in followed.sources) and followed.skipped_links == []


def test_symlink_cycles_terminate_with_follow_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _save(root / "a" / "x.png", _rng_image((8, 8)))
    _save(tmp_path / "ext" / "y.png", _rng_image((8, 8), seed=1))
    (root / "a" / "up").symlink_to(root, target_is_directory=True)
    (tmp_path / "ext" / "back").symlink_to(tmp_path / "ext", target_is_directory=True)
    (root / "a" / "ext").symlink_to(tmp_path / "ext", target_is_directory=True)
    ds = FolderDataset(root, image_size=8, follow_symlinks=True)
    assert sorted(Path(s).name for s in ds.sources) == ["x.png", "y.png"]


def test_constant_image_is_kept_with_one_warning(tmp_path: Path, caplog) -> None:
    from medssl.data import readers

    _save(tmp_path / "ok.png", _rng_image((8, 8)))
    _save(tmp_path / "black.png", np.zeros((8, 8), np.uint8))
    ds = open_dataset(f"folder:{tmp_path}", image_size=8)
    black = ds.sources.index(str(tmp_path / "black.png"))
    readers._CONSTANT_NOTED.discard(str(tmp_path / "black.png"))
    with caplog.at_level("WARNING", logger="medssl"):
        for _ in range(3):
            assert float(ds[black]["image"].max()) == 0.0
    assert caplog.text.count("black.png: constant image: every pixel is 0") == 1
