"""CBIS-DDSM (Lee et al., "A curated mammography data set for use in computer-aided detection and diagnosis
research", Scientific Data 2017) from its TCIA release.

Spec: ``cbis-ddsm:ROOT`` (full mammograms) or ``cbis-ddsm:ROOT@roi`` (the cropped lesion images).

Expected layout (the TCIA download, unchanged)::

    ROOT/
      mass_case_description_train_set.csv   calc_case_description_train_set.csv
      mass_case_description_test_set.csv    calc_case_description_test_set.csv
      CBIS-DDSM/                               (or the folders directly in ROOT)
        Mass-Training_P_00001_LEFT_CC/07-20-2016-DDSM-74994/1.000000-full mammogram images-24515/1-1.dcm
        Mass-Training_P_00001_LEFT_CC_1/08-07-2016-DDSM-23157/1.000000-ROI mask images-…/1-1.dcm
                                                             1.000000-cropped images-…/1-2.dcm
        …

The CSVs' ``image file path`` / ``cropped image file path`` name DICOM files by UIDs that do not exist in
the TCIA tree; only their FIRST component, the case folder (``Mass-Training_P_00001_LEFT_CC``), matches.
medssl resolves every path through that folder: the exact path if it exists, else the DICOM files found
under the folder — one for a full mammogram; for a lesion folder (mask + crop) the file under a folder
whose name says ``cropped``, else the smaller of the two files (the mask is full-mammogram sized).

Items: with ``@full`` one item per mammogram (abnormalities of one image merged: malignant if any is
malignant, margins the union); with ``@roi`` one item per abnormality. Tasks:

* ``pathology`` (default): ``benign`` (BENIGN, BENIGN_WITHOUT_CALLBACK) vs ``malignant``;
* ``pathology4``: mass/calc × benign/malignant;
* ``mass_margins``: multi-label over the five margins (CIRCUMSCRIBED, ILL_DEFINED, MICROLOBULATED,
  OBSCURED, SPICULATED); combined values such as ``CIRCUMSCRIBED-ILL_DEFINED`` set several labels; mass
  rows only, rows with no margin recorded are dropped.

Splits: the official train / test split of the CSVs; 10 % of the training patients (seeded) form the
validation split. The patient id is ``P_xxxxx`` from the case folder name.
"""

from __future__ import annotations

import csv
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import DataError

from .base import ImageDataset
from .manifest import first_readable, load_file_image
from .readers import DICOM_SUFFIXES, IntensityConfig
from .splits import assign_patient_splits

