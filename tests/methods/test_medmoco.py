"""Med-MoCo: switches, equivalence with MoCo v2, gradients of the local term, whitening, export, 2D/3D, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import safetensors.torch as st
import timm
import torch

from medssl.config import build_config
from medssl.encoders import load_encoder
from medssl.errors import ConfigError
from medssl.export import export_encoders
from medssl.methods import DataInfo, build_method, get_method, method_table
from medssl.methods.medmoco import MedMoCo
from medssl.methods.mocov2 import MoCoV2
from medssl.nn.backbones import Encoder
from medssl.nn.whitening import WhitenedBackbone


def _cfg(method: str = "medmoco", *, stem: str = "cifar", size: int = 16, backbone: str = "resnet18", **method_kw):
    return build_config({"method": {"name": method, "queue_size": 32, **method_kw},
                         "model": {"backbone": backbone, "stem": stem}, "data": {"image_size": size}})


def _info(size: int = 16, sd: int = 2) -> DataInfo:
    return DataInfo(in_chans=1, spatial_dims=sd, image_size=size, num_samples=64)


def _build(cls, cfg, info, seed: int = 0):
    torch.manual_seed(seed)
    method = build_method(cfg, info)
    assert type(method) is cls
    return method


def _step(model, images, seed: int = 1):
    torch.manual_seed(seed)
    out = model.training_step({"image": images})
    out.loss.backward()
    return out


def test_registered_with_its_own_config():
    assert get_method("medmoco") is MedMoCo and "medmoco" in dict(method_table())
    cfg = _cfg()
    assert cfg.method["local_weight"] == 0.5 and cfg.method["whitening"] in ("zca", "iternorm")
    for bad in ({"whitening": "pca"}, {"local_weight": -1}, {"local_region_scale": [0.5, 0.2]},
                {"whitening_momentum": 0}, {"local_regions": 0}):
        with pytest.raises(ConfigError):
            _cfg(**bad)


def test_with_both_parts_off_it_is_mocov2():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    moco = _build(MoCoV2, _cfg("mocov2", stem="default"), _info())
    med = _build(MedMoCo, _cfg(local_weight=0, whitening="none", stem="default"), _info())
    assert med.local is None and med.whitening is None
    a, b = _step(moco, images), _step(med, images)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(moco.backbone.conv1.weight.grad, med.backbone.conv1.weight.grad)
    assert set(b.embeddings) == {"backbone", "projector"}


def test_local_term_adds_its_weighted_loss_and_gradient_into_the_backbone():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    off = _build(MedMoCo, _cfg(local_weight=0, whitening="none"), _info())
    on = _build(MedMoCo, _cfg(local_weight=0.5, whitening="none", local_regions=4), _info())
    a, b = _step(off, images), _step(on, images)
    assert b.logs["loss_global"] == pytest.approx(float(a.loss.detach()), rel=1e-6)
    assert float(b.loss.detach()) == pytest.approx(float(b.logs["loss_global"] + 0.5 * b.logs["loss_local"]), rel=1e-6)
    assert b.logs["loss_local"] > 0 and 0 < b.logs["local_valid_fraction"] <= 1
    diff = (on.backbone.conv1.weight.grad - off.backbone.conv1.weight.grad).abs().sum()
    assert diff > 1e-6 * off.backbone.conv1.weight.grad.abs().sum()  # the local term reaches the first layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in on.local.parameters())


@pytest.mark.parametrize("kind", ["zca", "iternorm"])
def test_whitening_sits_between_backbone_and_projector(kind):
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    model = _build(MedMoCo, _cfg(local_weight=0, whitening=kind, whitening_group_size=4, whitening_eps=1e-10,
                                 whitening_iterations=40, stem="default", whitening_stats="pooled"), _info())
    out = _step(model, images)
    w = out.embeddings["whitened"].double()  # 16 query rows (two views of 8 images)
    centred = w - w.mean(0)
    cov = centred.T @ centred / w.shape[0]
    for g in range(0, 512, 4):
        torch.testing.assert_close(cov[g:g + 4, g:g + 4], torch.eye(4, dtype=torch.float64), atol=1e-3, rtol=0)
    # the key encoder whitens with its own statistics; neither layer has trainable parameters
    assert not torch.equal(model.key_whitening.running_mean, torch.zeros_like(model.key_whitening.running_mean))
    assert not list(model.whitening.parameters())


def test_export_loads_strictly_into_timm_and_back_into_medssl(tmp_path):
    images = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    model = _build(MedMoCo, _cfg(stem="default", size=32, whitening="zca", whitening_group_size=8), _info(32))
    for seed in range(3):  # a few steps so the running statistics are not the initial identity
        model.zero_grad()
        _step(model, images, seed)
    paths = export_encoders(model, tmp_path)
    assert [p.name for p in paths] == ["encoder.safetensors"]
    plain = timm.create_model("resnet18", num_classes=0, in_chans=1)
    plain.load_state_dict(st.load_file(str(tmp_path / "encoder.safetensors")), strict=True)
    lin = torch.nn.Linear(512, 512)
    lin.load_state_dict(st.load_file(str(tmp_path / "whitening.safetensors")), strict=True)
    reference = Encoder(WhitenedBackbone(model.backbone, model.whitening)).eval()
    loaded = load_encoder(tmp_path / "encoder.safetensors")
    with torch.no_grad():
        ref = reference(images)
        torch.testing.assert_close(loaded(images), ref, atol=1e-3, rtol=1e-3)
        plain.eval()
        from medssl.transforms.intensity import normalize

        torch.testing.assert_close(lin(plain(normalize(images))), ref, atol=1e-3, rtol=1e-3)
    (tmp_path / "whitening.safetensors").unlink()
    with pytest.raises(Exception, match="whitening"):
        load_encoder(tmp_path / "encoder.safetensors")


def test_3d_volumes():
    vols = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    cfg = _cfg(backbone="resnet10_3d", local_regions=4, whitening="iternorm", whitening_group_size=2)
    model = _build(MedMoCo, cfg, _info(16, sd=3))
    out = _step(model, vols)
    assert torch.isfinite(out.loss) and out.logs["loss_local"] > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_a_vit_backbone_with_the_local_term_is_a_config_error():
    with pytest.raises(ConfigError, match="local_weight"):
        build_method(_cfg(backbone="vit_tiny_patch16_224", stem="default", size=32), _info(32))


def test_cpu_recipe_keeps_a_feature_map_with_distinct_regions():
    from medssl.api import make_config

    cfg = make_config(config="medmoco_phantom2d_cpu", overrides=["train.batch_size=4"])
    assert cfg.method["whitening"] == "zca" and cfg.method["local_weight"] == 0.5
    make_config(config="medmoco_abdomen_ct")  # the paper recipe resolves too
    model = _build(MedMoCo, cfg, _info(32))
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fmap = model.embed_query(images)["feature_map"]
    assert tuple(fmap.shape[2:]) == (4, 4)
    assert model.whitening.group_size == 512 and model.local.num_regions == 8  # one group: the paper's


@pytest.mark.slow
def test_cli_pretrain_logs_rank_columns_and_collapse_protocol(tmp_path):
    from medssl.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--method", "medmoco", "--data", "phantom2d", "--image-size", "32", "--batch-size", "16",
                 "--max-steps", "12", "--out", str(run), "--quiet"]) == 0
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    for col in ("backbone_eff_rank", "backbone_std", "whitened_eff_rank", "projector_eff_rank", "projector_std"):
        assert col in header
    assert rows[0]["backbone_eff_rank"] == ""  # step 10: not a collapse step (every 50) ...
    assert 1.0 <= float(rows[-1]["backbone_eff_rank"]) <= 32.0  # ... step 12, the last, is
    assert {"loss_global", "loss_local"} <= set(header)
    out = tmp_path / "collapse"
    assert main(["evaluate", "--run", str(run), "--data", "phantom2d", "--protocol", "collapse",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    names = [r["encoder"] for r in data["rows"]]
    assert names == ["medmoco", "medmoco (before whitening)"]
    for r in data["rows"]:
        assert 1.0 <= r["metrics"]["eff_rank"] <= 512 and len(r["params"]["spectrum"]) == 512
        assert np.all(np.diff(r["params"]["spectrum"]) <= 1e-9)
    assert (out / "collapse_spectrum.png").stat().st_size > 1000
