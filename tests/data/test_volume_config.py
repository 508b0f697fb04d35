"""The 3D volume settings (data.spacing / volume_mode / patch_size / samples_per_volume / foreground_*): hostile
values exit 2 with one line; the patch loader is resume-exact and reads each volume once per step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medssl.cli import main
from medssl.config import build_config


@pytest.mark.parametrize(("setting", "needle"), [
    ("data.spacing=0", "data.spacing must be in [0.001, 100], got 0"),
    ("data.spacing=[1,-2,1]", "data.spacing must be in [0.001, 100], got -2"),
    ("data.spacing=[1,2]", "data.spacing must be voxel spacing in mm: one number or [z, y, x]"),
    ("data.spacing=[1,.nan,1]", "data.spacing must be a finite number"),
    ("data.spacing=isotropic", "data.spacing must be 'native' or [z, y, x] in mm, got 'isotropic'"),
    ("data.spacing=[1,2,1000]", "data.spacing must be in [0.001, 100], got 1000"),
    ("data.volume_mode=cubes", "data.volume_mode must be one of patches, resize, got 'cubes'"),
    ("data.patch_size=0", "data.patch_size must be in [2, 1024], got 0"),
    ("data.patch_size=[16,16,4096]", "data.patch_size must be in [2, 1024], got 4096"),
    ("data.patch_size=[16,16]", "data.patch_size must be voxels: one number or [z, y, x]"),
    ("data.patch_size=[16,16,8.5]", "data.patch_size must be whole voxel counts, got 8.5"),
    ("data.patch_size=big", "data.patch_size must be one number of voxels or [z, y, x], got 'big'"),
    ("data.samples_per_volume=0", "data.samples_per_volume must be in [1, 64], got 0"),
    ("data.samples_per_volume=1000", "data.samples_per_volume must be in [1, 64], got 1000"),
    ("data.samples_per_volume=two", "data.samples_per_volume: expected an integer, got 'two'"),
    ("data.foreground_p=1.5", "data.foreground_p must be in [0, 1], got 1.5"),
    ("data.foreground_threshold=-0.1", "data.foreground_threshold must be in [0, 1], got -0.1"),
])
def test_hostile_volume_settings_exit_2_with_one_line(setting, needle, tmp_path, capsys):
    argv = ["pretrain", "--method", "cnnmim", "--backbone", "resnet10_3d", "--data", "phantom3d:8", "--max-steps",
            "1", "--out", str(tmp_path / "r"), "--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.startswith("medssl: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_batch_size_must_be_a_multiple_of_samples_per_volume(tmp_path, capsys):
    argv = ["pretrain", "--method", "cnnmim", "--backbone", "resnet10_3d", "--data", "phantom3d:8", "--max-steps",
            "1", "--batch-size", "3", "--out", str(tmp_path / "r"), "--set", "data.samples_per_volume=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.batch_size 3 must be a multiple of data.samples_per_volume 2" in err
    assert len(err.strip().splitlines()) == 1


def _loader(tmp_path, **data):
    from medssl.engine.loader import build_loader, open_data
    from medssl.methods import get_method

    cfg = build_config({"method": "cnnmim", "model": {"backbone": "resnet10_3d"},
                        "data": {"spec": "phantom3d:24", "patch_size": [8, 12, 16], "samples_per_volume": 2, **data},
                        "train": {"batch_size": 4, "seed": 7}})
    run = SimpleNamespace(write_skipped=lambda *_: None, skipped=None)
    ds = open_data(cfg, run, True)
    cfg.data.image_size = ds.image_size  # what the trainer's resolve_defaults does
    fabric = SimpleNamespace(world_size=1, global_rank=0, device=torch.device("cpu"))
    return ds, build_loader(cfg, ds, get_method("cnnmim").view_spec_for(cfg.method), fabric)


def test_patch_loader_is_resume_exact_and_one_read_gives_several_crops(tmp_path):
    ds, data = _loader(tmp_path, foreground_p=0.5)
    assert ds.image_size == 16 and data.info.image_size is not None
    data.sampler.set_epoch(3)
    full = list(data.loader)
    assert len(full) == data.steps_per_epoch and data.steps_per_epoch == len(data.indices) // 2
    first = full[0]
    assert first["image"].shape == (4, 1, 8, 12, 16)
    assert first["index"][0] == first["index"][1] and first["index"][2] == first["index"][3]  # 2 volumes x 2
    assert not torch.equal(first["image"][0], first["image"][1])  # two different crops of one read
    data.sampler.set_epoch(3, start_batch=2)  # a resumed run starts mid-epoch
    resumed = list(data.loader)
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    # a fresh loader (a new process after the resume) draws the same crops; another epoch draws others
    _, again = _loader(tmp_path, foreground_p=0.5)
    again.sampler.set_epoch(3)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full, again.loader, strict=True))
    again.sampler.set_epoch(4)
    assert not torch.equal(next(iter(again.loader))["image"], full[0]["image"])
