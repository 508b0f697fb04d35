"""Tests of medssl.transforms.views.ViewSampler (2D and 3D)."""

from __future__ import annotations

import pytest
import torch

from medssl.errors import ConfigError
from medssl.transforms.spatial import crop_resize, gaussian_blur
from medssl.transforms.views import ViewConfig, Views, ViewSampler

# Geometry only: everything else switched off.
NO_INTENSITY = {"intensity_p": 0.0, "blur_p": 0.0, "noise_std": 0.0}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "sd,in_shape,out",
    [(2, (5, 1, 40, 48), 32), (2, (3, 3, 40, 40), (24, 16)), (3, (3, 1, 20, 24, 28), 16)],
)
def test_shapes_dtypes_range(sd: int, in_shape: tuple[int, ...], out: int | tuple[int, ...]) -> None:
    x = torch.rand(in_shape, generator=_gen(0))
    views = ViewSampler(ViewConfig(noise_std=0.05), out, sd)(x, generator=_gen(1))
    assert isinstance(views, Views)
    out_shape = (out,) * sd if isinstance(out, int) else out
    assert views.images.shape == (in_shape[0], in_shape[1], *out_shape)
    assert views.images.dtype == torch.float32
    assert views.images.min() >= 0 and views.images.max() <= 1
    assert views.boxes.shape == (in_shape[0], 2 * sd) and views.boxes.dtype == torch.float32
    assert views.flips.shape == (in_shape[0], sd) and views.flips.dtype == torch.bool
    assert (views.boxes[:, :sd] >= 0).all() and (views.boxes[:, sd:] <= 1).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_input_dtype_is_kept(dtype: torch.dtype) -> None:
    x = torch.rand(2, 1, 16, 16, generator=_gen(0)).to(dtype)
    views = ViewSampler(ViewConfig(**NO_INTENSITY), 8, 2)(x, generator=_gen(1))
    assert views.images.dtype == dtype
    # Geometry is computed in float32 or better even for bf16 input.
    ref = crop_resize(x.float(), views.boxes, 8, flips=views.flips)
    torch.testing.assert_close(views.images.float(), ref, atol=1e-2, rtol=0)


def test_empty_batch() -> None:
    views = ViewSampler(ViewConfig(noise_std=0.1), 8, 3)(torch.rand(0, 1, 10, 10, 10))
    assert (
        views.images.shape == (0, 1, 8, 8, 8) and views.boxes.shape == (0, 6) and views.flips.shape == (0, 3)
    )


@pytest.mark.parametrize("sd", [2, 3])
def test_reproducible_with_generator_and_global_seed(sd: int) -> None:
    x = torch.rand(4, 1, *([12] * sd), generator=_gen(0))
    sampler = ViewSampler(ViewConfig(noise_std=0.02), 8, sd)
    a, b = sampler(x, generator=_gen(7)), sampler(x, generator=_gen(7))
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta, tb)
    c = sampler(x, generator=_gen(8))
    assert not torch.equal(a.images, c.images)
    torch.manual_seed(3)
    d = sampler(x)
    torch.manual_seed(3)
    e = sampler(x)
    for td, te in zip(d, e, strict=True):
        assert torch.equal(td, te)


def test_views_differ_per_sample() -> None:
    x = torch.rand(1, 1, 32, 32, generator=_gen(0)).repeat(8, 1, 1, 1)
    views = ViewSampler(ViewConfig(), 16, 2)(x, generator=_gen(1))
    assert torch.unique(views.boxes, dim=0).shape[0] == 8
    flat = views.images.reshape(8, -1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))


@pytest.mark.parametrize("sd,flip_axes", [(2, (-1,)), (2, (-1, -2)), (3, (0, -1))])
def test_geometry_matches_boxes_and_flips(sd: int, flip_axes: tuple[int, ...]) -> None:
    x = torch.rand(6, 2, *([16] * sd), generator=_gen(0))
    cfg = ViewConfig(flip_axes=flip_axes, **NO_INTENSITY)
    views = ViewSampler(cfg, 8, sd)(x, generator=_gen(2))
    torch.testing.assert_close(views.images, crop_resize(x, views.boxes, 8, flips=views.flips))
    eligible = torch.zeros(sd, dtype=torch.bool)
    eligible[list(flip_axes)] = True
    assert not views.flips[:, ~eligible].any()


