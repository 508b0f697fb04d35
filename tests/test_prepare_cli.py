"""``medssl prepare`` and ``--data shards:...`` on the command line: hostile inputs are one line and exit code 2,
user folders are never overwritten, and a prepared folder works in inspect / embed."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.cli import main


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_shards") / "s"
    assert main(["prepare", "--data", "phantom2d:24", "--image-size", "16", "--out", str(out), "--workers", "1",
                 "--quiet"]) == 0
    return out


def test_prepare_prints_what_it_wrote_and_is_idempotent(shards: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", "--data", "phantom2d:24", "--image-size", "16", "--out", str(shards), "--quiet"]) == 0
    assert "already holds this prepare (24 items)" in capsys.readouterr().out
    assert main(["inspect", "--data", f"shards:{shards}"]) == 0
    out = capsys.readouterr().out
    assert "items: 24" in out and "all files readable" in out


@pytest.mark.parametrize(("argv", "needle"), [
    (["--data", "nosuch:1", "--out", "{tmp}/o"], "unknown data spec 'nosuch:1'"),
    (["--data", "phantom2d:8", "--out", "{tmp}/user"], "not a `medssl prepare` folder; medssl never overwrites"),
    (["--data", "phantom2d:8", "--out", "{tmp}/user/notes.txt"], "is a file"),
    (["--data", "phantom2d:8", "--out", "{shards}"], "another input or preprocessing"),
    (["--data", "phantom2d:8", "--out", "{tmp}/o", "--set", "train.max_steps=3"], "data.* keys only"),
    (["--data", "phantom2d:8", "--out", "{tmp}/o", "--set", "data.nosuch=3"], "unknown config key 'data.nosuch'"),
    (["--data", "phantom2d:8", "--out", "{tmp}/o", "--set", "data.splits=s.csv"], "applied when the shards are read"),
    (["--data", "phantom2d:8", "--out", "{tmp}/o", "--set", "data.intensity.mode=nope"], "intensity"),
    (["--data", "folder:{tmp}/missing", "--out", "{tmp}/o"], "missing"),
])
def test_prepare_user_errors(argv, needle, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{shards}", str(shards)) for a in argv]
    assert main(["prepare", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medssl: error:") and "Traceback" not in err
    assert needle in err
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--workers", "0"], ["--workers", "-2"], ["--workers", "x"], ["--chunk-mb", "0"],
                                   ["--chunk-mb", "nan"], ["--chunk-mb", "inf"], ["--chunk-mb", "big"],
                                   ["--image-size", "0"], []])
def test_prepare_argparse_errors_exit_2(extra, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["prepare", "--data", "phantom2d:8", *extra] + (["--out", str(tmp_path / "o")] if extra else [])
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "needle"), [
    ("shards:", "DIR_OR_URL is missing"),
    ("shards:{tmp}/nope", "does not exist"),
    ("shards:{tmp}", "has no medssl-shards.json"),
    ("shards:s3://medssl-no-such-bucket/x", "cannot read the remote shards"),
])
def test_shards_spec_errors(spec, needle, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x.txt").write_text("not shards")
    assert main(["inspect", "--data", spec.replace("{tmp}", str(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_shards_refuse_settings_they_were_not_prepared_with(shards: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    argv = ["pretrain", "--method", "mocov2", "--data", f"shards:{shards}", "--image-size", "32", "--max-steps", "1",
            "--out", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 2
    assert "prepare --image-size 32" in capsys.readouterr().err
    assert main(["inspect", "--data", f"shards:{shards}", "--task", "pathology"]) == 2
    assert "prepared with task 'margin'" in capsys.readouterr().err


def test_embed_reads_shards(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "emb"
    assert main(["embed", "--init", "random", "--backbone", "resnet18", "--data", f"shards:{shards}", "--out",
                 str(out), "--batch-size", "8", "--device", "cpu"]) == 0
    import numpy as np

    assert np.load(out / "features.npy").shape[0] == 24


def test_data_settings_are_applied_and_recorded(tmp_path: Path) -> None:
    """``--set data.intensity.mode=...`` shapes the items exactly as in a run, and is part of the request."""
    import csv
    import json
    import shutil

    import torch
    from pydicom.data import get_testdata_file

    from medssl.config import DataConfig, IntensityConfig
    from medssl.data.specs import open_dataset, open_from_config

    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "a.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "b.dcm")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["path", "patient_id"], ["a.dcm", "p0"], ["b.dcm", "p1"]])
    spec = f"csv:{tmp_path / 'm.csv'}"
    out = tmp_path / "s"
    assert main(["prepare", "--data", spec, "--image-size", "16", "--out", str(out), "--workers", "1", "--quiet",
                 "--set", "data.intensity.mode=minmax"]) == 0
    ref = open_from_config(DataConfig(spec=spec, image_size=16, intensity=IntensityConfig(mode="minmax"), cache=False))
    default = open_from_config(DataConfig(spec=spec, image_size=16, cache=False))
    ds = open_dataset(f"shards:{out}")
    assert torch.equal(ds[0]["image"], ref[0]["image"]) and not torch.equal(ds[0]["image"], default[0]["image"])
    assert json.loads((out / "medssl-shards.json").read_text())["request"]["intensity"]["mode"] == "minmax"


def test_spacing_and_3d_volume_modes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--spacing`` is ``data.spacing`` (recorded; bad values refused); 3D shards need the resize volume mode."""
    import json

    import nibabel as nib
    import numpy as np
    import torch

    from medssl.config import DataConfig
    from medssl.data.specs import open_dataset, open_from_config

    rng = np.random.default_rng(0)
    rows = ["path,patient_id"]
    for i in range(2):
        nib.save(nib.Nifti1Image(rng.normal(100, 20, (12, 10, 8)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1])),
                 tmp_path / f"v{i}.nii.gz")
        rows.append(f"v{i}.nii.gz,p{i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    spec = f"csv:{tmp_path / 'm.csv'}"
    base = ["prepare", "--data", spec, "--image-size", "8", "--workers", "1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "p"), "--spacing", "2"]) == 2
    assert "data.volume_mode=resize" in capsys.readouterr().err  # patches mode: native-size crops, not shards
    out = tmp_path / "s"
    assert main([*base, "--out", str(out), "--spacing", "2", "--set", "data.volume_mode=resize"]) == 0
    request = json.loads((out / "medssl-shards.json").read_text())["request"]
    assert request["spacing"] == [2.0, 2.0, 2.0] and request["volume_mode"] == "resize"
    ref = open_from_config(DataConfig(spec=spec, image_size=8, spacing=2.0, volume_mode="resize", cache=False))
    ds = open_dataset(f"shards:{out}")
    assert ds.spatial_dims == 3 and torch.equal(ds[1]["image"], ref[1]["image"])
    for bad in ("0", "-1", "a,b,c", "1,2"):
        code = None
        try:
            code = main([*base, "--out", str(tmp_path / "x"), "--spacing", bad, "--set", "data.volume_mode=resize"])
        except SystemExit as e:
            code = e.code
        assert code == 2, bad
        assert "Traceback" not in capsys.readouterr().err
