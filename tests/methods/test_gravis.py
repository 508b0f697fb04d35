"""GraVIS as a method: K views per image grouped by dataset index, gradients, export, 2D and 3D, CLI runs."""

from __future__ import annotations

import csv
import math

import pytest
import safetensors.torch as st
import timm
import torch
import yaml

from medssl.api import make_config, resolve_recipe
from medssl.cli import main
from medssl.config import build_config
from medssl.errors import ConfigError
from medssl.losses.grouping_ap import grouping_ap_loss
from medssl.methods import DataInfo, build_method, get_method
from medssl.methods.gravis import GraVIS
from medssl.transforms.intensity import normalize

# No augmentation: every view of an image is the image itself (resampled at full scale).
PLAIN_VIEWS = {"intensity_p": 0.0, "blur_p": 0.0, "flip_p": 0.0, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0]}


def _method(spatial_dims: int = 2, size: int = 16, views: dict | None = None, **method_kw) -> GraVIS:
    cfg = build_config({
        "method": {"name": "gravis", "proj_hidden": 32, "proj_dim": 16, **method_kw},
        "model": {"backbone": "resnet18"},
        "views": views or {},
    })
    torch.manual_seed(0)
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=spatial_dims, image_size=size, num_samples=100))


def _images(b: int, size: int = 16, spatial_dims: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(b)
    return torch.rand(b, 1, *([size] * spatial_dims), generator=g)


def test_registered_and_makes_num_views_views_per_image():
    # (ViewSpec.num_views, which nothing read, is gone: the step itself makes K views per image)
    assert get_method("gravis") is GraVIS
    for k in (2, 3, 4):
        method = _method(num_views=k)
        assert method.hparams.num_views == k
        assert method.make_views(_images(3)).shape == (3 * k, 1, 16, 16)
    assert GraVIS.config_cls().num_views == 4  # the default, before construction


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("num_views", 1, "num_views"), ("similarity", "l2", "similarity"), ("temperature", 0, "temperature"),
     ("hardness_temperature", -1.0, "hardness_temperature")],
)
def test_bad_settings_are_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"method": {"name": "gravis", key: value}})


def test_step_equals_loss_on_k_views_grouped_by_index():
    """With identical views, the step's loss is the grouping loss of K copies of each image's embedding."""
    # train mode: BatchNorm's batch statistics of K identical copies equal those of the images once
    method = _method(views=PLAIN_VIEWS, num_views=3, temperature=0.01).train()
    images = _images(5)
    index = torch.tensor([41, 7, 19, 3, 28])
    out = method.training_step({"image": images, "index": index})
    with torch.no_grad():
        h = method.backbone(normalize(images))
        z = method.projector(h)
    kw = {"temperature": 0.01, "hardness_temperature": 1.0}
    expected = grouping_ap_loss(z.repeat(3, 1), index.repeat(3), **kw)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # identical views rank their own group first: the loss is near its floor, an image-major grouping is not
    wrong = grouping_ap_loss(z.repeat(3, 1), index.repeat_interleave(3), **kw)
    assert float(out.loss.detach()) < 0.1 < float(wrong)
    assert {"pos_sim", "neg_sim", "embedding_std"} <= set(out.logs)
    assert math.isclose(out.logs["pos_sim"], 1.0, abs_tol=1e-5) and out.logs["neg_sim"] < 1.0
    # fp32 BatchNorm statistics over 15 rows vs 5: equal up to rounding relative to the features' size
    d = float((out.embeddings["backbone"] - h.repeat(3, 1)).abs().max())
    assert d < 1e-4 * float(h.abs().max()), d
    assert out.embeddings["projector"].shape == (15, 16) and not out.embeddings["projector"].requires_grad


def test_gradient_reaches_backbone_and_head():
    method = _method().train()
    out = method.training_step({"image": _images(6), "index": torch.arange(6)})
    assert torch.isfinite(out.loss) and 0.0 < float(out.loss.detach()) < 1.0
    out.loss.backward()
    for name, p in [("conv1", method.backbone.conv1.weight), ("head", method.projector[0].weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_short_batches_work():
    method = _method(num_views=4).train()
    loss = method.training_step({"image": _images(3), "index": torch.tensor([0, 1, 2])}).loss
    assert torch.isfinite(loss)
    # one image: a single group, no heterogeneous view — every positive ranks first by construction
    one = method.training_step({"image": _images(1), "index": torch.tensor([9])})
    assert torch.isfinite(one.loss) and float(one.loss.detach()) < 1e-6
    # no index in the batch (library use): the batch position is the group id
    assert torch.isfinite(method.training_step({"image": _images(4)}).loss)


def test_3d_phantom_step():
    from medssl.data import open_dataset

    ds = open_dataset("phantom3d:8", image_size=16)
    items = [ds[i] for i in range(3)]
    method = _method(spatial_dims=3, size=16, num_views=2).train()
    out = method.training_step({"image": torch.stack([it["image"] for it in items]),
                                "index": torch.tensor([it["index"] for it in items])})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    assert method.export_meta()["backbone"]["spatial_dims"] == "3"


def test_encoders_and_export_meta():
    method = _method()
    assert set(method.encoders()) == {"backbone"} and method.encoders()["backbone"] is method.backbone
    meta = method.export_meta()["backbone"]
    assert meta["format"] == "timm" and meta["model_name"] == "resnet18" and meta["in_chans"] == "1"


def test_recipes_resolve_with_paper_settings():
    paper = yaml.safe_load(resolve_recipe("gravis_isic2017").read_text())
    cfg = make_config(config="gravis_isic2017")
    assert cfg.method["name"] == "gravis" and cfg.method["num_views"] == 4
    assert cfg.method["temperature"] == 0.2 and cfg.method["proj_hidden"] == 2048 and cfg.method["proj_dim"] == 128
    assert cfg.model.backbone == "resnet50" and not cfg.model.pretrained
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 1e-3 and cfg.train.batch_size == 16
    assert paper["data"]["spec"].startswith("isic2017:")
    small = make_config(config="gravis_isic2017_cpu")
    assert small.method["name"] == "gravis" and small.data.spec.startswith("phantom2d")


def _rows(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_cpu_recipe_runs_with_a_short_last_batch(tmp_path):
    """phantom2d:40 has 28 training images: batches of 8 leave a last batch of 4 (drop_last off)."""
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "gravis_isic2017_cpu", "--data", "phantom2d:40", "--batch-size", "8",
                 "--max-steps", "4", "--set", "train.drop_last=false", "--set", "train.log_every_n_steps=1",
                 "--out", str(run), "--quiet"]) == 0
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) for r in rows)


@pytest.mark.slow
def test_cli_pretrain_phantom2d(tmp_path):
    run = tmp_path / "gravis"
    assert main(["pretrain", "--method", "gravis", "--data", "phantom2d", "--image-size", "32", "--batch-size",
                 "16", "--max-steps", "12", "--out", str(run), "--quiet"]) == 0
    rows = _rows(run)
    assert rows and all(math.isfinite(float(r["loss"])) for r in rows)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"]["name"] == "gravis" and cfg["method"]["num_views"] == 4
    model = timm.create_model("resnet18", num_classes=0, in_chans=1)
    model.load_state_dict(st.load_file(str(run / "encoder.safetensors")))  # no key surgery
