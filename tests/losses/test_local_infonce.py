"""Local InfoNCE: correspondence geometry, RoIAlign pooling, hand-computed values, gradients, overlap-only reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medssl.losses.local_infonce import LocalInfoNCE, crop_overlap, regions_in_view, roi_pool, sample_regions
from medssl.transforms.spatial import view_to_source


def _random_boxes(n: int, sd: int, g: torch.Generator) -> torch.Tensor:
    lo = torch.rand(n, sd, generator=g) * 0.6
    size = 0.2 + torch.rand(n, sd, generator=g) * 0.4
    return torch.cat([lo, (lo + size).clamp(max=1.0)], dim=1)


@pytest.mark.parametrize("sd", [2, 3])
def test_regions_lie_inside_the_overlap_and_map_back_onto_themselves(sd):
    g = torch.Generator().manual_seed(0)
    b1, b2 = _random_boxes(64, sd, g), _random_boxes(64, sd, g)
    f1 = torch.rand(64, sd, generator=g) < 0.5
    f2 = torch.rand(64, sd, generator=g) < 0.5
    overlap, valid = crop_overlap(b1, b2)
    # overlap by hand, per image and axis
    for i in range(64):
        inter = [(max(b1[i, a], b2[i, a]), min(b1[i, sd + a], b2[i, sd + a])) for a in range(sd)]
        assert bool(valid[i]) == all(hi > lo for lo, hi in inter)
    assert valid.any() and (~valid).any()
    regions = sample_regions(overlap[valid], 8, (0.25, 0.5), generator=g)
    ov = overlap[valid][:, None, :]
    assert (regions[..., :sd] >= ov[..., :sd] - 1e-7).all() and (regions[..., sd:] <= ov[..., sd:] + 1e-7).all()
    side = (regions[..., sd:] - regions[..., :sd]) / (ov[..., sd:] - ov[..., :sd])
    assert (side >= 0.25 - 1e-5).all() and (side <= 0.5 + 1e-5).all()
    for boxes, flips in ((b1[valid], f1[valid]), (b2[valid], f2[valid])):
        in_view = regions_in_view(regions, boxes, flips)
        assert (in_view >= -1e-6).all() and (in_view <= 1 + 1e-6).all()  # inside the overlap = inside both views
        assert (in_view[..., sd:] > in_view[..., :sd]).all()
        # the two corners of the view box map back onto the region's corners (in some order per flipped axis)
        back = view_to_source(torch.cat([in_view[..., :sd], in_view[..., sd:]], dim=1), boxes, flips)
        r = regions.shape[1]
        lo = torch.minimum(back[:, :r], back[:, r:])
        hi = torch.maximum(back[:, :r], back[:, r:])
        torch.testing.assert_close(torch.cat([lo, hi], -1), regions, atol=1e-5, rtol=0)


def _bilinear(fmap: np.ndarray, y: float, x: float) -> np.ndarray:
    """RoIAlign's bilinear read at continuous pixel-centre coordinates (clamped at the border), by hand."""
    h, w = fmap.shape[1:]
    y = min(max(y, 0.0), h - 1.0)
    x = min(max(x, 0.0), w - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
            + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def _roi_mean_by_hand(fmap: np.ndarray, box: np.ndarray, k: int) -> np.ndarray:
    """Mean of k×k bilinear samples at the centres of a regular grid over a box in normalised coordinates."""
    h, w = fmap.shape[1:]
    y0, x0, y1, x1 = box[0] * h, box[1] * w, box[2] * h, box[3] * w
    acc = np.zeros(fmap.shape[0])
    for i in range(k):
        for j in range(k):
            yy = y0 + (i + 0.5) * (y1 - y0) / k - 0.5
            xx = x0 + (j + 0.5) * (x1 - x0) / k - 0.5
            acc += _bilinear(fmap, yy, xx)
    return acc / (k * k)


def test_roi_pool_2d_matches_a_loop_implementation():
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]],
                          [[0.35, 0.05, 0.5, 0.3], [0.7, 0.6, 0.95, 0.99]]], dtype=torch.float64)
    out = roi_pool(fmap, boxes, output_size=2, sampling_ratio=3).numpy()
    for b in range(2):
        for r in range(2):
            ref = _roi_mean_by_hand(fmap[b].numpy(), boxes[b, r].numpy(), k=6)
            np.testing.assert_allclose(out[b, r], ref, rtol=1e-9, atol=1e-12)


