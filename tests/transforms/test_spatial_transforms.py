"""Tests of medssl.transforms.spatial against slicing, torch.flip, scipy and a scalar RandomResizedCrop."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from medssl.transforms.spatial import (
    crop_resize,
    gaussian_blur,
    normalized_to_pixel,
    pixel_to_normalized,
    sample_crop_boxes,
    source_to_view,
    view_to_source,
)


def _pixel_box(starts: tuple[int, ...], stops: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Normalised box covering whole pixels ``starts[k] .. stops[k] - 1`` of each axis."""
    lo = [s / n for s, n in zip(starts, shape, strict=True)]
    hi = [e / n for e, n in zip(stops, shape, strict=True)]
    return torch.tensor([lo + hi], dtype=torch.float32)


# --------------------------------------------------------------------------------------------- crop_resize


@pytest.mark.parametrize("shape", [(3, 2, 12, 16), (2, 2, 6, 8, 10)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_full_box_same_size_is_identity(shape: tuple[int, ...], mode: str) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    sd = x.ndim - 2
    boxes = torch.tensor([[0.0] * sd + [1.0] * sd]).repeat(shape[0], 1)
    out = crop_resize(x, boxes, shape[2:], mode=mode)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,out", [((2, 1, 12, 16), (9, 21)), ((2, 1, 6, 8, 10), (5, 11, 7))])
def test_full_box_resize_matches_interpolate(shape: tuple[int, ...], out: tuple[int, ...]) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    sd = x.ndim - 2
    boxes = torch.tensor([[0.0] * sd + [1.0] * sd]).repeat(shape[0], 1)
    mode = "bilinear" if sd == 2 else "trilinear"
    ref = F.interpolate(x, size=out, mode=mode, align_corners=False)
    torch.testing.assert_close(crop_resize(x, boxes, out), ref, atol=1e-5, rtol=0)


def test_left_half_box_equals_slice_2d() -> None:
    x = torch.rand(2, 3, 10, 16, generator=torch.Generator().manual_seed(2))
    boxes = torch.tensor([[0.0, 0.0, 1.0, 0.5]]).repeat(2, 1)
    out = crop_resize(x, boxes, (10, 8))
    torch.testing.assert_close(out, x[..., :8], atol=1e-6, rtol=0)


def test_pixel_aligned_boxes_equal_slices_per_sample() -> None:
    x = torch.rand(3, 1, 20, 24, generator=torch.Generator().manual_seed(3))
    regions = [((0, 0), (10, 12)), ((4, 8), (14, 20)), ((10, 12), (20, 24))]
    boxes = torch.cat([_pixel_box(a, b, (20, 24)) for a, b in regions])
    out = crop_resize(x, boxes, (10, 12))  # every region is 10 x 12 whole pixels
    for i, (a, b) in enumerate(regions):
        # Exact up to float32 rounding of the grid coordinates.
        torch.testing.assert_close(out[i], x[i, :, a[0] : b[0], a[1] : b[1]], atol=1e-5, rtol=0)


def test_pixel_aligned_box_equals_slice_3d() -> None:
    x = torch.rand(2, 2, 8, 10, 12, generator=torch.Generator().manual_seed(4))
    box = _pixel_box((2, 0, 6), (6, 5, 12), (8, 10, 12)).repeat(2, 1)
    out = crop_resize(x, box, (4, 5, 6))
    torch.testing.assert_close(out, x[:, :, 2:6, 0:5, 6:12], atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(4, 2, 8, 12), (4, 1, 6, 8, 10)])
def test_flips_equal_torch_flip(shape: tuple[int, ...]) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    sd = x.ndim - 2
    flips = torch.rand(shape[0], sd, generator=torch.Generator().manual_seed(6)) < 0.5
    flips[0] = True
    flips[1] = False
    boxes = torch.tensor([[0.0] * sd + [1.0] * sd]).repeat(shape[0], 1)
    out = crop_resize(x, boxes, shape[2:], flips=flips)
    for i in range(shape[0]):
        dims = [2 + k for k in range(sd) if flips[i, k]]
        ref = torch.flip(x[i : i + 1], dims) if dims else x[i : i + 1]
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-6, rtol=0)


