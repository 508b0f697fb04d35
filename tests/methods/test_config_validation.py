"""Method settings are checked where they are defined (each method's config dataclass, ``views:``), with the
allowed range in a one-line ConfigError naming ``method.<key>`` / ``views.<key>``; settings that are only wrong
together with the data (an image smaller than the backbone's stride, a patch that does not divide the image, a
one-pixel norm-pix patch, a mask grid of one unit) fail when the method is built, before anything trains, and
name both keys. One case per rule (issue 13, item 5)."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.api import make_config
from medssl.cli import main
from medssl.errors import ConfigError
from medssl.methods import DataInfo, build_method

NAN, INF = math.nan, math.inf

# (method, key, bad value, the allowed range as the message states it)
RANGE_RULES = [
    ("mocov2", "queue_size", 0, ">= 1"),
    ("mocov2", "queue_size", -5, ">= 1"),
    ("mocov2", "momentum", 1.0, "in [0, 1)"),
    ("mocov2", "momentum", 5, "in [0, 1)"),
    ("mocov2", "momentum", -0.1, "in [0, 1)"),
    ("mocov2", "temperature", 0, "> 0"),
    ("mocov2", "temperature", NAN, "finite"),
    ("mocov2", "temperature", INF, "finite"),
    ("mocov2", "proj_dim", 0, ">= 1"),
    ("mocov2", "proj_hidden", -1, ">= 0"),
    ("mocov2", "bn_splits", -1, ">= 0"),
    ("mocov2", "bn_split_min", 1, ">= 2"),
    ("medmoco", "queue_size", 0, ">= 1"),  # MoCo v2's checks hold for Med-MoCo too
    ("medmoco", "local_weight", -0.5, ">= 0"),
    ("medmoco", "local_regions", 0, ">= 1"),
    ("medmoco", "local_region_scale", [0.0, 0.5], "in (0, 1]"),
    ("medmoco", "local_region_scale", [0.5, 1.5], "in (0, 1]"),
    ("medmoco", "local_region_scale", [0.5, 0.2], "min <= max"),
    ("medmoco", "local_temperature", 0, "> 0"),
    ("medmoco", "local_dim", 0, ">= 1"),
    ("medmoco", "local_hidden", -1, ">= 0"),
    ("medmoco", "local_pool_size", 0, ">= 1"),
    ("medmoco", "whitening", "pca", "one of"),
    ("medmoco", "whitening_stats", "pixels", "one of"),
    ("medmoco", "whitening_group_size", -1, ">= 0"),
    ("medmoco", "whitening_eps", 0, "> 0"),
    ("medmoco", "whitening_momentum", 0, "in (0, 1]"),
    ("medmoco", "whitening_momentum", 1.5, "in (0, 1]"),
    ("medmoco", "whitening_iterations", 0, ">= 1"),
    ("gravis", "num_views", 1, ">= 2"),
    ("gravis", "temperature", -0.2, "> 0"),
    ("gravis", "similarity", "l2", "one of"),
    ("gravis", "hardness_temperature", 0, "> 0"),
    ("gravis", "proj_dim", 0, ">= 1"),
    ("gravis", "proj_hidden", -1, ">= 0"),
    ("mae", "mask_ratio", 1.0, "in [0, 1)"),
    ("mae", "mask_ratio", -0.1, "in [0, 1)"),
    ("mae", "mask_strategy", "stripes", "one of"),
    ("mae", "decoder_dim", 0, ">= 1"),
    ("mae", "decoder_depth", 0, ">= 1"),
    ("mae", "decoder_heads", 0, ">= 1"),
    ("mae", "decoder_dim", 30, "multiple of decoder_heads"),
    ("miram", "mask_ratio", 1.0, "in [0, 1)"),  # MAE's checks hold for MIRAM too
    ("miram", "scales", [3], "[2] or [2, 4]"),
    ("miram", "hr_decoder_depth", 0, ">= 1"),
    ("miram", "hr_attention", "linear", "one of"),
    ("miram", "num_landmarks", 0, ">= 1"),
    ("cnnmim", "mask_ratio", 0.0, "in (0, 1)"),
    ("cnnmim", "mask_ratio", 1.0, "in (0, 1)"),
    ("cnnmim", "mask_patch_size", -1, ">= 0"),
    ("cnnmim", "input_fill", "noise", "one of"),
    ("cnnmim", "augment", "heavy", "one of"),
    ("cnnmim", "decoder_channels", [8, 8], "4 widths"),
    ("cnnmim", "decoder_channels", [8, 8, 0, 8], ">= 1"),
    ("cnnmim", "decoder_convs", 0, ">= 1"),
    ("cnnmim", "vis_samples", 0, ">= 1"),
    ("cass", "head", "proj", "one of"),
    ("cass", "embed_dim", -1, ">= 0"),
    ("cass", "mlp_hidden", 0, ">= 1"),
]


@pytest.mark.parametrize(("method", "key", "value", "allowed"), RANGE_RULES,
                         ids=[f"{m}.{k}={v}" for m, k, v, _ in RANGE_RULES])
def test_method_value_out_of_range_is_one_line_naming_the_key(method, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        make_config(method=method, data="phantom2d", overrides=[f"method.{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"method.{key} ") and allowed in msg and "\n" not in msg, msg


VIEW_RULES = [
    ("crop_scale", "[0.5,0.2]", "min <= max"),
    ("crop_scale", "[0,1]", "> 0"),
    ("crop_ratio", "[-1,1]", "> 0"),
    ("gamma", "[0.7,.inf]", "finite"),
    ("blur_sigma", "[-1,2]", ">= 0"),
    ("flip_p", "1.5", "in [0, 1]"),
    ("intensity_p", "-0.1", "in [0, 1]"),
    ("blur_p", "2", "in [0, 1]"),
    ("brightness", ".nan", "finite"),
    ("contrast", "1.5", "in [0, 1]"),
    ("noise_std", "-0.01", ">= 0"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), VIEW_RULES, ids=[f"{k}={v}" for k, v, _ in VIEW_RULES])
def test_view_value_out_of_range_is_one_line_naming_the_key(key, value, allowed):
    with pytest.raises(ConfigError) as e:
        make_config(method="mocov2", data="phantom2d", overrides=[f"views.{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"views.{key} ") and allowed in msg and "\n" not in msg, msg


def test_values_at_the_edges_of_their_ranges_are_accepted():
    make_config(method="mocov2", data="phantom2d", overrides=["method.momentum=0", "method.queue_size=1",
                                                               "method.proj_hidden=0", "views.flip_p=1",
                                                               "views.blur_sigma=[0,0]", "views.noise_std=0"])
    make_config(method="medmoco", data="phantom2d", overrides=["method.local_weight=0", "method.whitening=none",
                                                                "method.local_region_scale=[1,1]",
                                                                "method.whitening_momentum=1"])
    make_config(method="mae", data="phantom2d", overrides=["method.mask_ratio=0"])  # a plain autoencoder
    make_config(method="gravis", data="phantom2d", overrides=["method.num_views=2"])


# -- settings that only fail with the data: at construction, naming both keys -----------------------------------
def _build(method: str, size: int, sd: int = 2, overrides: tuple[str, ...] = (), backbone: str | None = None):
    cfg = make_config(method=method, data="phantom2d" if sd == 2 else "phantom3d", image_size=size,
                      backbone=backbone, overrides=list(overrides))
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=size, num_samples=64))


def _error(method: str, size: int, sd: int = 2, overrides: tuple[str, ...] = (), backbone: str | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        _build(method, size, sd, overrides, backbone)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(("method", "sd", "backbone"), [("mocov2", 2, None), ("gravis", 2, None),
                                                         ("medmoco", 3, "resnet10_3d"), ("cnnmim", 2, None)])
def test_image_smaller_than_half_the_cnn_stride_is_refused(method, sd, backbone):
    """ResNet output stride 32: 16 px still builds (the last stage sees one position), 8 px does not."""
    msg = _error(method, 8, sd, ("method.mask_patch_size=4",) if method == "cnnmim" else (), backbone)
    assert "data.image_size 8" in msg and "model.backbone" in msg and "output stride 32" in msg
    assert "at least 16 px" in msg
    _build(method, 16, sd, ("method.mask_patch_size=4",) if method == "cnnmim" else (), backbone)


def test_the_cifar_stem_lowers_the_minimum_image_size():
    msg = _error("mocov2", 8)
    assert "model.stem=cifar" in msg  # the hint
    _build("mocov2", 8, overrides=("model.stem=cifar",))  # output stride 8: 4 px and up


def test_vit_backbone_patch_size_must_divide_the_image():
    msg = _error("mocov2", 24, backbone="vit_tiny_patch16_224")
    assert "data.image_size 24" in msg and "patch size 16 of model.backbone" in msg and "16 or 32" in msg
    msg = _error("cass", 24)
    assert "data.image_size 24" in msg and "method.vit_backbone" in msg


def test_mae_patch_larger_than_the_image_is_refused():
    msg = _error("mae", 32, overrides=("model.patch_size=64",))
    assert "data.image_size 32" in msg and "model.patch_size" in msg


def test_mae_patch_not_dividing_the_image_is_refused():
    msg = _error("mae", 32, overrides=("model.patch_size=5",))
    assert "data.image_size 32" in msg and "model.patch_size" in msg and "5" in msg


@pytest.mark.parametrize("method", ["mae", "miram"])
def test_a_patch_as_large_as_the_image_masks_nothing_and_is_refused(method):
    msg = _error(method, 32, overrides=("model.patch_size=32",))
    assert "method.mask_ratio 0.75" in msg and "data.image_size 32" in msg and "model.patch_size 32" in msg


def test_one_pixel_norm_pix_patches_are_refused_and_fine_without_norm_pix():
    """A grey one-pixel patch has no variance: norm-pix targets would be 0/0 and train to NaN (issue 13)."""
    msg = _error("mae", 16, overrides=("model.patch_size=1",))
    assert "method.norm_pix_loss" in msg and "model.patch_size 1" in msg and "data.image_size 16" in msg
    method = _build("mae", 16, overrides=("model.patch_size=1", "method.norm_pix_loss=false",
                                          "method.decoder_dim=16", "method.decoder_depth=1", "method.decoder_heads=2"))
    assert torch.isfinite(method.training_step({"image": torch.rand(2, 1, 16, 16)}).loss)


def test_mae_at_8_px_picks_a_2_px_patch_and_trains_finite():
    """The automatic patch is never 1 px any more: MAE at 8 px used to get 1 px patches and train to NaN."""
    cfg = make_config(method="mae", data="phantom2d", image_size=8,
                      overrides=["method.decoder_dim=16", "method.decoder_depth=1", "method.decoder_heads=2"])
    method = build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=8, num_samples=64))
    assert cfg.model.patch_size == 2 and method.encoder.grid == (4, 4)
    torch.manual_seed(0)
    assert torch.isfinite(method.training_step({"image": torch.rand(2, 1, 8, 8)}).loss)


def test_cnnmim_unit_rules_name_method_mask_patch_size():
    msg = _error("cnnmim", 32, overrides=("method.mask_patch_size=1",))
    assert "method.norm_pix_loss" in msg and "method.mask_patch_size 1" in msg
    msg = _error("cnnmim", 32, overrides=("method.mask_patch_size=32",))
    assert "method.mask_ratio" in msg and "method.mask_patch_size 32" in msg and "data.image_size 32" in msg


def test_a_3d_only_mask_strategy_on_2d_data_is_refused_when_mae_is_built():
    assert "3D" in _error("mae", 32, overrides=("method.mask_strategy=tube",))


def test_cass_on_volumes_is_refused_with_its_reason():
    assert "2D images only" in _error("cass", 32, sd=3)


@pytest.mark.parametrize(("argv", "needles"), [
    (["--method", "mocov2", "--image-size", "8"], ["data.image_size 8", "model.backbone"]),
    (["--method", "mae", "--image-size", "16", "--set", "model.patch_size=1"], ["method.norm_pix_loss",
                                                                                 "model.patch_size 1"]),
    (["--method", "mae", "--image-size", "32", "--set", "model.patch_size=32"], ["method.mask_ratio",
                                                                                  "model.patch_size 32"]),
    (["--method", "mocov2", "--set", "method.temperature=0"], ["method.temperature must be"]),
    (["--method", "mocov2", "--set", "method.queue_size=0"], ["method.queue_size must be >= 1"]),
])
def test_cli_refuses_before_training_with_one_line(argv, needles, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", "phantom2d:16", "--batch-size", "4", "--max-steps", "2", "--quiet",
                 "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medssl: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    assert not (out / "metrics.csv").exists() and not (out / "checkpoints" / "last.ckpt").exists()