def test_roi_pool_3d_equals_2d_on_a_depth_constant_volume():
    g = torch.Generator().manual_seed(2)
    f2 = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    f3 = f2[:, :, None].expand(2, 4, 3, 6, 5).contiguous()
    b2 = torch.tensor([[[0.1, 0.2, 0.6, 0.9]], [[0.3, 0.0, 0.95, 0.5]]], dtype=torch.float64)
    depth = torch.tensor([[[0.2, 0.7]], [[0.0, 1.0]]], dtype=torch.float64)
    b3 = torch.cat([depth[..., :1], b2[..., :2], depth[..., 1:], b2[..., 2:]], dim=-1)
    torch.testing.assert_close(roi_pool(f3, b3, 2, 2), roi_pool(f2, b2, 2, 2))
    # and along depth it interpolates like the other axes: a volume linear in depth averages to the box centre
    lin = torch.arange(8, dtype=torch.float64).view(1, 1, 8, 1, 1).expand(1, 1, 8, 4, 4)
    box = torch.tensor([[[0.25, 0.0, 0.0, 0.75, 1.0, 1.0]]], dtype=torch.float64)
    assert float(roi_pool(lin, box, 2, 2)) == pytest.approx(0.5 * 8 - 0.5)


def _stripes(vectors: list[list[float]], h: int = 8, cell: int = 4) -> torch.Tensor:
    """(C, h, cell·len(vectors)) feature map made of vertical stripes, one constant vector each."""
    cols = [torch.tensor(v, dtype=torch.float64)[:, None, None].expand(len(v), h, cell) for v in vectors]
    return torch.cat(cols, dim=2)


# Regions over the three stripes of a 12-wide map: with 2x2 RoIAlign bins of 2 samples each, every sample of
# a region reads (bilinearly) only cells of its own stripe, so its pooled feature is exactly the stripe's vector.
STRIPE_REGIONS = [[0.2, 0.05, 0.8, 0.28], [0.2, 0.38, 0.8, 0.62], [0.2, 0.72, 0.8, 0.95]]


def _hand_infonce(z1: list[np.ndarray], z2: list[np.ndarray], tau: float) -> float:
    """-mean_i log(exp(ẑ1_i·ẑ2_i/τ) / Σ_j exp(ẑ1_i·ẑ2_j/τ)), with loops."""
    total = 0.0
    for i, a in enumerate(z1):
        a = a / np.linalg.norm(a)
        den = 0.0
        for b in z2:
            den += math.exp(float(a @ (b / np.linalg.norm(b))) / tau)
        total -= math.log(math.exp(float(a @ (z2[i] / np.linalg.norm(z2[i]))) / tau) / den)
    return total / len(z1)


def test_hand_computed_value_with_a_flipped_view():
    a, b, c = [1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]
    fmap1 = _stripes([a, b, c])[None]
    fmap2 = _stripes([c, b, a])[None]  # the second view is the first one mirrored along W
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    loss_fn = LocalInfoNCE(3, head=False, temperature=0.2, output_size=2, sampling_ratio=2)
    regions = torch.tensor([STRIPE_REGIONS])
    out = loss_fn(fmap1, fmap2, full, full, torch.tensor([[False, False]]), torch.tensor([[False, True]]),
                  regions=regions)
    # cosines: a·b = 0.6, a·c = 0, b·c = 0.48; each region's positive has cosine 1
    tau = 0.2

    def term(others: list[float]) -> float:
        return math.log(1.0 + sum(math.exp((s - 1.0) / tau) for s in others))

    expected = (term([0.6, 0.0]) + term([0.6, 0.48]) + term([0.0, 0.48])) / 3
    assert out.num_valid == 1
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)
    # without the flip, the regions no longer correspond: the loss rises
    wrong = loss_fn(fmap1, fmap2, full, full, regions=regions).loss
    assert float(wrong) > expected + 1.0


