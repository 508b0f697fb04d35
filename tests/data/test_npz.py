"""MedMNIST-layout npz reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.data import open_dataset
from medssl.data.npz import NpzDataset
from medssl.errors import DataError

COUNTS = {"train": 7, "val": 2, "test": 3}


def _write(
    path: Path,
    item_shape: tuple[int, ...],
    labels: str = "class",
    dtype: type = np.uint8,
    **extra: np.ndarray,
) -> dict:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    high = 256 if dtype == np.uint8 else 65536
    for split, n in COUNTS.items():
        arrays[f"{split}_images"] = rng.integers(0, high, (n, *item_shape)).astype(dtype)
        if labels == "class":
            arrays[f"{split}_labels"] = rng.integers(0, 3, (n, 1)).astype(np.uint8)
        elif labels == "multi":
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 4)).astype(np.uint8)
    arrays.update(extra)
    np.savez_compressed(path, **arrays)
    return arrays


def test_gray_2d_items_splits_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "pneumonia.npz"
    arrays = _write(path, (28, 28))
    ds = open_dataset(f"npz:{path}")
    assert isinstance(ds, NpzDataset) and ds.name == f"npz:{path}"
    assert len(ds) == 12 and ds.spatial_dims == 2 and ds.in_chans == 1 and ds.image_size == 28
    assert list(ds.splits) == ["train"] * 7 + ["val"] * 2 + ["test"] * 3
    assert np.array_equal(ds.indices("val"), [7, 8])
    all_labels = np.concatenate([arrays[f"{s}_labels"][:, 0] for s in COUNTS])
    assert ds.labels is not None and np.array_equal(ds.labels, all_labels)
    assert ds.num_classes == int(all_labels.max()) + 1 and not ds.multilabel
    assert ds.class_names == [str(i) for i in range(ds.num_classes)]
    assert len(set(ds.patient_ids)) == 12 and ds.tasks == ("label",) and ds.task == "label"
    item = ds[8]  # second validation image
    assert torch.equal(item["image"][0], torch.from_numpy(arrays["val_images"][1].astype(np.float32) / 255))
    assert item["label"].item() == arrays["val_labels"][1, 0] and "mask" not in item
    assert ds.sources[8].endswith("#val/1")


def test_resize_matches_pil_bilinear(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    arrays = _write(path, (28, 28))
    ds = open_dataset(f"npz:{path}", image_size=20)
    raw = arrays["test_images"][2].astype(np.float32) / 255
    reference = np.asarray(Image.fromarray(raw, mode="F").resize((20, 20), Image.BILINEAR))
    np.testing.assert_allclose(ds[11]["image"][0].numpy(), reference, atol=1e-5)
    assert open_dataset(f"npz:{path}", image_size=64)[0]["image"].shape == (1, 64, 64)


def test_rgb_and_multilabel(tmp_path: Path) -> None:
    path = tmp_path / "chest.npz"
    names = np.array(["a", "b", "c", "d"])
    arrays = _write(path, (16, 16, 3), labels="multi", class_names=names)
    ds = open_dataset(f"npz:{path}")
    assert ds.in_chans == 3 and ds.multilabel and ds.num_classes == 4 and ds.class_names == list(names)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16)
    expected = torch.from_numpy(arrays["train_images"][0].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(item["image"], expected)
    assert item["label"].dtype == torch.float32 and item["label"].shape == (4,)
    assert torch.equal(item["label"], torch.from_numpy(arrays["train_labels"][0].astype(np.float32)))
    counts = ds.describe()["label_counts"]["all"]
    assert counts["a"] == int(sum(arrays[f"{s}_labels"][:, 0].sum() for s in COUNTS))


def test_3d_volumes_and_uint16(tmp_path: Path) -> None:
    path = tmp_path / "organ3d.npz"
    arrays = _write(path, (8, 8, 8), dtype=np.uint16)
    ds = open_dataset(f"npz:{path}")
    assert ds.spatial_dims == 3 and ds.in_chans == 1 and ds.image_size == 8
    assert torch.allclose(ds[0]["image"][0], torch.from_numpy(arrays["train_images"][0] / 65535.0).float())
    small = open_dataset(f"npz:{path}", image_size=4)
    pooled = arrays["train_images"][0].astype(np.float64).reshape(4, 2, 4, 2, 4, 2).mean((1, 3, 5)) / 65535
    np.testing.assert_allclose(small[0]["image"][0].numpy(), pooled, atol=1e-6)
    assert open_dataset(f"npz:{path}", image_size=12)[1]["image"].shape == (1, 12, 12, 12)


def test_unlabelled_npz(tmp_path: Path) -> None:
    path = tmp_path / "u.npz"
    _write(path, (10, 10), labels="none")
    ds = open_dataset(f"npz:{path}")
    assert ds.labels is None and ds.num_classes == 0 and ds.tasks == () and ds.task is None
    assert "label" not in ds[0]
    assert ds.describe()["label_counts"] is None


def test_class_names_may_name_absent_classes(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    _write(path, (10, 10), class_names=np.array(["x", "y", "z", "w", "v"]))
    ds = open_dataset(f"npz:{path}")
    assert ds.num_classes == 5 and ds.describe()["label_counts"]["all"]["v"] == 0


def _bad(tmp_path: Path, **changes: np.ndarray | None) -> Path:
    path = tmp_path / "bad.npz"
    arrays = {}
    for split, n in COUNTS.items():
        arrays[f"{split}_images"] = np.zeros((n, 6, 6), np.uint8)
        arrays[f"{split}_labels"] = np.zeros((n, 1), np.uint8)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"val_images": None}, "'val_images'"),
        ({"test_labels": None}, "'test_labels'"),
        ({"train_labels": np.zeros((6, 1), np.uint8)}, "'train_labels' has 6 rows"),
        ({"train_images": np.zeros((7, 6, 6), np.float32)}, "'train_images' has dtype float32"),
        ({"train_images": np.zeros((7, 6), np.uint8)}, "'train_images' has shape"),
        ({"test_images": np.zeros((3, 7, 7), np.uint8)}, "'test_images' has item shape"),
        ({"val_labels": np.full((2, 1), 0.5)}, "'val_labels' has dtype float64"),
        ({"val_labels": np.full((2, 1), -1, np.int64)}, "negative"),
        (
            {
                "train_labels": np.full((7, 3), 2, np.uint8),
                "val_labels": np.zeros((2, 3), np.uint8),
                "test_labels": np.zeros((3, 3), np.uint8),
            },
            "only 0 and 1",
        ),
        ({"val_labels": np.zeros((2, 2), np.uint8)}, "different numbers of columns"),
        ({"class_names": np.array([1, 2])}, "'class_names'"),
    ],
)
def test_bad_arrays_name_file_and_key(tmp_path: Path, changes: dict, needle: str) -> None:
    path = _bad(tmp_path, **changes)
    with pytest.raises(DataError) as info:
        open_dataset(f"npz:{path}")
    assert str(path) in str(info.value) and needle in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        open_dataset(f"npz:{tmp_path / 'nope.npz'}")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match="cannot read"):
        open_dataset(f"npz:{junk}")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        open_dataset(f"npz:{single}")
    truncated = tmp_path / "trunc.npz"
    _write(truncated, (28, 28))
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DataError, match="trunc.npz"):
        open_dataset(f"npz:{truncated}")
    with pytest.raises(DataError, match="no task 'margin'"):
        open_dataset(f"npz:{_bad(tmp_path)}", task="margin")


# -- hostile labels and archives (issue 13) ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"train_labels": np.array([[0]] * 6 + [[2**40]], np.int64)},
         r"'train_labels' holds label 1099511627776 \(first large one at row 6\); medssl takes class indices "
         r"below 10000"),
        ({"train_labels": np.array([[0]] * 6 + [[2**63]], np.uint64)}, r"holds label 9223372036854775808"),
        ({"val_labels": np.array([[0.0], [np.nan]])}, r"'val_labels' has dtype float64 with 1 NaN / inf label"),
        ({"val_labels": np.array([[0.0], [np.inf]])}, r"'val_labels' has dtype float64 with 1 NaN / inf label"),
        ({"val_labels": np.array([[0.0], [1.5]])}, r"'val_labels' has dtype float64 with non-integer labels "
                                                   r"\(e\.g\. \[1\.5\] at row 1\)"),
        ({"val_labels": np.array([[0], [-3]], np.int64)},
         r"'val_labels' holds negative labels \(min -3, first at row 1"),
        ({"val_labels": np.zeros((3, 1), np.uint8)}, r"'val_labels' has 3 rows but 'val_images' has 2 images"),
        ({"val_labels": np.zeros((2, 1, 1), np.uint8)}, r"'val_labels' has shape \(2, 1, 1\)"),
        ({"val_labels": np.array([["a"], ["b"]])}, r"'val_labels' has dtype <U1; expected integer"),
        ({"train_labels": np.arange(100, 107)[:, None]},
         r"the largest label is 106, so 107 classes for 12 images; labels must be class indices"),
        ({"train_labels": np.zeros((7, 10_001), np.uint8), "val_labels": np.zeros((2, 10_001), np.uint8),
          "test_labels": np.zeros((3, 10_001), np.uint8)}, r"10001 columns; medssl takes at most 10000"),
    ],
)
def test_labels_are_validated_before_anything_is_sized_by_them(tmp_path: Path, changes: dict, needle: str) -> None:
    import tracemalloc

    path = _bad(tmp_path, **changes)
    tracemalloc.start()
    with pytest.raises(DataError, match=needle) as info:
        open_dataset(f"npz:{path}")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(path) in str(info.value) and peak < 64 * 2**20  # no list of 2**40 class names


def test_integral_float_labels_are_class_indices(tmp_path: Path) -> None:
    path = _bad(tmp_path, train_labels=np.array([[0.0], [1.0], [2.0], [0.0], [1.0], [2.0], [2.0]]))
    ds = open_dataset(f"npz:{path}")
    assert ds.num_classes == 3 and ds.labels is not None and ds.labels.dtype == np.int64
    assert list(ds.labels[:7]) == [0, 1, 2, 0, 1, 2, 2]


def _zip_npz(path: Path, members: dict[str, bytes]) -> Path:
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for split, n in COUNTS.items():
            for key, arr in ((f"{split}_images", np.zeros((n, 6, 6), np.uint8)),
                             (f"{split}_labels", np.zeros((n, 1), np.uint8))):
                buf = io.BytesIO()
                np.save(buf, arr)
                z.writestr(f"{key}.npy", buf.getvalue())
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_pickled_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    import io
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    path = _zip_npz(tmp_path / "obj.npz", {"extra.npy": buf.getvalue()})
    with pytest.raises(DataError, match=r"obj\.npz: key 'extra' holds Python objects \(a pickled object array\); "
                                        r"medssl never unpickles"):
        open_dataset(f"npz:{path}")
    assert not marker.exists()
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError, match=r"raw\.npz: cannot read as \.npz"):
        open_dataset(f"npz:{raw}")
    assert not marker.exists()


def test_an_array_header_claiming_a_terabyte_is_refused_before_reading(tmp_path: Path) -> None:
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (2**40,)})
    path = _zip_npz(tmp_path / "big.npz", {"big.npy": header.getvalue()})
    with pytest.raises(DataError, match=r"big\.npz: its arrays need 1024\.0 GiB once decompressed, more than this "
                                        r"machine's"):
        open_dataset(f"npz:{path}")
