"""CBIS-DDSM: a miniature TCIA tree with the real CSV columns and folder naming, real DICOM files inside."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from medssl.data import open_dataset
from medssl.errors import DataError

pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

MASS_COLS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"]
CALC_COLS = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"]
UID = "1.3.6.1.4.1.9590.100.1.2.{}"


def _case(tree: Path, case: str, full: bool) -> None:
    """A TCIA-style case folder: names differ from the CSV's UIDs below the first component."""
    if full:
        d = tree / case / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515"
        d.mkdir(parents=True)
        shutil.copy(get_testdata_file("CT_small.dcm"), d / "1-1.dcm")
    else:
        base = tree / case / "08-07-2016-DDSM-23157"
        (base / "1.000000-ROI mask images-40347").mkdir(parents=True)
        (base / "1.000000-cropped images-12345").mkdir(parents=True)
        shutil.copy(get_testdata_file("CT_small.dcm"), base / "1.000000-ROI mask images-40347" / "1-1.dcm")
        shutil.copy(get_testdata_file("MR_small.dcm"), base / "1.000000-cropped images-12345" / "1-2.dcm")


def make_cbis(root: Path) -> Path:
    tree = root / "CBIS-DDSM"
    specs = [  # (kind, split, patient, side, abnormality, margins, pathology)
        ("mass", "train", "P_00001", "LEFT_CC", 1, "SPICULATED", "MALIGNANT"),
        ("mass", "train", "P_00001", "LEFT_CC", 2, "CIRCUMSCRIBED-ILL_DEFINED", "BENIGN"),
        ("mass", "train", "P_00004", "RIGHT_MLO", 1, "OBSCURED", "BENIGN_WITHOUT_CALLBACK"),
        ("mass", "train", "P_00009", "LEFT_MLO", 1, "MICROLOBULATED", "MALIGNANT"),
        ("mass", "test", "P_00016", "LEFT_CC", 1, "ILL_DEFINED", "BENIGN"),
        ("calc", "train", "P_00005", "RIGHT_CC", 1, "", "MALIGNANT"),
        ("calc", "test", "P_00038", "LEFT_CC", 1, "", "BENIGN"),
    ]
    rows: dict[tuple[str, str], list[dict[str, str]]] = {}
    for k, (kind, split, pid, side, ab, margins, path) in enumerate(specs):
        prefix = f"{kind.capitalize()}-{'Training' if split == 'train' else 'Test'}_{pid}_{side}"
        if not (tree / prefix).exists():
            _case(tree, prefix, full=True)
        _case(tree, f"{prefix}_{ab}", full=False)
        r = {c: "" for c in (MASS_COLS if kind == "mass" else CALC_COLS)}
        r.update({"patient_id": pid, "abnormality id": str(ab), "abnormality type": kind, "pathology": path,
                  "image file path": f"{prefix}/{UID.format(k)}/{UID.format(k + 100)}/000000.dcm",
                  "cropped image file path": f"{prefix}_{ab}/{UID.format(k)}/{UID.format(k + 200)}/000001.dcm",
                  "ROI mask file path": f"{prefix}_{ab}/{UID.format(k)}/{UID.format(k + 200)}/000000.dcm\n"})
        if kind == "mass":
            r["mass margins"] = margins
        rows.setdefault((kind, split), []).append(r)
    for (kind, split), rs in rows.items():
        with open(root / f"{kind}_case_description_{split}_set.csv", "w", newline="") as f:
            w = csv.DictWriter(f, MASS_COLS if kind == "mass" else CALC_COLS)
            w.writeheader()
            w.writerows(rs)
    return root


def test_full_mammograms_pathology(tmp_path: Path) -> None:
    root = make_cbis(tmp_path)
    ds = open_dataset(f"cbis-ddsm:{root}", image_size=32)
    # two abnormalities of P_00001 LEFT_CC share one mammogram: 6 images, malignant if any is
    assert len(ds) == 6 and ds.class_names == ["benign", "malignant"]
    src = {Path(s).parts[-4]: int(y) for s, y in zip(ds.sources, ds.labels, strict=True)}
    assert src["Mass-Training_P_00001_LEFT_CC"] == 1 and src["Mass-Training_P_00004_RIGHT_MLO"] == 0
    assert all(s.endswith("1-1.dcm") and "full mammogram" in s for s in ds.sources)
    assert set(ds.splits[[("Test" in s) for s in ds.sources]]) == {"test"}
    assert set(ds.patient_ids) == {"P_00001", "P_00004", "P_00009", "P_00016", "P_00005", "P_00038"}
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and 0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1


def test_roi_crops_pathology4_and_margins(tmp_path: Path) -> None:
    root = make_cbis(tmp_path)
    roi = open_dataset(f"cbis-ddsm:{root}@roi", image_size=16, task="pathology4")
    assert len(roi) == 7  # one item per abnormality
    assert all("cropped images" in s for s in roi.sources)  # not the (larger) ROI mask next to it
    names = [roi.class_names[y] for y in roi.labels]
    assert names.count("calc_malignant") == 1 and names.count("mass_malignant") == 2
    mm = open_dataset(f"cbis-ddsm:{root}@roi", image_size=16, task="mass_margins")
    assert mm.multilabel and len(mm) == 5
    combined = mm.labels[1]  # CIRCUMSCRIBED-ILL_DEFINED -> two labels
    assert combined.tolist() == [1, 1, 0, 0, 0]
    assert mm.labels.sum(axis=1).min() >= 1


def test_cbis_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="root not found"):
        open_dataset(f"cbis-ddsm:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="mass_case_description_train_set.csv"):
        open_dataset(f"cbis-ddsm:{tmp_path / 'empty'}")
    root = make_cbis(tmp_path / "c")
    with pytest.raises(DataError, match="valid tasks"):
        open_dataset(f"cbis-ddsm:{root}", task="density")
    shutil.rmtree(root / "CBIS-DDSM" / "Mass-Training_P_00009_LEFT_MLO")
    with pytest.raises(DataError, match=r"line \d+: case folder 'Mass-Training_P_00009_LEFT_MLO' not found"):
        open_dataset(f"cbis-ddsm:{root}")
    p = root / "calc_case_description_test_set.csv"
    p.write_text(p.read_text().replace("BENIGN", "MAYBE"))
    with pytest.raises(DataError, match="unknown pathology 'MAYBE'"):
        open_dataset(f"cbis-ddsm:{root}@roi")


def test_medmnist_by_name_from_the_local_folder_and_offline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDSSL_MEDMNIST_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    sizes = [("train", 8), ("val", 2), ("test", 4)]
    arrays = {f"{s}_images": rng.integers(0, 255, (n, 64, 64), dtype=np.uint8) for s, n in sizes}
    arrays.update({f"{s}_labels": rng.integers(0, 2, (n, 1)) for s, n in sizes})
    np.savez(tmp_path / "pneumoniamnist_64.npz", **arrays)
    ds = open_dataset("medmnist:pneumoniamnist@64")
    assert len(ds) == 14 and ds.image_size == 64 and ds.name == "medmnist:pneumoniamnist@64"
    with pytest.raises(DataError, match="SIZE must be one of"):
        open_dataset("medmnist:pneumoniamnist@100")
    import sys

    monkeypatch.setitem(sys.modules, "medmnist", None)  # not installed
    with pytest.raises(DataError, match=r"not found and the medmnist package is not installed.*npz:PATH"):
        open_dataset("medmnist:pneumoniamnist@128")
