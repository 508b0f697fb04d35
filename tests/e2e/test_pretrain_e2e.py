"""End to end on phantom2d: run directory, falling loss, resume, export into timm, evaluation."""

from __future__ import annotations

import csv
import json

import pytest
import safetensors.torch as st
import timm
import torch
import yaml

from medssl.api import pretrain
from medssl.cli import main
from medssl.engine.checkpoint import load_checkpoint
from medssl.methods.mocov2 import MoCoV2

pytestmark = pytest.mark.slow

SMALL = ["--data", "phantom2d:256", "--image-size", "32", "--batch-size", "16", "--backbone", "resnet18",
         "--set", "method.queue_size=64", "--set", "train.log_every_n_steps=2", "--quiet"]


def _rows(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


# Views without augmentation isolate the optimisation machinery (gradients, EMA key encoder, queue) from how
# hard the augmentation invariance is on phantoms: the loss must then fall clearly within 40 steps.
PLAIN_VIEWS = ["--set", "views.intensity_p=0", "--set", "views.blur_p=0", "--set", "views.flip_p=0",
               "--set", "views.crop_scale=[1.0,1.0]", "--set", "views.crop_ratio=[1.0,1.0]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("e2e") / "run"
    assert main(["pretrain", "--method", "mocov2", "--out", str(run), "--max-steps", "40",
                 "--lr", "0.05", *SMALL, *PLAIN_VIEWS]) == 0
    return run


def test_run_directory_is_complete(trained):
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt", "encoder.safetensors"):
        assert (trained / name).is_file() and (trained / name).stat().st_size > 0
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["method"]["name"] == "mocov2" and cfg["method"]["queue_size"] == 64
    assert cfg["data"]["image_size"] == 32 and cfg["optim"]["lr"] == 0.05
    rows = _rows(trained)
    assert [int(r["step"]) for r in rows] == list(range(2, 41, 2))
    assert {"step", "epoch", "loss", "lr", "images_per_s"} <= set(rows[0])
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert load_checkpoint(trained / "checkpoints" / "last.ckpt")["step"] == 40


def test_loss_falls(trained):
    losses = [float(r["loss"]) for r in _rows(trained)]
    # the queue (64 keys = 4 steps) is full from step 4 on; compare the first full-queue window with the last
    early, late = sum(losses[2:6]) / 4, sum(losses[-4:]) / 4
    assert late < early - 0.5, (early, late, losses)


def test_exported_encoder_loads_into_fresh_timm_model_with_same_features(trained):
    sd = st.load_file(str(trained / "encoder.safetensors"))
    fresh = timm.create_model("resnet18", num_classes=0, in_chans=sd["conv1.weight"].shape[1])
    fresh.load_state_dict(sd, strict=True)
    ckpt = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    backbone_state = {k.removeprefix("backbone."): v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    ref = timm.create_model("resnet18", num_classes=0, in_chans=1)
    ref.load_state_dict(backbone_state)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), ref.eval()(x), atol=1e-6)


def test_evaluate_writes_results(trained, tmp_path):
    out = tmp_path / "ev"
    assert main(["evaluate", "--run", str(trained), "--init", "random", "--data", "phantom2d:256",
                 "--protocol", "knn", "--label-fractions", "0.1,1", "--seeds", "0,1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert len(rows) == 2 * 2 * 2
    assert {r["encoder"] for r in rows} == {"mocov2", "random-init"}
    assert all("auc_macro" in r["metrics"] and "label_fraction" in r for r in rows)
    assert "±" in (out / "results.md").read_text()


def test_resume_continues_at_saved_step_and_equals_uninterrupted_run(tmp_path, monkeypatch):
    args = dict(data="phantom2d:128", image_size=32, batch_size=16, max_steps=8, progress=False,
                overrides=["method.queue_size=32", "train.log_every_n_steps=1", "checkpoint.every_n_steps=3",
                           "train.deterministic=true"])
    full = pretrain("mocov2", out=tmp_path / "full", **args)

    original = MoCoV2.after_optimizer_step

    def crash_after_step_4(self, step, total):
        original(self, step, total)
        if step == 4:  # step index 4 = 5th step; the checkpoint at step 3 is the last one on disk
            raise KeyboardInterrupt

    monkeypatch.setattr(MoCoV2, "after_optimizer_step", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain("mocov2", out=tmp_path / "cut", **args)
    monkeypatch.setattr(MoCoV2, "after_optimizer_step", original)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")["step"] == 3
    pretrain(out=tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(full / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert b["step"] == 8
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k
    steps = [int(r["step"]) for r in _rows(tmp_path / "cut")]
    assert steps == list(range(1, 9))


def test_resume_refuses_changed_config(tmp_path):
    pretrain("mocov2", data="phantom2d:64", out=tmp_path / "r", image_size=32, batch_size=16, max_steps=2,
             progress=False, overrides=["method.queue_size=32"])
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--resume", "--max-steps", "3",
                 "--set", "method.temperature=0.5", "--quiet"]) == 2
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.ckpt")["step"] == 3


def test_evaluate_from_training_checkpoint_matches_exported_encoder(trained, tmp_path):
    from medssl.encoders import checkpoint_encoders, load_encoder

    (_, from_ckpt), = checkpoint_encoders(trained / "checkpoints" / "last.ckpt")
    exported = load_encoder(trained / "encoder.safetensors")
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(from_ckpt(x), exported(x), atol=1e-6)


def test_cifar_stem_export_rebuilds(tmp_path):
    from medssl.encoders import load_encoder, read_metadata

    run = pretrain("mocov2", data="phantom2d:64", out=tmp_path / "c", image_size=32, batch_size=16, max_steps=1,
                   progress=False, overrides=["method.queue_size=32", "model.stem=cifar"])
    meta = read_metadata(run / "encoder.safetensors")
    assert meta["stem"] == "cifar" and meta["model_name"] == "resnet18"
    enc = load_encoder(run / "encoder.safetensors")
    assert enc.backbone.conv1.kernel_size == (3, 3) and enc.backbone.conv1.stride == (1, 1)
    # the three lines from the docs rebuild it in plain timm
    sd = st.load_file(str(run / "encoder.safetensors"))
    m = timm.create_model("resnet18", num_classes=0, in_chans=1)
    m.conv1 = torch.nn.Conv2d(1, m.conv1.out_channels, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    m.load_state_dict(sd, strict=True)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m.eval()((x - 0.5) / 0.5), enc(x), atol=1e-6)


def test_3d_pretrain_and_evaluate_on_phantom3d(tmp_path):
    from medssl.api import evaluate
    from medssl.encoders import load_encoder

    run = pretrain("mocov2", data="phantom3d:64", out=tmp_path / "v", batch_size=8, max_steps=2, progress=False,
                   overrides=["method.queue_size=16", "model.backbone=resnet10_3d", "views.flip_axes=[-1,-2,-3]"])
    enc = load_encoder(run / "encoder.safetensors")
    with torch.no_grad():
        assert enc(torch.rand(2, 1, 32, 32, 32)).shape == (2, 512)
    res = evaluate("phantom3d:64", tmp_path / "ev", run=run, protocol="knn", label_fractions=(1.0,), seeds=(0,),
                   progress=False)
    auc = res["rows"][0]["metrics"]["auc_macro"]
    assert 0.0 <= auc <= 1.0  # defined: both classes present in the 3D test split
