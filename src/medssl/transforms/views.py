"""Random augmented views for contrastive self-supervised learning, batched on the device.

A :class:`ViewSampler` turns a batch of ``[0, 1]`` images into one random view per image with a fixed
number of tensor ops (no Python loop over the batch), for 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)``
alike. It follows the MoCo v2 augmentation recipe (Chen et al., "Improved Baselines with Momentum
Contrastive Learning", 2020: random resized crop, flip, colour jitter, Gaussian blur) adapted to medical
images: the colour jitter is replaced by a grayscale-safe intensity jitter (brightness, contrast, gamma)
applied identically to all channels. Each view also reports its crop box and flips, which dense methods
such as Med-MoCo use to find corresponding regions between two views (see
:func:`medssl.transforms.spatial.view_to_source`).

Pipeline per view: random resized crop + flips + resize (one ``grid_sample``) → intensity jitter with
probability ``intensity_p`` (brightness, contrast, gamma, in that order) → Gaussian blur with probability
``blur_p`` → additive Gaussian noise when ``noise_std > 0`` → clamp to ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from medssl.checks import FieldError, check_range
from medssl.errors import ConfigError
from medssl.transforms.intensity import adjust_brightness, adjust_contrast, adjust_gamma
from medssl.transforms.spatial import _as_shape, _rand, crop_resize, gaussian_blur, sample_crop_boxes

__all__ = ["ViewConfig", "ViewSampler", "Views"]


@dataclass
class ViewConfig:
    """Augmentation parameters of one kind of view.

    Attributes:
        crop_scale: Range of the crop's area (2D) / volume (3D) as a fraction of the source.
        crop_ratio: Range of the crop's aspect ratio ``W/H``, drawn log-uniformly; in 3D ``W/H`` and
            ``H/D`` are drawn independently from this range.
        flip_p: Probability of a flip, independently per eligible axis.
        flip_axes: Spatial axes eligible for flips. Negative indices count from the last spatial axis
            (``-1`` = W, ``-2`` = H, ``-3`` = D); non-negative ones index ``(D,) H, W`` from the front.
        intensity_p: Probability that a view gets the intensity jitter (brightness, contrast, gamma).
        brightness: Multiplicative factor ``~ U(1 - brightness, 1 + brightness)`` (torchvision semantics).
        contrast: Factor ``~ U(1 - contrast, 1 + contrast)`` about the per-image mean.
        gamma: Range of the exponent of ``x ** gamma`` (drawn log-uniformly), applied after brightness
            and contrast on the clamped image.
        blur_p: Probability of a Gaussian blur.
        blur_sigma: Range of the blur's standard deviation, in output pixels (drawn uniformly). ``None`` (the
            default) = MoCo v2 / SimCLR's ``(0.1, 2.0)`` at 224 px scaled to the output size: ``(0.1, 2.0) × S / 224``
            with ``S`` the smallest output side (``(0.014, 0.29)`` at 32 px, ``(0.06, 1.14)`` at 128 px), so the
            blur removes the same share of the image's detail at every size (:func:`relative_blur_sigma`).
        noise_std: Standard deviation of additive Gaussian noise, applied to every view when ``> 0``.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    flip_axes: tuple[int, ...] = (-1,)
    intensity_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] | None = None
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        """Validate the values (recipes and ``--set`` overrides end up here).

        Raises:
            FieldError: naming the first invalid field (``build_dataclass`` adds ``views.``).
        """
        self.crop_scale = _pair(self.crop_scale, "crop_scale", low_gt=0.0)
        self.crop_ratio = _pair(self.crop_ratio, "crop_ratio", low_gt=0.0)
        self.gamma = _pair(self.gamma, "gamma", low_gt=0.0)
        if self.blur_sigma is not None:
            self.blur_sigma = _pair(self.blur_sigma, "blur_sigma", low_ge=0.0)
        self.flip_axes = tuple(int(a) for a in self.flip_axes)
        for name in ("flip_p", "intensity_p", "blur_p"):  # probabilities
            check_range(name, getattr(self, name), ge=0, le=1)
        check_range("brightness", self.brightness, ge=0, le=1)
        check_range("contrast", self.contrast, ge=0, le=1)
        check_range("noise_std", self.noise_std, ge=0)


def _pair(value: Sequence[float], name: str, *, low_gt: float | None = None,
          low_ge: float | None = None) -> tuple[float, float]:
    """A finite ``(min, max)`` pair with ``min <= max`` and ``min`` above the given bound.

    Raises:
        FieldError: not two numbers, not finite, out of range or in the wrong order.
    """
    values = tuple(value)
    if len(values) != 2:
        raise FieldError(name, f"must be a (min, max) pair, got {value!r}")
    lo, hi = (float(v) for v in values)
    check_range(name, lo, gt=low_gt, ge=low_ge)
    check_range(name, hi, gt=low_gt, ge=low_ge)
    if lo > hi:
        raise FieldError(name, f"must satisfy min <= max, got ({lo:g}, {hi:g})")
    return lo, hi


#: the blur range of MoCo v2 / SimCLR, at their 224 px crops
BLUR_SIGMA_224: tuple[float, float] = (0.1, 2.0)


