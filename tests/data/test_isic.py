"""isic2017: on a miniature tree with the real release's folder and file names."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medssl.data import Isic2017Dataset, open_dataset
from medssl.errors import DataError

PARTS = [("Training", 6), ("Validation", 2), ("Test_v2", 3)]


def make_isic_tree(root: Path, masks: bool = True) -> Path:
    """ISIC 2017 miniature: images (48x64 RGB JPEG), superpixels, masks, Part3 CSVs with float labels."""
    rng = np.random.default_rng(0)
    for part, n in PARTS:
        data = root / f"ISIC-2017_{part}_Data"
        data.mkdir(parents=True)
        gt = root / f"ISIC-2017_{part}_Part1_GroundTruth"
        if masks:
            gt.mkdir()
        lines = ["image_id,melanoma,seborrheic_keratosis"]
        for k in range(n):
            iid = f"ISIC_{len(part) * 100 + k:07d}"
            Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(data / f"{iid}.jpg")
            Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(data / f"{iid}_superpixels.png")
            if masks:
                m = np.zeros((48, 64), np.uint8)
                m[10:30, 20:50] = 255
                Image.fromarray(m).save(gt / f"{iid}_segmentation.png")
            lines.append(f"{iid},{float(k % 2)},{float(k % 3 == 0)}")
        (root / f"ISIC-2017_{part}_Part3_GroundTruth.csv").write_text("\n".join(lines) + "\n")
    return root


def test_reads_the_release_layout(tmp_path: Path) -> None:
    root = make_isic_tree(tmp_path / "isic")
    ds = open_dataset(f"isic2017:{root}", image_size=32)
    assert isinstance(ds, Isic2017Dataset) and len(ds) == 11  # superpixels ignored
    assert [len(ds.indices(s)) for s in ("train", "val", "test")] == [6, 2, 3]
    assert ds.task == "melanoma" and ds.class_names == ["other", "melanoma"]
    assert ds.tasks == ("melanoma", "seborrheic_keratosis")
    assert list(ds.labels[:6]) == [0, 1, 0, 1, 0, 1]
    assert ds.in_chans == 3 and ds.spatial_dims == 2 and ds.has_masks
    assert all("superpixels" not in s for s in ds.sources)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert set(item["mask"].unique().tolist()) == {0, 1}
    # 48x64 is padded to 64x64 before resizing: the top and bottom rows are padding, hence 0 in the mask.
    assert item["mask"][0].sum() == 0 and item["mask"][16].sum() > 0
    sk = open_dataset(f"isic2017:{root}", task="seborrheic_keratosis")
    assert list(sk.labels[:6]) == [1, 0, 0, 1, 0, 0] and sk.image_size == 224


def test_without_mask_folders_there_are_no_masks(tmp_path: Path) -> None:
    ds = open_dataset(f"isic2017:{make_isic_tree(tmp_path, masks=False)}", image_size=16)
    assert not ds.has_masks and "mask" not in ds[0]


@pytest.mark.parametrize(
    ("remove", "needle"),
    [
        ("ISIC-2017_Validation_Data", "missing folder .*ISIC-2017_Validation_Data"),
        ("ISIC-2017_Test_v2_Part3_GroundTruth.csv",
         "missing ground-truth CSV .*ISIC-2017_Test_v2_Part3_GroundTruth.csv"),
        ("ISIC-2017_Training_Part1_GroundTruth", "missing mask folder .*ISIC-2017_Training_Part1_GroundTruth"),
    ],
)
def test_a_missing_part_is_named(tmp_path: Path, remove: str, needle: str) -> None:
    root = make_isic_tree(tmp_path)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DataError, match=needle):
        open_dataset(f"isic2017:{root}")


def test_other_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        open_dataset(f"isic2017:{tmp_path / 'nope'}")
    root = make_isic_tree(tmp_path / "a")
    with pytest.raises(DataError, match="valid tasks: melanoma, seborrheic_keratosis"):
        open_dataset(f"isic2017:{root}", task="nevus")
    csv_path = root / "ISIC-2017_Validation_Part3_GroundTruth.csv"
    csv_path.write_text(csv_path.read_text() + "ISIC_9999999,1.0,0.0\n")
    with pytest.raises(DataError, match="ISIC_9999999"):
        open_dataset(f"isic2017:{root}")
    csv_path.write_text("image_id,melanoma,seborrheic_keratosis\nISIC_0001000,2,0\n")
    with pytest.raises(DataError, match="expected 0 or 1"):
        open_dataset(f"isic2017:{root}")
