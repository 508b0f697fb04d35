"""Defaults that follow the run's size: MoCo v2's lr scales with the global batch, the blur with the image size."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.config import build_config
from medssl.engine.trainer import default_lr, resolve_defaults
from medssl.errors import ConfigError
from medssl.methods import get_method
from medssl.transforms.views import ViewConfig, ViewSampler


class _DS:
    image_size = 32


@pytest.mark.parametrize(("batch", "devices", "nodes", "expected"), [
    (64, 1, 1, 0.03), (128, 1, 1, 0.06), (256, 1, 1, 0.12), (32, 4, 1, 0.06), (16, 2, 2, 0.03)])
def test_mocov2_lr_is_linear_in_the_global_batch(batch, devices, nodes, expected):
    cfg = build_config({"method": {"name": "mocov2"},
                        "train": {"batch_size": batch, "devices": devices, "num_nodes": nodes}})
    resolve_defaults(cfg, _DS(), get_method("mocov2"))
    assert math.isclose(cfg.optim.lr, 0.06 * batch * devices * nodes / 128)
    assert math.isclose(cfg.optim.lr, expected)


def test_explicit_lr_and_unscaled_methods_are_left_alone():
    cfg = build_config({"method": {"name": "mocov2"}, "optim": {"lr": 0.5}, "train": {"batch_size": 256}})
    resolve_defaults(cfg, _DS(), get_method("mocov2"))
    assert cfg.optim.lr == 0.5
    cass = get_method("cass")
    assert getattr(cass, "lr_reference_batch", None) is None
    cfg = build_config({"method": {"name": "cass"}, "train": {"batch_size": 256}})
    assert default_lr(cass, cfg.train) == cass.default_lr
    medmoco = get_method("medmoco")  # inherits MoCo v2's rule
    assert math.isclose(default_lr(medmoco, cfg.train), medmoco.default_lr * 256 / medmoco.lr_reference_batch)


@pytest.mark.parametrize(("size", "sd"), [(32, 2), (224, 2), (96, 3), ((40, 64), 2)])
def test_blur_sigma_default_is_relative_to_the_output_size(size, sd):
    sampler = ViewSampler(ViewConfig(), size, sd)
    smallest = min(size) if isinstance(size, tuple) else size
    lo, hi = sampler.blur_sigma
    assert math.isclose(lo, 0.1 * smallest / 224) and math.isclose(hi, 2.0 * smallest / 224)
    explicit = ViewSampler(ViewConfig(blur_sigma=(0.5, 1.5)), size, sd)
    assert explicit.blur_sigma == (0.5, 1.5)


def test_relative_blur_is_what_the_views_get():
    # blur_p = 1 and nothing else random: a view with the default equals one with the explicit scaled range
    cfg = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, intensity_p=0.0, blur_p=1.0)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    a = ViewSampler(ViewConfig(**cfg), 32, 2)(x, generator=torch.Generator().manual_seed(1)).images
    b = ViewSampler(ViewConfig(**cfg, blur_sigma=(0.1 * 32 / 224, 2.0 * 32 / 224)), 32, 2)(
        x, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


@pytest.mark.parametrize(("value", "message"), [
    ("[-1,2]", "views.blur_sigma must be >= 0"), ("[2,1]", "views.blur_sigma must satisfy min <= max"),
    ("[1]", "views.blur_sigma: cannot interpret [1]"), ("soft", "views.blur_sigma: cannot interpret 'soft'")])
def test_blur_sigma_hostile(value, message):
    from medssl.config import parse_set

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build_config({"method": {"name": "mocov2"}}, parse_set([f"views.blur_sigma={value}"]))
    assert build_config({"method": {"name": "mocov2"}}, parse_set(["views.blur_sigma=null"])).views.blur_sigma is None
