"""csv: / volumes: manifests and the generic bad-file filter (drop_bad), on real PNG and NIfTI files."""

from __future__ import annotations

import csv
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medssl.data
from medssl.data import CsvDataset, drop_bad, open_dataset
from medssl.errors import DataError


def _fallback_readers() -> types.ModuleType:
    """Stand-in for medssl.data.readers (PNG/JPEG via PIL, NIfTI via nibabel) while it does not exist."""

    @dataclass
    class ReadResult:
        array: np.ndarray
        spatial_dims: int
        spacing: tuple | None
        bit_depth: int | None
        window: tuple[float, float] | None
        modality: str | None
        source: str

    def read_file(path):
        path = Path(path)
        try:
            if path.name.endswith((".nii", ".nii.gz")):
                import nibabel

                img = nibabel.load(str(path))
                arr = np.asarray(img.get_fdata(), dtype=np.float32)
                return ReadResult(arr[None], 3, tuple(img.header.get_zooms()[:3]), None, None, None, str(path))
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im, dtype=np.float32)
                depth = 16 if im.mode.startswith("I") else 8
        except Exception as exc:
            raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return ReadResult(arr, 2, None, depth, None, None, str(path))

    def to_unit_range(result, mode="auto", percentiles=(0.5, 99.5)):
        a = result.array.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)

    mod = types.ModuleType("medssl.data.readers")
    mod.ReadResult = ReadResult  # type: ignore[attr-defined]
    mod.read_file = read_file  # type: ignore[attr-defined]
    mod.to_unit_range = to_unit_range  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def readers(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The real reader module, or the test-only fallback until it lands."""
    try:
        import medssl.data.readers as mod
    except ImportError:
        mod = _fallback_readers()
        monkeypatch.setitem(sys.modules, "medssl.data.readers", mod)
        monkeypatch.setattr(medssl.data, "readers", mod, raising=False)
    return mod


def _png(path: Path, shape: tuple[int, ...] = (20, 30), seed: int = 0, dtype: type = np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    high = 256 if dtype == np.uint8 else 65536
    Image.fromarray(np.random.default_rng(seed).integers(0, high, shape).astype(dtype)).save(path)
    return path


def _manifest(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)
    return path


def write_png_manifest(root: Path, n: int = 6, broken: bool = False) -> Path:
    """A labelled PNG manifest (optionally with a truncated PNG as the last row)."""
    rows = []
    for i in range(n):
        _png(root / "img" / f"case{i}.png", seed=i)
        label = "malignant" if i % 2 else "benign"
        rows.append({"path": f"img/case{i}.png", "label": label, "patient_id": f"p{i // 2}"})
    if broken:
        good = (root / "img" / "case0.png").read_bytes()
        (root / "img" / "broken.png").write_bytes(good[: len(good) // 3])
        rows.append({"path": "img/broken.png", "label": "benign", "patient_id": "p9"})
    return _manifest(root / ("bad.csv" if broken else "good.csv"), rows)


def test_labelled_png_manifest(tmp_path: Path, readers) -> None:
    csv_path = write_png_manifest(tmp_path)
    ds = open_dataset(f"csv:{csv_path}", image_size=32)
    assert isinstance(ds, CsvDataset) and len(ds) == 6 and ds.name == f"csv:{csv_path}"
    assert ds.spatial_dims == 2 and ds.in_chans == 1 and ds.image_size == 32
    assert ds.class_names == ["benign", "malignant"] and list(ds.labels) == [0, 1, 0, 1, 0, 1]
    assert ds.task == "label" and ds.tasks == ("label",)
    assert list(ds.patient_ids) == ["p0", "p0", "p1", "p1", "p2", "p2"]
    for p in np.unique(ds.patient_ids):  # patient-level splits
        assert len(set(ds.splits[ds.patient_ids == p])) == 1
    item = ds[3]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert int(item["label"]) == 1 and item["index"] == 3
    assert open_dataset(f"csv:{csv_path}").image_size == 224  # 2D default


def test_absolute_paths_int_labels_split_column_and_stem_ids(tmp_path: Path, readers) -> None:
    rows = []
    for i, (lab, split) in enumerate([(10, "train"), (2, "train"), (2, "val"), (10, "test")]):
        p = _png(tmp_path / "elsewhere" / f"s{i}.png", seed=i)
        rows.append({"path": str(p), "label": lab, "split": split})
    (tmp_path / "m").mkdir()
    ds = open_dataset(f"csv:{_manifest(tmp_path / 'm' / 'x.csv', rows)}", image_size=16)
    assert ds.class_names == ["2", "10"] and list(ds.labels) == [1, 0, 0, 1]
    assert list(ds.splits) == ["train", "train", "val", "test"]
    assert list(ds.patient_ids) == ["s0", "s1", "s2", "s3"]


def test_multilabel_columns(tmp_path: Path, readers) -> None:
    rows = [
        {"path": str(_png(tmp_path / f"a{i}.png", seed=i)), "label:mass": i % 2, "label:calc": float(i > 1)}
        for i in range(4)
    ]
    ds = open_dataset(f"csv:{_manifest(tmp_path / 'ml.csv', rows)}", image_size=16)
    assert ds.multilabel and ds.task == "multilabel" and ds.class_names == ["mass", "calc"]
    assert ds.labels.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert ds[2]["label"].tolist() == [0.0, 1.0]


def test_rgb_items_follow_the_first_files_channels(tmp_path: Path, readers) -> None:
    gray = _png(tmp_path / "g.png", (16, 16))
    rgb = _png(tmp_path / "c.png", (16, 16, 3), seed=1)
    ds = open_dataset(f"csv:{_manifest(tmp_path / 'm.csv', [{'path': str(gray)}, {'path': str(rgb)}])}", image_size=8)
    assert ds.in_chans == 1 and ds.labels is None and ds[1]["image"].shape == (1, 8, 8)
    ds = open_dataset(f"csv:{_manifest(tmp_path / 'm2.csv', [{'path': str(rgb)}, {'path': str(gray)}])}", image_size=8)
    assert ds.in_chans == 3 and ds[1]["image"].shape == (3, 8, 8)


def test_volumes_manifest_reads_nifti(tmp_path: Path, readers) -> None:
    nibabel = pytest.importorskip("nibabel")
    rows = []
    for i in range(3):
        vol = np.random.default_rng(i).normal(size=(12, 10, 8)).astype(np.float32)
        nibabel.save(nibabel.Nifti1Image(vol, np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / f"v{i}.nii.gz")
        rows.append({"path": f"v{i}.nii.gz", "label": "YES" if i else "NO"})
    csv_path = _manifest(tmp_path / "vols.csv", rows)
    ds = open_dataset(f"volumes:{csv_path}")
    assert ds.spatial_dims == 3 and ds.image_size == 64 and ds.in_chans == 1
    assert list(ds.patient_ids) == ["v0", "v1", "v2"]
    assert open_dataset(f"volumes:{csv_path}", image_size=8)[0]["image"].shape == (1, 8, 8, 8)
    png = _manifest(tmp_path / "png.csv", [{"path": str(_png(tmp_path / "x.png"))}])
    with pytest.raises(DataError, match="needs 3D files"):
        open_dataset(f"volumes:{png}")
    mixed = _manifest(tmp_path / "mixed.csv", [{"path": "v0.nii.gz"}, {"path": str(tmp_path / "x.png")}])
    ds = open_dataset(f"csv:{mixed}", image_size=8)
    with pytest.raises(DataError, match=r"x\.png: 2D, but this dataset is 3D"):
        ds[1]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "manifest not found"),
        ("file,label\na.png,1\n", "no 'path' column"),
        ("path,label\n", "empty manifest"),
        ("path,label\nimg/a.png,1\nimg/missing.png,0\n", r"row 2 \(line 3\): file not found: img/missing.png"),
        ("path,label\nimg/a.png,1\nimg/a.png,\n", "column 'label' has 1 empty value"),
        ("path,label:mass\nimg/a.png,2\n", "is not 0 or 1"),
        ("path,split\nimg/a.png,holdout\n", "split 'holdout'"),
    ],
)
def test_manifest_errors_name_the_problem(tmp_path: Path, content: str | None, needle: str) -> None:
    _png(tmp_path / "img" / "a.png")
    csv_path = tmp_path / "m.csv"
    if content is not None:
        csv_path.write_text(content)
    with pytest.raises(DataError, match=needle):
        open_dataset(f"csv:{csv_path}")


def test_unknown_task_and_missing_argument(tmp_path: Path, readers) -> None:
    csv_path = write_png_manifest(tmp_path, n=2)
    with pytest.raises(DataError, match="no task 'margin'; valid tasks: label"):
        open_dataset(f"csv:{csv_path}", task="margin")
    with pytest.raises(DataError, match="FILE.csv is missing"):
        open_dataset("csv:")


def test_bad_file_is_named_and_drop_bad_skips_it(tmp_path: Path, readers) -> None:
    csv_path = write_png_manifest(tmp_path, n=4, broken=True)
    ds = open_dataset(f"csv:{csv_path}", image_size=16)
    assert len(ds) == 5
    with pytest.raises(DataError, match="broken.png"):
        ds[4]
    kept = drop_bad(ds)
    assert len(kept) == 4 and len(kept.skipped) == 1
    path, reason = kept.skipped[0]
    assert path.endswith("broken.png") and "broken.png" in reason
    assert kept.in_chans == 1 and kept.spatial_dims == 2 and kept.image_size == 16
    assert list(kept.labels) == list(ds.labels[:4]) and list(kept.patient_ids) == list(ds.patient_ids[:4])
    assert sum(len(kept.indices(s)) for s in ("train", "val", "test")) == 4
    assert torch.equal(kept[2]["image"], ds[2]["image"]) and kept[2]["index"] == 2


def test_drop_bad_on_a_clean_dataset_keeps_everything() -> None:
    ds = open_dataset("phantom2d:12", image_size=16)
    kept = drop_bad(ds)
    assert len(kept) == 12 and kept.skipped == [] and kept.class_names == ds.class_names
    assert kept.has_masks and "mask" in kept[0]


# -- manifests that leak or contradict themselves (issue 13) -----------------------------------------------
def _pngs(root: Path, n: int) -> None:
    for i in range(n):
        _png(root / "img" / f"c{i}.png", seed=i)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("path,label,patient_id,split\nimg/c0.png,0,P1,train\nimg/c1.png,1,P2,train\n\nimg/c2.png,0,P1,test\n",
         r"m\.csv: patient 'P1' is in split 'train' \(row 1 \(line 2\)\) and 'test' \(row 3 \(line 5\)\): "
         r"test leakage"),
        ("path,label\nimg/c0.png,benign\nimg/c1.png,benign\nimg/c0.png,malignant\n",
         r"m\.csv: row 1 \(line 2\) and row 3 \(line 4\) list the same file .*c0\.png with different label "
         r"\('benign' and 'malignant'\)"),
        ("path,label\nimg/c0.png,benign\n./img/../img/c0.png,malignant\n",
         r"row 1 \(line 2\) and row 2 \(line 3\) list the same file"),
        ("path,split\nimg/c0.png,train\nimg/c1.png,train\nimg/c0.png,test\n",
         r"row 1 \(line 2\) and row 3 \(line 4\) list the same file .*c0\.png in splits 'train' and 'test': "
         r"test leakage"),
        ("path,label:mass,label:calc\nimg/c0.png,1,0\nimg/c0.png,1,1\n", r"with different label:calc \('0' and '1'\)"),
        ("path,label\nimg/c0.png,1\nimg/c1.png,0\nimg/c2.png,1.0\n",
         r"m\.csv: labels '1' \(row 1 \(line 2\)\) and '1\.0' \(row 3 \(line 4\)\) are the same number written two "
         r"ways"),
        ("path,label\nimg/c0.png,1\nimg/c1.png,01\n", r"labels '1' \(row 1 \(line 2\)\) and '01' \(row 2"),
        ("path,label\nimg/c0.png,0\nimg/c1.png,nan\nimg/c2.png,NaN\n",
         r"m\.csv: row 2 \(line 3\): label 'nan' looks like a missing value \(2 such row\(s\)\)"),
        ("path,label\nimg/c0.png,0\nimg/c1.png,None\n", r"row 2 \(line 3\): label 'None' looks like a missing value"),
        ("path,label,patient_id\nimg/c0.png,0,nan\n", r"row 1 \(line 2\): patient_id 'nan' looks like a missing value"),
        ("path;label\nimg/c0.png;0\n",
         r"no 'path' column \(columns: path;label\); it looks ';'-separated, medssl reads comma-separated manifests"),
        ("path\tlabel\nimg/c0.png\t0\n", r"it looks tab-separated"),
        ("file,label\nimg/c0.png,0\n", r"no 'path' column \(columns: file, label\); a manifest needs"),
        ("path,label\n\n\nimg/c0.png,0\nimg/nope.png,1\n", r"row 2 \(line 5\): file not found: img/nope\.png"),
    ],
)
def test_manifests_that_leak_or_contradict_are_refused(tmp_path: Path, content: str, needle: str) -> None:
    _pngs(tmp_path, 3)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(content)
    with pytest.raises(DataError, match=needle):
        open_dataset(f"csv:{csv_path}", image_size=8)


def test_integer_labels_never_collide_through_floats(tmp_path: Path) -> None:
    _pngs(tmp_path, 3)
    big = (tmp_path / "m.csv")
    big.write_text("path,label\nimg/c0.png,9007199254740993\nimg/c1.png,9007199254740992\nimg/c2.png,2\n")
    ds = open_dataset(f"csv:{big}", image_size=8)  # equal as float64: one class before
    assert ds.class_names == ["2", "9007199254740992", "9007199254740993"] and list(ds.labels) == [2, 1, 0]
    uniform = tmp_path / "u.csv"
    uniform.write_text("path,label\nimg/c0.png,1.0\nimg/c1.png,0.0\nimg/c2.png,1.0\n")  # pandas' float column
    ds = open_dataset(f"csv:{uniform}", image_size=8)
    assert ds.class_names == ["0", "1"] and list(ds.labels) == [1, 0, 1]


def test_exact_duplicate_rows_are_kept_with_a_warning_and_bom_is_read(tmp_path: Path, caplog) -> None:
    _pngs(tmp_path, 2)
    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes("\ufeffpath,label\nimg/c0.png,a\nimg/c1.png,b\nimg/c0.png,a\n".encode())
    with caplog.at_level("WARNING", logger="medssl"):
        ds = open_dataset(f"csv:{csv_path}", image_size=8)
    assert len(ds) == 3 and ds.class_names == ["a", "b"]
    expected = "1 file(s) listed more than once with the same values (first: row 1 (line 2) and row 3 (line 4))"
    assert expected in caplog.text


def test_paths_leaving_the_csv_folder_are_allowed_and_resolved(tmp_path: Path) -> None:
    """Relative paths are relative to the CSV; '..' may leave its folder (absolute paths may go anywhere too)."""
    _png(tmp_path / "outside.png")
    (tmp_path / "sub").mkdir()
    csv_path = tmp_path / "sub" / "m.csv"
    csv_path.write_text("path\n../outside.png\n")
    ds = open_dataset(f"csv:{csv_path}", image_size=8)
    assert Path(ds.sources[0]).resolve() == (tmp_path / "outside.png").resolve()
    assert ds[0]["image"].shape == (1, 8, 8)


def test_too_many_label_classes_is_an_error(tmp_path: Path) -> None:
    from medssl.data.base import MAX_CLASSES

    _png(tmp_path / "a.png")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label\n" + "".join(f"a.png,id{i}\n" for i in range(MAX_CLASSES + 1)))
    with pytest.raises(DataError, match=r"10001 distinct labels; medssl takes at most 10000 classes"):
        CsvDataset(csv_path, image_size=8)