def test_negatives_include_other_images_regions():
    vecs1 = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]
    vecs2 = [[0.0, 0.0, 1.0], [0.8, 0.0, 0.6], [0.3, 0.9, 0.3]]
    fmap = torch.stack([_stripes(vecs1), _stripes(vecs2)])
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    regions = torch.tensor([STRIPE_REGIONS] * 2)
    out = LocalInfoNCE(3, head=False, temperature=0.3)(fmap, fmap, full, full, regions=regions)
    z = [np.array(v) for v in vecs1 + vecs2]
    assert float(out.loss) == pytest.approx(_hand_infonce(z, z, 0.3), rel=1e-6)


def test_crops_of_a_larger_image_with_a_resized_view():
    # view 1 shows the whole image on a 12-wide map; view 2 shows the right half of it, also on a 12-wide map
    vecs = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8], [-1.0, 0.0], [0.6, -0.8]]
    fmap1 = _stripes(vecs, cell=2)[None]  # 6 stripes of 2 cells
    fmap2 = _stripes(vecs[3:], cell=4)[None]  # the right 3 stripes, magnified 2x
    box1 = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    box2 = torch.tensor([[0.0, 0.5, 1.0, 1.0]])
    # regions over stripes 3, 4, 5 in source coordinates, inside both views, away from stripe edges by > 1 cell
    regions = torch.tensor([[[0.2, 0.5 + 0.5 * x0, 0.8, 0.5 + 0.5 * x1] for x0, x1 in
                             ((0.06, 0.27), (0.40, 0.60), (0.73, 0.94))]])
    out = LocalInfoNCE(2, head=False, output_size=1, sampling_ratio=1)(fmap1, fmap2, box1, box2, regions=regions)
    z = [np.array(v) for v in vecs[3:]]
    assert float(out.loss) == pytest.approx(_hand_infonce(z, z, 0.2), rel=1e-6)


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def test_gradient_reaches_the_backbone():
    torch.manual_seed(0)
    net = _TinyCNN()
    loss_fn = LocalInfoNCE(16, num_regions=4, proj_dim=8)
    x1, x2 = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    boxes1 = torch.tensor([[0.0, 0.0, 0.8, 0.8]] * 3)
    boxes2 = torch.tensor([[0.2, 0.2, 1.0, 1.0]] * 3)
    out = loss_fn(net(x1), net(x2), boxes1, boxes2, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.num_valid == 3 and torch.isfinite(out.loss)
    for name, p in list(net.named_parameters()) + list(loss_fn.head.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _dilated_overlap_mask(overlap_view: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Cells a bilinear read inside the box can touch: those within one cell of the box (in cell units)."""
    mask = torch.ones(shape, dtype=torch.bool)
    for axis, n in enumerate(shape):
        lo, hi = float(overlap_view[axis]) * n, float(overlap_view[2 + axis]) * n
        idx = torch.arange(n, dtype=torch.float64)
        ok = (idx + 1 > lo - 1) & (idx < hi + 1)
        mask &= ok.view(-1, 1) if axis == 0 else ok.view(1, -1)
    return mask


def test_features_outside_the_overlap_are_never_used():
    g = torch.Generator().manual_seed(3)
    n, c, h, w = 2, 4, 16, 16
    boxes1 = torch.tensor([[0.0, 0.0, 0.7, 0.6], [0.1, 0.3, 0.9, 1.0]])
    boxes2 = torch.tensor([[0.3, 0.2, 1.0, 1.0], [0.0, 0.0, 0.6, 0.7]])
    flips1 = torch.tensor([[False, True], [True, False]])
    flips2 = torch.tensor([[True, True], [False, False]])
    fmap1 = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    fmap2 = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    torch.manual_seed(0)
    loss_fn = LocalInfoNCE(c, num_regions=6, proj_dim=8)
    args = (boxes1, boxes2, flips1, flips2)
    base = loss_fn(fmap1, fmap2, *args, generator=torch.Generator().manual_seed(7))
    base.loss.backward()
    overlap, valid = crop_overlap(boxes1, boxes2)
    assert valid.all()
    touched = []
    for fmap, boxes, flips in ((fmap1, boxes1, flips1), (fmap2, boxes2, flips2)):
        masks = torch.stack([_dilated_overlap_mask(regions_in_view(overlap[i:i + 1, None], boxes[i:i + 1],
                                                                   flips[i:i + 1])[0, 0], (h, w)) for i in range(n)])
        assert (~masks).sum() > 0.3 * masks.numel()  # a good part of each map lies outside the overlap
        assert (fmap.grad.abs().sum(1)[~masks] == 0).all()  # no gradient outside the (dilated) overlap
        assert fmap.grad.abs().sum(1)[masks].sum() > 0
        touched.append(masks)
    # perturbing everything outside the overlap leaves the loss exactly unchanged ...
    noise = torch.randn(n, c, h, w, generator=g) * 100
    p1 = fmap1.detach() + noise * (~touched[0])[:, None]
    p2 = fmap2.detach() - noise * (~touched[1])[:, None]
    same = loss_fn(p1, p2, *args, generator=torch.Generator().manual_seed(7))
    assert torch.equal(same.loss, base.loss.detach())
    # ... while perturbing inside changes it
    q1 = fmap1.detach() + noise * touched[0][:, None]
    assert not torch.equal(loss_fn(q1, fmap2.detach(), *args, generator=torch.Generator().manual_seed(7)).loss,
                           base.loss.detach())


def test_no_overlap_gives_zero_loss_that_keeps_the_graph():
    torch.manual_seed(0)
    loss_fn = LocalInfoNCE(4, num_regions=3, proj_dim=4)
    f1 = torch.randn(2, 4, 4, 4, requires_grad=True)
    f2 = torch.randn(2, 4, 4, 4, requires_grad=True)
    b1 = torch.tensor([[0.0, 0.0, 0.4, 0.4]] * 2)
    b2 = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2)
    out = loss_fn(f1, f2, b1, b2)
    assert out.num_valid == 0 and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(p.grad is not None for p in loss_fn.head.parameters())


def test_3d_local_loss_runs_and_reaches_the_feature_maps():
    g = torch.Generator().manual_seed(4)
    f1 = torch.randn(2, 4, 4, 4, 4, generator=g, requires_grad=True)
    f2 = torch.randn(2, 4, 4, 4, 4, generator=g, requires_grad=True)
    b1 = torch.tensor([[0.0, 0.0, 0.0, 0.8, 0.8, 0.8]] * 2)
    b2 = torch.tensor([[0.2, 0.1, 0.3, 1.0, 0.9, 1.0]] * 2)
    flips = torch.tensor([[True, False, True], [False, False, False]])
    out = LocalInfoNCE(4, num_regions=5, proj_dim=4)(f1, f2, b1, b2, flips, None, generator=g)
    out.loss.backward()
    assert out.num_valid == 2 and torch.isfinite(out.loss)
    assert f1.grad.abs().sum() > 0 and f2.grad.abs().sum() > 0


def test_roi_pool_2d_equals_torchvision_roi_align_values_and_gradients():
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lo = torch.rand(3, 5, 2, generator=g, dtype=torch.float64) * 0.6
    boxes = torch.cat([lo, lo + 0.05 + torch.rand(3, 5, 2, generator=g, dtype=torch.float64) * 0.35], dim=-1)
    ours = roi_pool(fmap, boxes, output_size=2, sampling_ratio=2)
    h, w = fmap.shape[2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    rois = torch.cat([torch.arange(3, dtype=torch.float64).repeat_interleave(5)[:, None],
                      boxes[..., [1, 0, 3, 2]].reshape(-1, 4) * scale], dim=1)  # (idx, x0, y0, x1, y1) in cells
    ref = roi_align(fmap, rois, output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    ref = ref.mean(dim=(2, 3)).reshape(3, 5, 4)
    torch.testing.assert_close(ours, ref)
    weights = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), fmap)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), fmap)
    torch.testing.assert_close(g_ours, g_ref)
