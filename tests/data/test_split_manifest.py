"""Split manifests: written by runs and evaluations, read back with --splits; patient-level checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medssl.data import open_dataset
from medssl.data.splits import apply_split_manifest, read_split_manifest, write_split_manifest
from medssl.errors import DataError


def test_round_trip_and_reuse(tmp_path: Path) -> None:
    ds = open_dataset("phantom2d:60", image_size=16)
    sub = {"subset:0.1:seed0": ds.indices("train")[:3]}
    p = write_split_manifest(ds, tmp_path / "splits.csv", sub)
    sources, patients, splits, subsets = read_split_manifest(p)
    assert sources == ds.sources and list(splits) == list(ds.splits) and list(patients) == list(ds.patient_ids)
    assert np.flatnonzero(subsets["subset:0.1:seed0"]).tolist() == ds.indices("train")[:3].tolist()
    # another assignment, patient-level, applied to a fresh copy of the dataset
    other = open_dataset("phantom2d:60", image_size=16)
    new = np.where(np.isin(other.patient_ids, other.patient_ids[:1]), "test", other.splits)
    other.splits = new
    write_split_manifest(other, tmp_path / "moved.csv")
    fresh = open_dataset("phantom2d:60", image_size=16)
    apply_split_manifest(fresh, tmp_path / "moved.csv")
    assert list(fresh.splits) == list(new)


def test_manifest_errors(tmp_path: Path) -> None:
    ds = open_dataset("phantom2d:20", image_size=16)
    with pytest.raises(DataError, match="not found"):
        apply_split_manifest(ds, tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("source,split\nphantom2d#0,holdout\n")
    with pytest.raises(DataError, match="unknown split"):
        apply_split_manifest(ds, tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("source,split\nphantom2d:20#0,train\n")
    with pytest.raises(DataError, match="not in the split manifest"):
        apply_split_manifest(ds, tmp_path / "short.csv")
    rows = ["source,patient_id,split"] + [f"{s},{p},train" for s, p in zip(ds.sources, ds.patient_ids, strict=True)]
    # split one patient across two splits
    first = ds.patient_ids[0]
    k = [i for i, p in enumerate(ds.patient_ids) if p == first]
    assert len(k) > 1, "phantoms have several images per patient"
    rows[1 + k[1]] = rows[1 + k[1]].replace(",train", ",test")
    (tmp_path / "leak.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="both"):
        apply_split_manifest(ds, tmp_path / "leak.csv")
