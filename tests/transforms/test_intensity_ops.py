"""Tests of the per-sample intensity ops in medssl.transforms.intensity against numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.transforms.intensity import MEAN, STD, adjust_brightness, adjust_contrast, adjust_gamma, normalize


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 2, 6, 7, generator=torch.Generator().manual_seed(0))


def test_normalize_unchanged() -> None:
    assert (MEAN, STD) == (0.5, 0.5)
    torch.testing.assert_close(normalize(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))


def test_adjust_brightness(images: torch.Tensor) -> None:
    factor = torch.tensor([0.7, 1.0, 1.25])
    ref = np.clip(images.numpy() * factor.numpy()[:, None, None, None], 0, 1)
    np.testing.assert_allclose(adjust_brightness(images, factor).numpy(), ref, atol=1e-6)


def test_adjust_contrast_about_per_image_mean(images: torch.Tensor) -> None:
    factor = torch.tensor([0.6, 1.0, 1.4])
    x = images.numpy().astype(np.float64)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)  # one mean per image over all channels
    ref = np.clip(mean + factor.numpy()[:, None, None, None] * (x - mean), 0, 1)
    out = adjust_contrast(images, factor)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    torch.testing.assert_close(out[1], images[1])


def test_adjust_gamma_3d() -> None:
    x = torch.rand(2, 1, 3, 4, 5, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1
    gamma = torch.tensor([0.7, 1.4])
    ref = np.clip(x.numpy(), 0, 1) ** gamma.numpy()[:, None, None, None, None]
    out = adjust_gamma(x, gamma)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1


def test_scalar_values_and_shape_check(images: torch.Tensor) -> None:
    torch.testing.assert_close(adjust_gamma(images, 1.0), images)
    with pytest.raises(ValueError):
        adjust_brightness(images, torch.zeros(2))
