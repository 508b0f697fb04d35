"""Batched spatial augmentations for 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` images.

Everything here runs as a handful of tensor ops on the images' device, with no Python loop over the
batch, so views can be drawn inside the training step.

Coordinate convention (used by every function in this module): a point is given in *normalised source
coordinates* ``u in [0, 1]`` per spatial axis, in axis order ``(D,) H, W``. ``0`` is the outer edge of the
first pixel and ``1`` the outer edge of the last one, so the centre of pixel ``i`` of an axis with ``n``
pixels lies at ``(i + 0.5) / n`` (the ``align_corners=False`` convention of
:func:`torch.nn.functional.grid_sample`). A crop box is ``(starts..., ends...)`` in these coordinates, and a
view's own pixels use the same convention relative to the box, so the maps between view and source are
simple per-axis affine maps (:func:`view_to_source`, :func:`source_to_view`).

The random resized crop follows RandomResizedCrop (Szegedy et al., "Going deeper with convolutions",
CVPR 2015, as implemented in torchvision): an area fraction drawn uniformly from ``scale``, an aspect ratio
drawn log-uniformly from ``ratio``, the box placed uniformly inside the image, and a centre-crop fallback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "crop_resize",
    "gaussian_blur",
    "normalized_to_pixel",
    "pixel_to_normalized",
    "sample_crop_boxes",
    "source_to_view",
    "view_to_source",
]


def _rand(
    shape: Sequence[int], device: torch.device | str, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform ``[0, 1)`` draws on ``device``, from ``generator`` when given (on its own device).

    Drawing on the generator's device and moving the result lets a CPU generator drive GPU augmentations
    (the draws are tiny); without a generator the global RNG of ``device`` is used.
    """
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def _as_shape(size: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """Expand an int to a ``spatial_dims``-tuple and validate a sequence of sizes."""
    shape = (int(size),) * spatial_dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(shape) != spatial_dims or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a positive int or {spatial_dims} positive ints, got {size!r}")
    return shape


def sample_crop_boxes(
    n: int,
    spatial_dims: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    *,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    image_shape: Sequence[int] | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """Sample random-resized-crop boxes for ``n`` images at once.

    RandomResizedCrop semantics, vectorised: for every sample, ``attempts`` candidate boxes are drawn at
    once, each with an area (2D) / volume (3D) fraction ``s ~ U(scale)`` of the source and aspect ratios
    drawn log-uniformly from ``ratio``; the first candidate that fits inside the image is kept and placed
    uniformly at random inside it. Samples with no fitting candidate get the largest centred box whose
    aspect ratios are the image's own clamped to ``ratio`` (the whole image when those are in range).

    Aspect ratios are ratios of *adjacent* spatial axes measured in pixels: ``W/H`` in 2D (torchvision's
    ``w / h``), and ``W/H`` and ``H/D`` drawn independently in 3D. Boxes are continuous (not rounded to
    whole pixels); :func:`crop_resize` resamples sub-pixel boxes exactly.

    Args:
        n: Number of boxes.
        spatial_dims: 2 or 3.
        scale: ``(min, max)`` fraction of the source area / volume covered by the box.
        ratio: ``(min, max)`` aspect ratio of adjacent axes (see above).
        device: Device of the returned tensor.
        generator: Optional RNG; the global RNG of ``device`` is used when ``None``.
        image_shape: Spatial shape of the source in pixels, used so that ratios are measured in pixels on
            non-square (non-cubic) images. ``None`` treats the source as square / cubic.
        attempts: Candidates drawn per sample before falling back to the centre crop.

    Returns:
        ``(n, 2 * spatial_dims)`` float32 boxes ``(starts..., ends...)`` in normalised source coordinates,
        axis order ``(D,) H, W``, with ``0 <= start < end <= 1``.

    Raises:
        ValueError: On invalid ``spatial_dims``, ranges or shapes.
    """
    _check_spatial_dims(spatial_dims)
    if not 0.0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    sd = spatial_dims
    shape = (1,) * sd if image_shape is None else _as_shape(image_shape, sd, "image_shape")
    pixels = torch.tensor(shape, dtype=torch.float32, device=device)  # (sd,)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])

    # Draw everything in one call so a seeded generator gives one reproducible stream.
    u = _rand((n, attempts, 2 * sd), device, generator)
    area = scale[0] + (scale[1] - scale[0]) * u[..., 0]  # (n, K) fraction of the source
    log_adj = log_lo + (log_hi - log_lo) * u[..., 1:sd]  # (n, K, sd-1): log(side_{k+1} / side_k)
    # Pixel side lengths: log l_k = log l_0 + sum_{j<k} a_j (the drawn adjacent log-ratios), with l_0 fixed
    # by sum_k log l_k = log(area * prod(pixels)).
    cum = torch.cat([torch.zeros_like(log_adj[..., :1]), torch.cumsum(log_adj, dim=-1)], dim=-1)  # (n,K,sd)
    log_volume = torch.log(area) + torch.log(pixels).sum()
    log_first = (log_volume - cum.sum(dim=-1)) / sd
    sides = torch.exp(log_first.unsqueeze(-1) + cum) / pixels  # (n, K, sd) normalised side lengths
    valid = (sides <= 1.0).all(dim=-1)  # (n, K)

    first = torch.argmax(valid.to(torch.int8), dim=1)  # index of first valid candidate (0 if none)
    any_valid = valid.any(dim=1)
    idx = first.view(n, 1, 1).expand(n, 1, sd)
    chosen = torch.gather(sides, 1, idx).squeeze(1)  # (n, sd)
    pos = torch.gather(u[..., sd:], 1, idx).squeeze(1)  # (n, sd) placement draws

    # Fallback: largest centred box whose adjacent ratios are the image's own clamped into ``ratio``.
    log_pix = torch.log(pixels)
    fb_adj = (log_pix[1:] - log_pix[:-1]).clamp(log_lo, log_hi)
    fb_cum = torch.cat([torch.zeros_like(fb_adj[:1]), torch.cumsum(fb_adj, dim=0)])
    fb_first = (log_pix - fb_cum).min()
    fb_sides = (torch.exp(fb_first + fb_cum) / pixels).clamp(max=1.0)

    sides = torch.where(any_valid.unsqueeze(-1), chosen, fb_sides.expand(n, sd))
    pos = torch.where(any_valid.unsqueeze(-1), pos, torch.full_like(pos, 0.5))
    starts = pos * (1.0 - sides)
    ends = (starts + sides).clamp(max=1.0)
    return torch.cat([starts, ends], dim=-1)


def _split_boxes(boxes: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    if boxes.ndim != 2 or boxes.shape[1] != 2 * spatial_dims:
        raise ValueError(f"boxes must have shape (B, {2 * spatial_dims}), got {tuple(boxes.shape)}")
    return boxes[:, :spatial_dims], boxes[:, spatial_dims:]


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    out_shape: int | Sequence[int],
    flips: torch.Tensor | None = None,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Crop every sample's box, flip it and resample it to ``out_shape`` in one ``grid_sample`` call.

    The crop, the flips and the resize are one affine map per sample (a flip is a negative scale), so the
    whole batch costs one :func:`torch.nn.functional.affine_grid` and one
    :func:`torch.nn.functional.grid_sample` (``align_corners=False``). Output pixel ``j`` of an axis with
    ``m`` output pixels samples the source at ``start + (j + 0.5) / m * (end - start)`` (mirrored inside
    the box when flipped), so a full box at the same size reproduces the input and a box covering exactly
    ``k`` whole pixels resized to ``k`` pixels is an exact slice.

    Args:
        images: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` floating-point images.
        boxes: ``(B, 2 * sd)`` boxes ``(starts..., ends...)`` in normalised source coordinates, axis order
            ``(D,) H, W`` (see :func:`sample_crop_boxes`). Boxes may extend outside ``[0, 1]``; outside
            samples follow ``padding_mode``.
        out_shape: Output spatial size, an int or one int per spatial axis.
        flips: Optional ``(B, sd)`` bool tensor: which spatial axes to mirror, axis order ``(D,) H, W``.
        mode: ``"bilinear"`` (trilinear for 3D), ``"nearest"`` or ``"bicubic"`` (2D only).
        padding_mode: ``grid_sample`` padding for samples outside the source. ``"border"`` (default) keeps
            edge pixels from blending with zeros when a box is magnified.

    Returns:
        ``(B, C, *out_shape)`` tensor with the device of ``images`` and its dtype (``float32`` for
        integer input). Sampling runs in ``float32`` (``float64`` for ``float64`` input).

    Raises:
        ValueError: On wrong ranks or shapes.
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(images.shape)}")
    sd = images.ndim - 2
    n = images.shape[0]
    starts, ends = _split_boxes(boxes, sd)
    if boxes.shape[0] != n:
        raise ValueError(f"got {boxes.shape[0]} boxes for {n} images")
    out = _as_shape(out_shape, sd, "out_shape")

    if n == 0:
        return images.new_zeros((0, images.shape[1], *out))
    # Grid coordinates need float32 at least: in bf16 they would be off by up to half a pixel at 224 px.
    out_dtype = images.dtype if images.is_floating_point() else torch.float32
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    starts = starts.to(device=images.device, dtype=dtype)
    ends = ends.to(device=images.device, dtype=dtype)
    half_size = ends - starts  # grid coordinate g = 2u - 1 = (end - start) * v + (start + end - 1)
    centre = starts + ends - 1.0
    if flips is not None:
        if flips.shape != (n, sd):
            raise ValueError(f"flips must have shape ({n}, {sd}), got {tuple(flips.shape)}")
        half_size = torch.where(flips.to(images.device, torch.bool), -half_size, half_size)
    # affine_grid orders grid coordinates (x, y[, z]) = (W, H[, D]): reverse our (D,) H, W axis order.
    theta = torch.zeros(n, sd, sd + 1, device=images.device, dtype=dtype)
    diag = torch.arange(sd, device=images.device)
    theta[:, diag, diag] = half_size.flip(-1)
    theta[:, :, sd] = centre.flip(-1)
    grid = F.affine_grid(theta, [n, images.shape[1], *out], align_corners=False)
    out_images = F.grid_sample(
        images.to(dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=False
    )
    return out_images.to(out_dtype)


def _box_parts(
    points: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if points.ndim != 3:
        raise ValueError(f"points must have shape (n, P, sd), got {tuple(points.shape)}")
    sd = points.shape[-1]
    starts, ends = _split_boxes(boxes, sd)
    if boxes.shape[0] != points.shape[0]:
        raise ValueError(f"got {boxes.shape[0]} boxes for {points.shape[0]} point sets")
    starts = starts.to(points).unsqueeze(1)
    ends = ends.to(points).unsqueeze(1)
    flip = None
    if flips is not None:
        if flips.shape != (points.shape[0], sd):
            raise ValueError(f"flips must have shape ({points.shape[0]}, {sd}), got {tuple(flips.shape)}")
        flip = flips.to(points.device, torch.bool).unsqueeze(1)
    return starts, ends, flip


def view_to_source(
    points: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor | None = None
) -> torch.Tensor:
    """Map normalised view coordinates to normalised source coordinates.

    Used by dense / local contrastive methods (e.g. Med-MoCo's local term) to find which source location
    a view pixel shows, and so which pixels of two views correspond.

    Args:
        points: ``(n, P, sd)`` points in normalised coordinates of each view (``[0, 1]``, axis order
            ``(D,) H, W``; the centre of view pixel ``j`` of ``m`` is ``(j + 0.5) / m``).
        boxes: ``(n, 2 * sd)`` crop boxes that made the views.
        flips: Optional ``(n, sd)`` bool flips that made the views.

    Returns:
        ``(n, P, sd)`` points in normalised source coordinates.
    """
    starts, ends, flip = _box_parts(points, boxes, flips)
    if flip is not None:
        points = torch.where(flip, 1.0 - points, points)
    return starts + points * (ends - starts)


def source_to_view(
    points: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor | None = None
) -> torch.Tensor:
    """Map normalised source coordinates to normalised view coordinates (inverse of :func:`view_to_source`).

    Points outside the box map outside ``[0, 1]``; callers test ``((v >= 0) & (v <= 1)).all(-1)`` to know
    whether a source point is visible in a view.

    Args:
        points: ``(n, P, sd)`` points in normalised source coordinates (axis order ``(D,) H, W``).
        boxes: ``(n, 2 * sd)`` crop boxes that made the views.
        flips: Optional ``(n, sd)`` bool flips that made the views.

    Returns:
        ``(n, P, sd)`` points in normalised view coordinates.
    """
    starts, ends, flip = _box_parts(points, boxes, flips)
    view = (points - starts) / (ends - starts)
    if flip is not None:
        view = torch.where(flip, 1.0 - view, view)
    return view


def pixel_to_normalized(indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Normalised coordinates of pixel centres: ``(i + 0.5) / n`` per axis.

    Args:
        indices: ``(..., sd)`` pixel indices (int or float), axis order ``(D,) H, W``.
        shape: Spatial shape ``(sd,)`` of the image the indices refer to.

    Returns:
        ``(..., sd)`` float normalised coordinates.
    """
    size = torch.as_tensor(tuple(shape), dtype=torch.float32, device=indices.device)
    return (indices.float() + 0.5) / size


def normalized_to_pixel(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Continuous pixel coordinates of normalised points: ``u * n - 0.5`` per axis (inverse of above).

    Args:
        points: ``(..., sd)`` normalised coordinates, axis order ``(D,) H, W``.
        shape: Spatial shape ``(sd,)`` of the target image.

    Returns:
        ``(..., sd)`` float pixel coordinates (round them to get the nearest pixel index).
    """
    size = torch.as_tensor(tuple(shape), dtype=points.dtype, device=points.device)
    return points * size - 0.5


def _mirror_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of an axis of length ``n`` padded by ``radius`` with mirror ("reflect") padding.

    Mirror padding does not repeat the edge pixel (``d c b | a b c d | c b a``), matching
    ``torch.nn.functional.pad(mode="reflect")`` and ``scipy.ndimage`` ``mode="mirror"``, but also works
    when ``radius >= n`` by reflecting repeatedly.
    """
    idx = torch.arange(-radius, n + radius, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def gaussian_blur(
    images: torch.Tensor, sigma: torch.Tensor, *, max_sigma: float | None = None
) -> torch.Tensor:
    """Blur each sample with its own isotropic Gaussian, separably, as grouped convolutions.

    One kernel radius ``r = ceil(3 * max(sigma))`` serves the whole batch (each sample's kernel is its own
    Gaussian sampled on ``[-r, r]`` and normalised to sum 1), with mirror padding (``reflect`` in torch,
    ``mirror`` in scipy). Each spatial axis is one depthwise convolution over all ``B * C`` channels. A
    sigma of (nearly) zero gives a unit impulse kernel, i.e. the identity; when every sigma is below
    ``1e-3`` the input is returned unchanged.

    Passing ``max_sigma`` (an upper bound of ``sigma``, e.g. the top of the sampling range) fixes the
    radius without reading ``sigma`` back from the device, which avoids a host-device sync in a training
    step; the result equals the default up to the (negligible) Gaussian tail beyond ``3 * max(sigma)``.

    Args:
        images: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` floating-point images.
        sigma: ``(B,)`` standard deviations in pixels (``>= 0``), the same along every axis.
        max_sigma: Optional upper bound of ``sigma`` that sets the kernel radius ``ceil(3 * max_sigma)``.

    Returns:
        Blurred images, same shape, dtype and device.

    Raises:
        ValueError: On wrong ranks or shapes.
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(images.shape)}")
    b, c = images.shape[:2]
    spatial = images.shape[2:]
    sd = len(spatial)
    sigma = torch.as_tensor(sigma, device=images.device).reshape(-1)
    if sigma.shape[0] != b:
        raise ValueError(f"sigma must have shape ({b},), got {tuple(sigma.shape)}")
    if max_sigma is None:
        max_sigma = float(sigma.max()) if b > 0 else 0.0
    if max_sigma < 1e-3 or b == 0:
        return images
    radius = math.ceil(3.0 * max_sigma)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    s = sigma.to(torch.float32).clamp(min=1e-6).unsqueeze(1)  # sigma -> 0 gives exp(-inf) = 0 off-centre
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    kernel = kernel.repeat_interleave(c, dim=0).to(images.dtype)  # (B*C, K): one kernel per channel

    conv = F.conv2d if sd == 2 else F.conv3d
    x = images.reshape(1, b * c, *spatial)
    for axis in range(sd):
        dim = 2 + axis
        x = torch.index_select(x, dim, _mirror_index(spatial[axis], radius, images.device))
        weight_shape = [b * c, 1] + [1] * sd
        weight_shape[dim] = 2 * radius + 1
        x = conv(x, kernel.view(weight_shape), groups=b * c)
    return x.reshape(images.shape)