def test_crop_then_flip_equals_flipped_slice() -> None:
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    box = _pixel_box((4, 0), (12, 8), (16, 16))
    out = crop_resize(x, box, (8, 8), flips=torch.tensor([[True, True]]))
    torch.testing.assert_close(out, torch.flip(x[:, :, 4:12, 0:8], (2, 3)), atol=1e-6, rtol=0)


def test_crop_resize_keeps_dtype_and_checks_shapes() -> None:
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    assert crop_resize(x, boxes, 4).dtype == torch.float64
    with pytest.raises(ValueError):
        crop_resize(x, boxes[:1], 4)
    with pytest.raises(ValueError):
        crop_resize(x, torch.zeros(2, 6), 4)
    with pytest.raises(ValueError):
        crop_resize(x[0], boxes, 4)


# --------------------------------------------------------------------------------------- sample_crop_boxes


def _adjacent_log_ratios(boxes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    sd = len(shape)
    sides = (boxes[:, sd:] - boxes[:, :sd]).double() * torch.tensor(shape, dtype=torch.float64)
    return torch.log(sides[:, 1:] / sides[:, :-1])


@pytest.mark.parametrize("image_shape", [(64, 64), (100, 200), (32, 48, 40)])
def test_boxes_respect_scale_ratio_and_bounds(image_shape: tuple[int, ...]) -> None:
    sd = len(image_shape)
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(
        20000,
        sd,
        scale,
        ratio,
        device="cpu",
        generator=torch.Generator().manual_seed(0),
        image_shape=image_shape,
    )
    assert boxes.shape == (20000, 2 * sd) and boxes.dtype == torch.float32
    starts, ends = boxes[:, :sd], boxes[:, sd:]
    assert (starts >= 0).all() and (ends <= 1).all() and (ends > starts).all()
    volume = (ends - starts).double().prod(dim=1)
    assert volume.min() >= scale[0] - 1e-5 and volume.max() <= scale[1] + 1e-5
    log_r = _adjacent_log_ratios(boxes, image_shape)
    assert log_r.min() >= math.log(ratio[0]) - 1e-4 and log_r.max() <= math.log(ratio[1]) + 1e-4


def test_box_distribution_when_every_candidate_fits() -> None:
    # Small areas always fit: area ~ U(scale), log ratio ~ U(log ratio), placement uniform.
    n, scale, ratio = 40000, (0.05, 0.25), (0.5, 2.0)
    boxes = sample_crop_boxes(n, 2, scale, ratio, device="cpu", generator=torch.Generator().manual_seed(1))
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, log_r = (h * w).double(), torch.log(w / h).double()
    unif_sd = 1 / math.sqrt(12)
    assert abs(area.mean() - 0.15) < 4 * 0.2 * unif_sd / math.sqrt(n)
    assert abs(area.std() - 0.2 * unif_sd) < 0.01 * 0.2
    assert abs(log_r.mean()) < 4 * math.log(4) * unif_sd / math.sqrt(n)
    assert abs(log_r.std() - math.log(4) * unif_sd) < 0.01 * math.log(4)
    for start, side in ((boxes[:, 0], h), (boxes[:, 1], w)):
        rel = (start / (1 - side)).double()  # U(0, 1) if placement is uniform
        assert abs(rel.mean() - 0.5) < 4 * unif_sd / math.sqrt(n)
        assert abs(rel.std() - unif_sd) < 0.01


def _reference_random_resized_crop_area(
    rng: random.Random, scale: tuple[float, float], ratio: tuple[float, float]
) -> float:
    """torchvision's RandomResizedCrop.get_params on a unit square, without pixel rounding."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * r), math.sqrt(target / r)
        if 0 < w <= 1 and 0 < h <= 1:
            return w * h
    return 1.0  # square image, ratio range contains 1: whole image


def test_area_distribution_matches_scalar_reference_with_rejections() -> None:
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    rng = random.Random(0)
    ref = np.array([_reference_random_resized_crop_area(rng, scale, ratio) for _ in range(20000)])
    boxes = sample_crop_boxes(
        20000, 2, scale, ratio, device="cpu", generator=torch.Generator().manual_seed(2)
    )
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).double().numpy()
    assert abs(area.mean() - ref.mean()) < 0.01
    np.testing.assert_allclose(
        np.quantile(area, [0.1, 0.5, 0.9]), np.quantile(ref, [0.1, 0.5, 0.9]), atol=0.015
    )
    # The rejection makes large areas rarer than U(0.2, 1) would (mean < 0.6).
    assert area.mean() < 0.59


def test_fallback_is_centre_crop() -> None:
    square = sample_crop_boxes(5, 2, (2.0, 3.0), (3 / 4, 4 / 3), device="cpu")
    torch.testing.assert_close(square, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 5))
    # 10 x 100 pixels, W/H = 10 > 4/3: full height, width 10 * 4/3 pixels, centred.
    wide = sample_crop_boxes(3, 2, (2.0, 3.0), (3 / 4, 4 / 3), device="cpu", image_shape=(10, 100))
    w = 10 * 4 / 3 / 100
    ref = torch.tensor([[0.0, 0.5 - w / 2, 1.0, 0.5 + w / 2]] * 3)
    torch.testing.assert_close(wide, ref)


def test_boxes_reproducible_with_generator_and_global_seed() -> None:
    a = sample_crop_boxes(
        8, 3, (0.2, 1.0), (0.75, 1.33), device="cpu", generator=torch.Generator().manual_seed(5)
    )
    b = sample_crop_boxes(
        8, 3, (0.2, 1.0), (0.75, 1.33), device="cpu", generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(11)
    c = sample_crop_boxes(8, 2, (0.2, 1.0), (0.75, 1.33), device="cpu")
    torch.manual_seed(11)
    d = sample_crop_boxes(8, 2, (0.2, 1.0), (0.75, 1.33), device="cpu")
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert not torch.equal(c[0], c[1])


# ------------------------------------------------------------------------------ view <-> source coordinates


def test_view_source_known_values() -> None:
    boxes = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    pts = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]])
    expected = torch.tensor([[[0.25, 0.5], [0.75, 1.0], [0.5, 0.75]]])
    torch.testing.assert_close(view_to_source(pts, boxes), expected)
    flipped = view_to_source(pts, boxes, torch.tensor([[False, True]]))
    torch.testing.assert_close(flipped, torch.tensor([[[0.25, 1.0], [0.75, 0.5], [0.5, 0.75]]]))


@pytest.mark.parametrize("sd", [2, 3])
def test_view_source_round_trip(sd: int) -> None:
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(16, sd, (0.1, 1.0), (0.5, 2.0), device="cpu", generator=g)
    flips = torch.rand(16, sd, generator=g) < 0.5
    pts = torch.rand(16, 50, sd, generator=g)
    torch.testing.assert_close(source_to_view(view_to_source(pts, boxes, flips), boxes, flips), pts)
    torch.testing.assert_close(view_to_source(source_to_view(pts, boxes, flips), boxes, flips), pts)


def test_pixel_normalized_round_trip() -> None:
    idx = torch.tensor([[0, 0], [3, 7], [9, 15]])
    u = pixel_to_normalized(idx, (10, 16))
    torch.testing.assert_close(u[0], torch.tensor([0.05, 1 / 32]))
    torch.testing.assert_close(normalized_to_pixel(u, (10, 16)), idx.float())


@pytest.mark.parametrize("src,out", [((40, 36), (48, 44)), ((14, 16, 12), (20, 22, 18))])
def test_marked_pixel_lands_where_predicted(src: tuple[int, ...], out: tuple[int, ...]) -> None:
    sd = len(src)
    n = 12
    g = torch.Generator().manual_seed(3)
    # Boxes of 40-60 % of each side (so views magnify) that contain the marked pixel.
    marks = torch.stack([torch.randint(s // 4, 3 * s // 4, (n,), generator=g) for s in src], dim=1)
    mark_u = pixel_to_normalized(marks, src)
    sides = 0.4 + 0.2 * torch.rand(n, sd, generator=g)
    starts = (mark_u - sides * (0.1 + 0.8 * torch.rand(n, sd, generator=g))).clamp(0, 1)
    starts = torch.minimum(starts, 1 - sides)
    boxes = torch.cat([starts, starts + sides], dim=1)
    flips = torch.rand(n, sd, generator=g) < 0.5

    images = torch.zeros(n, 1, *src)
    images[(torch.arange(n), 0, *marks.unbind(1))] = 1.0
    views = crop_resize(images, boxes, out, flips=flips)

    predicted = normalized_to_pixel(source_to_view(mark_u.unsqueeze(1), boxes, flips).squeeze(1), out)
    flat = views.reshape(n, -1).argmax(dim=1)
    found = torch.stack(torch.unravel_index(flat, out), dim=1).float()
    # A bilinear-resampled impulse peaks at the output sample nearest the impulse.
    assert ((found - predicted).abs() <= 0.5 + 1e-4).all(), (found, predicted)
    # ... and its intensity-weighted centroid is close to the predicted sub-pixel position.
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in out], indexing="ij")
    w = views[:, 0]
    centroid = torch.stack([(w * c).sum(dim=tuple(range(1, sd + 1))) for c in grids], 1) / w.sum(
        dim=tuple(range(1, sd + 1))
    ).unsqueeze(1)
    assert ((centroid - predicted).abs() < 0.35).all(), (centroid, predicted)


# ------------------------------------------------------------------------------------------- gaussian_blur


def _scipy_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> np.ndarray:
    """Per-sample, per-channel scipy reference with the same radius and mirror padding."""
    arr = x.double().numpy()
    out = np.empty_like(arr)
    for i in range(arr.shape[0]):
        s = float(sigma[i])
        for c in range(arr.shape[1]):
            if s == 0.0:
                out[i, c] = arr[i, c]
            else:
                out[i, c] = ndimage.gaussian_filter(arr[i, c], s, mode="mirror", truncate=radius / s)
    return out


@pytest.mark.parametrize(
    "shape,sigma",
    [
        ((3, 2, 20, 17), [0.5, 1.3, 2.0]),
        ((2, 1, 9, 10, 11), [0.7, 1.6]),
        ((2, 1, 4, 5), [2.0, 0.3]),  # radius 6 > size: repeated mirroring
        ((3, 1, 12, 12), [0.0, 1.0, 1e-8]),  # ~zero sigma is the identity for that sample
    ],
)
def test_gaussian_blur_matches_scipy(shape: tuple[int, ...], sigma: list[float]) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor(sigma)
    radius = math.ceil(3 * max(sigma))
    out = gaussian_blur(x, s)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(out.numpy(), _scipy_blur(x, s, radius), atol=2e-6)


def test_gaussian_blur_max_sigma_sets_radius_and_keeps_constants() -> None:
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.5, 1.0])
    out = gaussian_blur(x, s, max_sigma=2.0)
    np.testing.assert_allclose(out.numpy(), _scipy_blur(x, s, 6), atol=2e-6)
    const = torch.full((2, 3, 6, 7, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([1.5, 0.4])), const)
    assert gaussian_blur(x, torch.zeros(2)) is x