def test_flip_probability_and_full_view() -> None:
    # Full-image crops and only flips: each view is the input, flipped where reported.
    x = torch.rand(400, 1, 8, 8, generator=_gen(0))
    cfg = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_axes=(-1, -2), **NO_INTENSITY)
    views = ViewSampler(cfg, 8, 2)(x, generator=_gen(1))
    torch.testing.assert_close(views.boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(400, 4))
    rate = views.flips.float().mean(dim=0)
    assert ((rate - 0.5).abs() < 0.1).all()
    for fh, fw in [(False, False), (False, True), (True, False), (True, True)]:
        sel = (views.flips[:, 0] == fh) & (views.flips[:, 1] == fw)
        dims = [d for d, f in ((2, fh), (3, fw)) if f]
        ref = torch.flip(x[sel], dims) if dims else x[sel]
        torch.testing.assert_close(views.images[sel], ref, atol=1e-6, rtol=0)


def test_non_square_full_scale_falls_back_to_centre_crop() -> None:
    # Ratio 1 on a 6 x 8 image cannot cover it all: the largest centred square (6 x 6) is taken.
    views = ViewSampler(_full_view_cfg(), 6, 2)(torch.rand(2, 1, 6, 8))
    torch.testing.assert_close(views.boxes, torch.tensor([[0.0, 0.125, 1.0, 0.875]] * 2))


def _full_view_cfg(**kwargs: float | tuple[float, float]) -> ViewConfig:
    base: dict = {
        "crop_scale": (1.0, 1.0),
        "crop_ratio": (1.0, 1.0),
        "flip_p": 0.0,
        "intensity_p": 0.0,
        "brightness": 0.0,
        "contrast": 0.0,
        "gamma": (1.0, 1.0),
        "blur_p": 0.0,
        "noise_std": 0.0,
    }
    base.update(kwargs)
    return ViewConfig(**base)


def test_brightness_is_a_per_sample_factor_in_range() -> None:
    x = 0.4 + 0.2 * torch.rand(300, 1, 8, 8, generator=_gen(0))  # no clamping for factors <= 1.3
    cfg = _full_view_cfg(intensity_p=0.8, brightness=0.3)
    out = ViewSampler(cfg, 8, 2)(x, generator=_gen(1)).images
    ratio = (out / x).reshape(300, -1)
    factor = ratio.mean(dim=1)
    torch.testing.assert_close(ratio, factor.unsqueeze(1).expand_as(ratio), atol=1e-5, rtol=0)
    assert (factor - 1).abs().max() <= 0.3 + 1e-5
    unchanged = ((factor - 1).abs() < 1e-6).float().mean()
    assert 0.1 < unchanged < 0.3  # ~ 1 - intensity_p
    assert factor.max() > 1.2 and factor.min() < 0.8


def test_contrast_and_gamma_ranges() -> None:
    x = torch.rand(200, 1, 8, 8, generator=_gen(0)) * 0.5 + 0.25
    out = ViewSampler(_full_view_cfg(intensity_p=1.0, contrast=0.4), 8, 2)(x, generator=_gen(1)).images
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    factor = ((out - mean) / (x - mean)).reshape(200, -1).median(dim=1).values
    assert factor.min() >= 0.6 - 1e-3 and factor.max() <= 1.4 + 1e-3 and factor.std() > 0.15
    out = ViewSampler(_full_view_cfg(intensity_p=1.0, gamma=(0.7, 1.4)), 8, 2)(x, generator=_gen(2)).images
    gamma = (torch.log(out) / torch.log(x)).reshape(200, -1).median(dim=1).values
    assert gamma.min() >= 0.7 - 1e-3 and gamma.max() <= 1.4 + 1e-3
    assert ((gamma < 1).float().mean() - 0.5).abs() < 0.15  # log-uniform: as likely to brighten as darken


def test_blur_matches_gaussian_blur() -> None:
    x = torch.rand(4, 1, 6, 6, 6, generator=_gen(0))
    out = ViewSampler(_full_view_cfg(blur_p=1.0, blur_sigma=(1.0, 1.0)), 6, 3)(x).images
    torch.testing.assert_close(out, gaussian_blur(x, torch.ones(4)), atol=1e-6, rtol=0)


def test_noise_std() -> None:
    x = torch.full((4, 1, 64, 64), 0.5)
    out = ViewSampler(_full_view_cfg(noise_std=0.05), 64, 2)(x, generator=_gen(0)).images
    assert abs(float((out - x).std()) - 0.05) < 0.003


def test_invalid_config_and_inputs() -> None:
    with pytest.raises(ConfigError):
        ViewConfig(crop_scale=(0.5, 0.2))
    with pytest.raises(ConfigError):
        ViewConfig(flip_p=1.5)
    with pytest.raises(ConfigError):
        ViewSampler(ViewConfig(flip_axes=(-3,)), 8, 2)
    with pytest.raises(ConfigError):
        ViewSampler(ViewConfig(), (8, 8), 3)
    with pytest.raises(ConfigError):
        ViewSampler(ViewConfig(), 8, 1)
    sampler = ViewSampler(ViewConfig(), 8, 2)
    with pytest.raises(ValueError):
        sampler(torch.rand(2, 1, 8, 8, 8))
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