def relative_blur_sigma(out_shape: Sequence[int]) -> tuple[float, float]:
    """``blur_sigma = None``: :data:`BLUR_SIGMA_224` scaled by the smallest output side / 224."""
    scale = min(out_shape) / 224.0
    return BLUR_SIGMA_224[0] * scale, BLUR_SIGMA_224[1] * scale


class Views(NamedTuple):
    """A batch of views and the geometry that made them.

    Attributes:
        images: ``(B, C, *out_shape)`` float views in ``[0, 1]`` (not normalised; methods apply
            :func:`medssl.transforms.intensity.normalize`).
        boxes: ``(B, 2 * sd)`` crop boxes ``(starts..., ends...)`` in normalised ``[0, 1]`` source
            coordinates, axis order ``(D,) H, W``.
        flips: ``(B, sd)`` bool, which spatial axes were flipped, axis order ``(D,) H, W``.
    """

    images: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor


class ViewSampler:
    """Draw one random augmented view per image of a batch, with batched tensor ops on its device.

    Example:
        >>> sampler = ViewSampler(ViewConfig(), out_size=224, spatial_dims=2)
        >>> q, k = sampler(images), sampler(images)  # two views for MoCo v2
        >>> loss = infonce(encoder(normalize(q.images)), momentum_encoder(normalize(k.images)))

    Args:
        cfg: Augmentation parameters.
        out_size: Output spatial size: an int (square / cubic) or one int per spatial axis.
        spatial_dims: 2 or 3.

    Raises:
        ConfigError: When ``spatial_dims``, ``out_size`` or ``cfg.flip_axes`` are invalid.
    """

    def __init__(self, cfg: ViewConfig, out_size: int | Sequence[int], spatial_dims: int) -> None:
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        try:
            self.out_shape: tuple[int, ...] = _as_shape(out_size, spatial_dims, "out_size")
        except ValueError as err:
            raise ConfigError(str(err)) from err
        flip_mask = [False] * spatial_dims
        for axis in cfg.flip_axes:
            if not -spatial_dims <= axis < spatial_dims:
                raise ConfigError(
                    f"flip_axes entry {axis} is not a spatial axis for spatial_dims={spatial_dims}"
                )
            flip_mask[axis % spatial_dims] = True
        self.cfg = cfg
        self.blur_sigma = cfg.blur_sigma if cfg.blur_sigma is not None else relative_blur_sigma(self.out_shape)
        self.spatial_dims = spatial_dims
        self.flip_mask: tuple[bool, ...] = tuple(flip_mask)

    def __repr__(self) -> str:
        return f"ViewSampler(out_shape={self.out_shape}, spatial_dims={self.spatial_dims}, cfg={self.cfg})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        """Make one random view of every image.

        Args:
            images: ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D) floating-point images in ``[0, 1]``.
            generator: Optional RNG for reproducible views; on any device (draws are moved to the images'
                device). When ``None``, the global RNG of the images' device is used.

        Returns:
            :class:`Views` with images of shape ``(B, C, *out_shape)`` and the dtype of ``images``.

        Raises:
            ValueError: When ``images`` has the wrong rank or is not floating point.
        """
        sd = self.spatial_dims
        if images.ndim != sd + 2:
            raise ValueError(
                f"expected {sd + 2}D images (B, C, *spatial) for spatial_dims={sd}, got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
        cfg = self.cfg
        b = images.shape[0]
        device = images.device

        boxes = sample_crop_boxes(
            b,
            sd,
            cfg.crop_scale,
            cfg.crop_ratio,
            device=device,
            generator=generator,
            image_shape=images.shape[2:],
        )
        # All per-sample scalars in one draw: sd flips, apply-intensity, brightness, contrast, gamma,
        # apply-blur, sigma.
        u = _rand((b, sd + 6), device, generator)
        eligible = torch.tensor(self.flip_mask, device=device)
        flips = (u[:, :sd] < cfg.flip_p) & eligible
        views = crop_resize(images, boxes, self.out_shape, flips=flips, mode="bilinear")

        if cfg.intensity_p > 0.0:
            apply = u[:, sd] < cfg.intensity_p
            bright = torch.where(apply, 1.0 + cfg.brightness * (2.0 * u[:, sd + 1] - 1.0), 1.0)
            factor = torch.where(apply, 1.0 + cfg.contrast * (2.0 * u[:, sd + 2] - 1.0), 1.0)
            log_g = math.log(cfg.gamma[0]) + (math.log(cfg.gamma[1]) - math.log(cfg.gamma[0])) * u[:, sd + 3]
            gamma = torch.where(apply, torch.exp(log_g), 1.0)
            views = adjust_gamma(adjust_contrast(adjust_brightness(views, bright), factor), gamma)

        if cfg.blur_p > 0.0 and self.blur_sigma[1] > 0.0:
            apply = u[:, sd + 4] < cfg.blur_p
            lo, hi = self.blur_sigma
            sigma = torch.where(apply, lo + (hi - lo) * u[:, sd + 5], 0.0)
            views = gaussian_blur(views, sigma, max_sigma=hi)

        if cfg.noise_std > 0.0:
            if generator is None:
                noise = torch.randn(views.shape, device=device, dtype=views.dtype)
            else:
                noise = torch.randn(views.shape, generator=generator, device=generator.device).to(views)
            views = views + cfg.noise_std * noise

        return Views(images=views.clamp(0.0, 1.0), boxes=boxes, flips=flips)