CBIS_TASKS = ("pathology", "pathology4", "mass_margins")
MARGINS = ("CIRCUMSCRIBED", "ILL_DEFINED", "MICROLOBULATED", "OBSCURED", "SPICULATED")
CSV_NAMES = {
    ("mass", "train"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
    ("calc", "train"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
}
CBIS_DEFAULT_SIZE = 512
_PATIENT = re.compile(r"(P_\d+)")


def _norm(h: str) -> str:
    """Header names differ between the CSVs (``breast_density`` vs ``breast density``)."""
    return re.sub(r"[\s_]+", " ", h.strip().lower())


def _find_csv(root: Path, name: str) -> Path | None:
    direct = root / name
    if direct.is_file():
        return direct
    found = sorted(root.rglob(name))
    return found[0] if found else None


class CbisDdsmDataset(ImageDataset):
    """CBIS-DDSM from the TCIA tree (see the module docstring).

    Args:
        root: The download folder (CSVs and the DICOM tree below it).
        view: ``full`` (mammograms) or ``roi`` (cropped lesions).
        image_size: Side length of the items (default 512: lesion margins need resolution).
        task: One of :data:`CBIS_TASKS` (default ``pathology``).
        seed: Seed of the validation split carved out of the training patients.
        intensity: :class:`~medssl.data.readers.IntensityConfig` (default ``auto``: percentile clipping of
            the 16-bit scans).
        name: Spec string to record.

    Raises:
        DataError: missing root or CSVs, a missing column, an unknown pathology / margin value, a case
            folder not found under the root, a folder without the expected DICOM files, an unknown task.
    """

    def __init__(
        self,
        root: str | Path,
        view: str = "full",
        image_size: int | None = None,
        task: str | None = None,
        seed: int = 0,
        intensity: Any = None,
        name: str | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"cbis-ddsm: root not found or not a directory: {self.root}")
        if view not in ("full", "roi"):
            raise DataError(f"cbis-ddsm: view must be 'full' or 'roi' (cbis-ddsm:ROOT@roi), got {view!r}")
        chosen = task or CBIS_TASKS[0]
        if chosen not in CBIS_TASKS:
            raise DataError(f"cbis-ddsm: no task {task!r}; valid tasks: {', '.join(CBIS_TASKS)}")
        self.view = view
        self.intensity = intensity if intensity is not None else IntensityConfig()
        self._folders = self._index_case_folders()

        csvs = {k: _find_csv(self.root, n) for k, n in CSV_NAMES.items()}
        if not any(csvs.values()):
            raise DataError(f"cbis-ddsm: none of {', '.join(CSV_NAMES.values())} found under {self.root}")
        if chosen == "mass_margins" and not (csvs[("mass", "train")] or csvs[("mass", "test")]):
            raise DataError(f"cbis-ddsm: task mass_margins needs the mass CSVs, none found under {self.root}")
        path_col = "image file path" if view == "full" else "cropped image file path"
        items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        for (kind, split), csv_path in csvs.items():
            if csv_path is None or (chosen == "mass_margins" and kind != "mass"):
                continue
            for line, row in self._rows(csv_path, path_col):
                pathology = row["pathology"].strip().upper()
                if pathology not in ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"):
                    raise DataError(f"{csv_path}: line {line}: unknown pathology {row['pathology']!r}")
                margins: set[str] = set()
                if kind == "mass":
                    raw = (row.get("mass margins") or "").strip().upper()
                    if raw and raw not in ("NAN", "N/A", "NONE"):
                        for m in raw.split("-"):
                            m = m.strip()
                            if m not in MARGINS:
                                raise DataError(f"{csv_path}: line {line}: unknown mass margin {m!r} in {raw!r}; "
                                                f"known: {', '.join(MARGINS)}")
                            margins.add(m)
                if chosen == "mass_margins" and not margins:
                    continue
                rel = row[path_col].strip().replace("\\", "/")
                # one case folder holds one mammogram, whatever UIDs the CSV's rows give its file
                key = rel.split("/")[0] if view == "full" else f"{csv_path.name}#{line}"
                item = items.get(key)
                if item is None:
                    case = rel.split("/")[0]
                    m = _PATIENT.search(case)
                    item = {"rel": rel, "case": case, "csv": csv_path, "line": line, "kind": kind, "split": split,
                            "patient": m.group(1) if m else row.get("patient id", case), "malignant": False,
                            "margins": set()}
                    items[key] = item
                item["malignant"] |= pathology == "MALIGNANT"
                item["margins"] |= margins
        if not items:
            raise DataError(f"cbis-ddsm: no rows for task {chosen} under {self.root}")
        self.files = [self._resolve(it) for it in items.values()]
        its = list(items.values())
        if chosen == "pathology":
            labels = np.array([int(it["malignant"]) for it in its])
            class_names = ["benign", "malignant"]
        elif chosen == "pathology4":
            order = ["mass_benign", "mass_malignant", "calc_benign", "calc_malignant"]
            names = [f"{it['kind']}_{'malignant' if it['malignant'] else 'benign'}" for it in its]
            labels = np.array([order.index(n) for n in names])
            class_names = order
        else:
            labels = np.array([[int(m in it["margins"]) for m in MARGINS] for it in its])
            class_names = [m.lower() for m in MARGINS]
        patients = np.array([it["patient"] for it in its])
        official = np.array([it["split"] for it in its])
        splits = official.copy()
        train = official == "train"
        if train.any():
            sub = assign_patient_splits(patients[train], fractions=(0.9, 0.1, 0.0), seed=seed)
            splits[train] = sub
        first = first_readable(self.files, str(self.root))  # a bad file is left to --skip-bad / inspect
        if first.spatial_dims != 2:
            raise DataError(f"{first.source}: a CBIS-DDSM image must be 2D, got a {first.spatial_dims}D file")
        self._set_metadata(
            name=name or f"cbis-ddsm:{self.root}",
            spatial_dims=2,
            in_chans=1,
            image_size=int(image_size or CBIS_DEFAULT_SIZE),
            labels=labels,
            class_names=class_names,
            multilabel=chosen == "mass_margins",
            patient_ids=patients,
            splits=splits,
            sources=[str(f) for f in self.files],
            task=chosen,
            tasks=CBIS_TASKS,
            has_masks=False,
        )

    # -- CSV ------------------------------------------------------------------------------------------
    @staticmethod
    def _rows(csv_path: Path, path_col: str) -> list[tuple[int, dict[str, str]]]:
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = [_norm(h) for h in reader.fieldnames or []]
                rows = [{_norm(k or ""): (v or "") for k, v in r.items()} for r in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot read {csv_path}: {exc}") from exc
        for col in ("patient id", "pathology", path_col):
            if col not in header:
                raise DataError(f"{csv_path}: no {col!r} column (is this a CBIS-DDSM case description CSV?)")
        return [(i + 2, r) for i, r in enumerate(rows) if any(v.strip() for v in r.values())]

    # -- path resolution ------------------------------------------------------------------------------
    def _index_case_folders(self) -> dict[str, Path]:
        """Case folder name → folder, for every folder at depth ≤ 2 whose name looks like a CBIS case."""
        out: dict[str, Path] = {}
        for base in (self.root, *(p for p in self.root.iterdir() if p.is_dir())):
            for d in base.iterdir():
                if d.is_dir() and ("Training_P_" in d.name or "Test_P_" in d.name):
                    out.setdefault(d.name, d)
        return out

    def _resolve(self, item: dict[str, Any]) -> Path:
        rel, case = item["rel"], item["case"]
        where = f"{item['csv'].name} line {item['line']}"
        for base in (self.root, self.root / "CBIS-DDSM"):
            if (base / rel).is_file():
                return base / rel
        folder = self._folders.get(case)
        if folder is None:
            raise DataError(f"cbis-ddsm: {where}: case folder {case!r} not found under {self.root}")
        dicoms = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES)
        if not dicoms:
            raise DataError(f"cbis-ddsm: {where}: no DICOM file under {folder}")
        if self.view == "full":
            if len(dicoms) > 1:
                raise DataError(f"cbis-ddsm: {where}: {len(dicoms)} DICOM files under {folder}, expected one mammogram")
            return dicoms[0]
        cropped = [p for p in dicoms if any("crop" in part.lower() for part in p.relative_to(folder).parts[:-1])]
        if len(cropped) == 1:
            return cropped[0]
        if len(dicoms) == 1:
            return dicoms[0]
        if len(dicoms) == 2:
            return min(dicoms, key=lambda p: p.stat().st_size)  # the mask is full-mammogram sized
        raise DataError(f"cbis-ddsm: {where}: cannot tell the cropped image among {len(dicoms)} files under {folder}")

    # -- items ----------------------------------------------------------------------------------------
    def preprocessing(self) -> dict[str, Any]:
        import dataclasses

        return {**super().preprocessing(), "intensity": dataclasses.asdict(self.intensity)}

    def item_files(self, index: int) -> list[str]:
        return [str(self.files[index])]

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return load_file_image(self.files[index], self.intensity, 2, 1, self.image_size), None
