"""Spec strings, the dataset contract (describe / indices) and the shared resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medssl.data import SPEC_HELP, ImageDataset, open_dataset, resize_image
from medssl.errors import DataError


@pytest.mark.parametrize(
    ("spec", "length", "shape", "task"),
    [
        ("phantom2d:24", 24, (1, 64, 64), "margin"),
        ("phantom3d:6", 6, (1, 32, 32, 32), "lesion"),
        (" Phantom2d:8 ", 8, (1, 64, 64), "margin"),
    ],
)
def test_phantom_specs(spec: str, length: int, shape: tuple[int, ...], task: str) -> None:
    ds = open_dataset(spec)
    assert isinstance(ds, ImageDataset) and len(ds) == length and ds.name == spec.strip()
    assert tuple(ds[0]["image"].shape) == shape and ds.task == task


def test_phantom_defaults_and_options() -> None:
    ds = open_dataset("phantom3d", image_size=16, task="lesion", seed=3)
    assert len(ds) == 400 and ds.image_size == 16
    other = open_dataset("phantom2d:8", image_size=32, seed=1)
    assert other[0]["image"].shape == (1, 32, 32)
    assert not torch.equal(other[0]["image"], open_dataset("phantom2d:8", image_size=32, seed=2)[0]["image"])


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("mnist", "unknown data spec 'mnist'"),
        ("", "empty data spec"),
        ("phantom2d:0", "positive integer"),
        ("phantom2d:abc", "positive integer"),
        ("phantom2d:-5", "positive integer"),
        ("phantom2d:", "positive integer"),
        ("phantom3d:1.5", "positive integer"),
        ("npz:", "PATH is missing"),
        ("folder", "DIR is missing"),
        ("npz:/definitely/not/here.npz", "not found"),
    ],
)
def test_bad_specs_raise_data_error_listing_valid(spec: str, needle: str) -> None:
    with pytest.raises(DataError) as info:
        open_dataset(spec)
    message = str(info.value)
    assert needle in message
    if "unknown" in needle or "empty" in needle:
        for valid in ("phantom2d", "phantom3d", "npz:PATH", "folder:DIR"):
            assert valid in message


def test_bad_task_and_size() -> None:
    with pytest.raises(DataError, match="valid tasks: margin, pathology"):
        open_dataset("phantom2d:8", task="nope")
    with pytest.raises(DataError, match="valid tasks: lesion"):
        open_dataset("phantom3d:2", task="margin")
    for size in (0, -3, 2.5, "32", float("nan"), True):
        with pytest.raises(DataError, match="image_size"):
            open_dataset("phantom2d:8", image_size=size)  # type: ignore[arg-type]


def test_spec_help_mentions_every_spec() -> None:
    for word in ("phantom2d", "phantom3d", "npz:", "folder:", "not a substitute"):
        assert word in SPEC_HELP


def test_describe_is_consistent_and_yaml_safe() -> None:
    ds = open_dataset("phantom2d:80", task="margin")
    info = ds.describe()
    assert yaml.safe_load(yaml.safe_dump(info)) == info
    assert info["num_items"] == 80 and info["num_patients"] == 20 and info["shape"] == [1, 64, 64]
    assert sum(info["split_counts"].values()) == 80
    assert info["split_patients"] == {"train": 14, "val": 2, "test": 4}
    for split in ("train", "val", "test"):
        idx = ds.indices(split)
        assert len(idx) == info["split_counts"][split]
        assert ds.labels is not None
        expected = np.bincount(ds.labels[idx], minlength=4)
        assert list(info["label_counts"][split].values()) == list(expected)
    assert info["label_counts"]["all"] == {name: 20 for name in ds.class_names}
    assert set(ds.patient_ids[ds.indices("train")]).isdisjoint(ds.patient_ids[ds.indices("test")])
    with pytest.raises(DataError, match="valid splits"):
        ds.indices("training")
    assert "phantom2d:80" in repr(ds)


def test_resize_image_matches_pil_and_passes_through() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((30, 50)).astype(np.float32)
    for size in (12, 64):
        out = resize_image(torch.from_numpy(x)[None], size)
        reference = np.asarray(Image.fromarray(x, mode="F").resize((size, size), Image.BILINEAR))
        np.testing.assert_allclose(out[0].numpy(), np.clip(reference, 0, 1), atol=1e-5)
    same = torch.from_numpy(x[:30, :30]).unsqueeze(0)
    assert resize_image(same, 30) is same
    vol = torch.from_numpy(rng.random((1, 6, 6, 6)).astype(np.float32))
    np.testing.assert_allclose(
        resize_image(vol, 3)[0].numpy(), vol[0].numpy().reshape(3, 2, 3, 2, 3, 2).mean((1, 3, 5)), atol=1e-6
    )
    assert resize_image(vol, 9).shape == (1, 9, 9, 9)


def test_folder_spec_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "a.png")
    ds = open_dataset("folder:~/imgs", image_size=4)
    assert len(ds) == 1 and ds.name == "folder:~/imgs"
