"""`medssl inspect` and `medssl pretrain --skip-bad` through the CLI entry point."""

from __future__ import annotations

import csv
from pathlib import Path

from medssl.cli import main
from tests.data.test_isic import make_isic_tree
from tests.data.test_manifest import readers, write_png_manifest  # noqa: F401  (readers is a fixture)


def test_inspect_a_clean_manifest(tmp_path: Path, readers, capsys) -> None:  # noqa: F811
    csv_path = write_png_manifest(tmp_path, n=6)
    assert main(["inspect", "--data", f"csv:{csv_path}", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "items: 6  patients: 3" in out and "labels all: benign: 3, malignant: 3" in out
    assert "shapes (original): (1, 20, 30) x6" in out and "bit depths: 8 x6" in out
    assert "intensity range" in out and "all files readable" in out


def test_inspect_names_every_bad_file_and_exits_1(tmp_path: Path, readers, capsys) -> None:  # noqa: F811
    csv_path = write_png_manifest(tmp_path, n=4, broken=True)
    assert main(["inspect", "--data", f"csv:{csv_path}"]) == 1
    captured = capsys.readouterr()
    assert "unreadable or inconsistent files: 1" in captured.out and "broken.png" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_inspect_user_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["inspect", "--data", "nosuch:spec"]) == 2
    assert main(["inspect", "--data", f"csv:{tmp_path / 'missing.csv'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medssl: error:") and "missing.csv" in err and "Traceback" not in err


def test_inspect_in_memory_datasets_and_isic(tmp_path: Path, readers, capsys) -> None:  # noqa: F811
    assert main(["inspect", "--data", "phantom3d:6", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "items: 6" in out and "(1, 16, 16, 16) x6" in out
    assert main(["inspect", "--data", f"isic2017:{make_isic_tree(tmp_path / 'isic')}"]) == 0
    out = capsys.readouterr().out
    assert "items: 11" in out and "train 6" in out and "(3, 48, 64) x11" in out and "(1, 48, 64) x11" in out


def test_pretrain_skip_bad_writes_skipped_csv(tmp_path: Path, readers, capsys) -> None:  # noqa: F811
    csv_path = write_png_manifest(tmp_path, n=8, broken=True)
    run = tmp_path / "run"
    argv = ["pretrain", "--method", "mocov2", "--data", f"csv:{csv_path}", "--image-size", "32",
            "--batch-size", "2", "--max-steps", "1", "--out", str(run), "--quiet"]
    assert main([*argv, "--skip-bad"]) == 0
    with open(run / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["path"].endswith("broken.png") and rows[0]["reason"]
    assert "skip_bad: true" in (run / "config.yaml").read_text()


# -- hostile data through the CLI (issue 13) ---------------------------------------------------------------
def test_inspect_warns_about_constant_images_and_still_exits_0(tmp_path: Path, capsys) -> None:
    import nibabel as nib
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.RescaleSlope = 0  # every pixel becomes the intercept
    ds.save_as(tmp_path / "slope0.dcm")
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(tmp_path / "ct.dcm")
    (tmp_path / "m.csv").write_text("path\nslope0.dcm\nct.dcm\n")
    assert main(["inspect", "--data", f"csv:{tmp_path / 'm.csv'}"]) == 0
    out = capsys.readouterr().out
    assert "all files readable" in out and "warnings: 1" in out
    assert f"{tmp_path / 'slope0.dcm'}: constant image: every pixel is -1024" in out
    for i in range(2):
        nib.Nifti1Image(np.full((6, 7, 8), 5.0 * i, np.float32), np.eye(4)).to_filename(tmp_path / f"v{i}.nii.gz")
    nib.Nifti1Image(np.arange(336, dtype=np.float32).reshape(6, 7, 8), np.eye(4)).to_filename(tmp_path / "v.nii.gz")
    (tmp_path / "v.csv").write_text("path\nv0.nii.gz\nv1.nii.gz\nv.nii.gz\n")
    assert main(["inspect", "--data", f"volumes:{tmp_path / 'v.csv'}"]) == 0
    out = capsys.readouterr().out
    assert "warnings: 2" in out and "v0.nii.gz: constant image: every pixel is 0" in out
    assert "v1.nii.gz: constant image: every pixel is 5" in out


def test_non_finite_volume_is_reported_and_skipped(tmp_path: Path, capsys) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    lines = ["path,split"]
    for i in range(4):
        vol = rng.uniform(0, 100, (8, 8, 8)).astype(np.float32)
        if i == 1:
            vol[2, 3, 4] = np.nan
        nib.Nifti1Image(vol, np.eye(4)).to_filename(tmp_path / f"v{i}.nii.gz")
        lines.append(f"v{i}.nii.gz,train")
    (tmp_path / "v.csv").write_text("\n".join(lines) + "\n")
    spec = f"volumes:{tmp_path / 'v.csv'}"
    assert main(["inspect", "--data", spec]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'v1.nii.gz'}: 1 non-finite value(s) (1 NaN, 0 inf) among 512" in out
    run = tmp_path / "run"
    argv = ["pretrain", "--method", "mocov2", "--data", spec, "--image-size", "16", "--batch-size", "2",
            "--max-steps", "1", "--out", str(run), "--quiet", "--no-cache"]
    assert main(argv) == 2  # without --skip-bad: one line naming the file
    err = capsys.readouterr().err
    assert "v1.nii.gz: 1 non-finite value(s)" in err and "Traceback" not in err
    assert main([*argv, "--skip-bad", "--out", str(tmp_path / "run2")]) == 0
    with open(tmp_path / "run2" / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["v1.nii.gz"] and "non-finite" in rows[0]["reason"]


def test_unreadable_headers_in_a_folder_are_all_listed_and_skipped(tmp_path: Path, capsys) -> None:
    from tests.data.test_folder import _bad_headers

    root = tmp_path / "data"
    bad = _bad_headers(root)  # 3 unreadable headers among 7 images
    assert main(["inspect", "--data", f"folder:{root}"]) == 1
    out = capsys.readouterr().out
    assert "unreadable or inconsistent files: 3" in out and all(name in out for name in bad)
    run = tmp_path / "run"
    argv = ["pretrain", "--method", "mocov2", "--data", f"folder:{root}", "--image-size", "16", "--batch-size", "2",
            "--max-steps", "1", "--out", str(run), "--quiet", "--no-cache", "--set", "data.split=all"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "empty.png: empty file (0 bytes) (and 2 more unreadable file(s))" in err and "Traceback" not in err
    assert main([*argv, "--skip-bad"]) == 0
    with open(run / "skipped.csv", newline="") as f:
        assert sorted(Path(r["path"]).name for r in csv.DictReader(f)) == sorted(bad)


def test_inspect_tabulates_orientation_spacing_and_warns_on_mixed_and_anisotropic(tmp_path: Path, capsys) -> None:
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    vol = np.random.default_rng(0).random((8, 10, 4)).astype(np.float32)  # x, y, z
    nib.save(nib.Nifti1Image(vol, np.diag([0.5, 0.5, 3.0, 1.0])), tmp_path / "a.nii.gz")
    img = sitk.GetImageFromArray(np.transpose(vol, (2, 1, 0)).copy())
    img.SetSpacing((1.0, 1.0, 1.0))  # identity direction: LPS
    sitk.WriteImage(img, str(tmp_path / "b.mha"))
    (tmp_path / "v.csv").write_text("path\na.nii.gz\nb.mha\n")
    assert main(["inspect", "--data", f"volumes:{tmp_path / 'v.csv'}"]) == 0
    out = capsys.readouterr().out
    assert "RAS x1, LPS x1" in out or "LPS x1, RAS x1" in out
    assert "spacing range: z 1..3, y 0.5..1, x 0.5..1 mm" in out and "size range: z 4..12, y 5..10, x 4..8 mm" in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("  mha") or ln.startswith("  nifti")]
    assert ["mha", "LPS", "->", "RAS", "1", "(1,", "1,", "1)", "4x10x8", "4", "x", "10", "x", "8"] in rows
    assert ["nifti", "RAS", "->", "RAS", "1", "(3,", "0.5,", "0.5)", "4x10x8", "12", "x", "5", "x", "4"] in rows
    assert "warning: mixed orientations (" in out
    assert "warning: extreme anisotropy in 1 volume(s): largest / smallest spacing up to 6.0" in out
