"""Local InfoNCE over corresponding regions of two views' feature maps (Med-MoCo's local term).

Hassanpour et al., "Med-MoCo: ...", ISBI 2024 (arXiv 2402.14611) add to MoCo v2 a contrastive loss over
*local* features: a region of one view is pulled towards the same anatomical region in the other view and
pushed away from every other region (of the same image and of the other images in the batch).

Correspondence comes from the geometry the :class:`~medssl.transforms.views.ViewSampler` reports. In
normalised source coordinates, each view shows its crop box; the two crops overlap in a box (possibly
empty). ``R`` region boxes are drawn *inside that overlap*, mapped into each view's own coordinates (which
undoes the crop, the resize and the flips; :func:`medssl.transforms.spatial.source_to_view`) and pooled
from each view's backbone feature map with RoIAlign (He et al., "Mask R-CNN", 2017;
computed as a separable weighted sum, equal to :func:`torchvision.ops.roi_align`). A small MLP head
projects the pooled vectors and the one InfoNCE of :func:`medssl.losses.info_nce` is applied, symmetrised
over the two views. Images whose crops do not overlap contribute no region. Region boxes never leave the
overlap; like any bilinear sampling, a sample point near the overlap's edge reads the neighbouring feature
cell too, so a feature cell influences the loss only if it lies within one cell of the overlap.

Gradient flows through the pooling into both feature maps, i.e. into the backbone (the authors' released
version pooled the raw image and trained nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medssl.losses.infonce import info_nce
from medssl.nn.heads import projection_mlp
from medssl.transforms.spatial import _rand, source_to_view

__all__ = [
    "LocalInfoNCE",
    "LocalOutput",
    "crop_overlap",
    "roi_pool",
    "regions_in_view",
    "sample_regions",
]


def crop_overlap(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection of two views' crop boxes, per image.

    Args:
        boxes1: ``(B, 2 * sd)`` crop boxes ``(starts..., ends...)`` of the first views, normalised source
            coordinates (as :class:`~medssl.transforms.views.Views` reports them).
        boxes2: the same for the second views.

    Returns:
        ``(overlap, valid)``: ``(B, 2 * sd)`` intersection boxes and a ``(B,)`` bool mask, true where the
        intersection has a positive extent along every axis.
    """
    if boxes1.shape != boxes2.shape or boxes1.ndim != 2 or boxes1.shape[1] % 2:
        raise ValueError(f"boxes must both be (B, 2*sd); got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    sd = boxes1.shape[1] // 2
    starts = torch.maximum(boxes1[:, :sd], boxes2[:, :sd])
    ends = torch.minimum(boxes1[:, sd:], boxes2[:, sd:])
    valid = (ends > starts).all(dim=1)
    return torch.cat([starts, ends], dim=1), valid


def sample_regions(
    overlap: torch.Tensor,
    num_regions: int,
    scale: tuple[float, float] = (0.25, 0.5),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``num_regions`` boxes inside each overlap box.

    A region's side along each axis is a fraction ``f ~ U(scale)`` of the overlap's side (one ``f`` per
    region, so regions keep the overlap's aspect ratio), placed uniformly inside the overlap.

    Args:
        overlap: ``(B, 2 * sd)`` boxes in normalised source coordinates.
        num_regions: ``R``.
        scale: range of the side fraction, within ``(0, 1]``.
        generator: optional RNG.

    Returns:
        ``(B, R, 2 * sd)`` region boxes, each inside its overlap box.
    """
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"region scale must satisfy 0 < min <= max <= 1, got {scale}")
    b, two_sd = overlap.shape
    sd = two_sd // 2
    u = _rand((b, num_regions, 1 + sd), overlap.device, generator).to(overlap.dtype)
    starts = overlap[:, None, :sd]
    extent = (overlap[:, sd:] - overlap[:, :sd]).clamp(min=0.0)[:, None, :]
    frac = scale[0] + (scale[1] - scale[0]) * u[..., :1]
    size = frac * extent
    lo = starts + u[..., 1:] * (extent - size)
    return torch.cat([lo, lo + size], dim=-1)


def regions_in_view(regions: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Map region boxes from source coordinates into a view's normalised coordinates.

    Args:
        regions: ``(B, R, 2 * sd)`` boxes in normalised source coordinates.
        boxes: ``(B, 2 * sd)`` the view's crop boxes.
        flips: optional ``(B, sd)`` the view's flips.

    Returns:
        ``(B, R, 2 * sd)`` boxes ``(starts..., ends...)`` in the view's normalised coordinates (a flip swaps
        a box's ends, so they are re-sorted).
    """
    b, r, two_sd = regions.shape
    sd = two_sd // 2
    corners = torch.cat([regions[..., :sd], regions[..., sd:]], dim=1)  # (B, 2R, sd)
    mapped = source_to_view(corners, boxes, flips)
    a, c = mapped[:, :r], mapped[:, r:]
    return torch.cat([torch.minimum(a, c), torch.maximum(a, c)], dim=-1)


def roi_pool(fmap: torch.Tensor, boxes: torch.Tensor, output_size: int = 2, sampling_ratio: int = 2) -> torch.Tensor:
    """Average feature of every box, RoIAlign-style (bilinear / trilinear samples on a regular grid).

    Feature maps follow the ``align_corners=False`` convention of the images: feature cell ``i`` of an axis
    with ``n`` cells covers ``[i / n, (i + 1) / n)`` of the view. Each box is divided into
    ``output_size`` bins per axis with ``sampling_ratio`` samples per bin and axis; the region's feature is
    the mean of all samples (= the mean of RoIAlign's bins).

    Args:
        fmap: ``(B, C, h, w)`` or ``(B, C, d, h, w)`` feature maps.
        boxes: ``(B, R, 2 * sd)`` boxes in the view's normalised coordinates, axis order ``(D,) H, W``.
        output_size: RoIAlign bins per axis.
        sampling_ratio: samples per bin and axis.

    Returns:
        ``(B, R, C)`` pooled features, differentiable with respect to ``fmap``.
    """
    sd = fmap.ndim - 2
    b, c = fmap.shape[:2]
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 2 * sd:
        raise ValueError(f"boxes must be ({b}, R, {2 * sd}) for feature maps {tuple(fmap.shape)}, "
                         f"got {tuple(boxes.shape)}")
    r = boxes.shape[1]
    if r == 0 or b == 0:
        return fmap.new_zeros(b, r, c)
    if sd not in (2, 3):
        raise ValueError(f"feature maps must be 4-D or 5-D, got {tuple(fmap.shape)}")
    # Bilinear sampling is linear in the map and the sample grid is a product of per-axis grids, so the mean of
    # all samples is the map contracted with a separable weight: one batched matmul, forward and backward
    # (torchvision's CPU roi_align backward took ~10 % of a Med-MoCo step at 64 px).
    k = output_size * sampling_ratio
    per_axis = [_axis_weights(boxes[..., a], boxes[..., sd + a], fmap.shape[2 + a], k) for a in range(sd)]
    weights = per_axis[0]
    for a, w in enumerate(per_axis[1:], start=1):  # outer product: (B, R, n0, ..., na)
        weights = weights[..., None] * w.reshape(b, r, *([1] * a), -1)
    return torch.bmm(weights.reshape(b, r, -1).to(fmap.dtype), fmap.flatten(2).transpose(1, 2))


def _axis_weights(lo: torch.Tensor, hi: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``(B, R, n)``: the mean over ``k`` RoIAlign sample points in ``[lo, hi]`` of each cell's linear-interpolation
    weight along one axis of ``n`` cells (``aligned=True`` centres; points clamped into the map, like RoIAlign
    for points within half a cell outside it)."""
    t = (torch.arange(k, device=lo.device, dtype=lo.dtype) + 0.5) / k
    pos = ((lo[..., None] + t * (hi - lo)[..., None]) * n - 0.5).clamp(0, n - 1)  # (B, R, k) in cell units
    cells = torch.arange(n, device=lo.device, dtype=lo.dtype)
    return (1.0 - (pos[..., None] - cells).abs()).clamp(min=0.0).mean(dim=2)


@dataclass
class LocalOutput:
    """Result of :class:`LocalInfoNCE`.

    Attributes:
        loss: scalar loss (``0`` connected to the graph when no image has overlapping crops).
        num_valid: images whose crops overlap (the others contribute no region).
        regions: ``(B, R, 2 * sd)`` region boxes in source coordinates (meaningless rows for invalid images).
    """

    loss: torch.Tensor
    num_valid: int
    regions: torch.Tensor


class LocalInfoNCE(nn.Module):
    """Local InfoNCE: corresponding RoIAlign-pooled regions of two views are positives, all others negatives.

    Args:
        in_channels: channels ``C`` of the feature maps.
        num_regions: regions ``R`` drawn per image inside the crops' overlap.
        region_scale: side of a region as a fraction of the overlap's side, ``(min, max)``.
        proj_hidden: hidden width of the projection MLP (``0`` = ``C``).
        proj_dim: output width of the projection MLP.
        temperature: τ of the InfoNCE.
        output_size: RoIAlign bins per axis.
        sampling_ratio: RoIAlign samples per bin and axis.
        head: project the pooled features with the MLP (``False``: use them as they are).

    Negatives are the other regions on this rank (``B·R − 1`` per query): images without overlap are
    dropped, so ranks can hold different numbers of regions and the regions are not all-gathered.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_regions: int = 16,
        region_scale: tuple[float, float] = (0.25, 0.5),
        proj_hidden: int = 0,
        proj_dim: int = 128,
        temperature: float = 0.2,
        output_size: int = 2,
        sampling_ratio: int = 2,
        head: bool = True,
    ) -> None:
        super().__init__()
        if num_regions < 1:
            raise ValueError(f"num_regions must be >= 1, got {num_regions}")
        if not 0.0 < region_scale[0] <= region_scale[1] <= 1.0:
            raise ValueError(f"region_scale must satisfy 0 < min <= max <= 1, got {region_scale}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if output_size < 1 or sampling_ratio < 1:
            raise ValueError("output_size and sampling_ratio must be >= 1")
        self.num_regions = num_regions
        self.region_scale = (float(region_scale[0]), float(region_scale[1]))
        self.temperature = float(temperature)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.head: nn.Module = (
            projection_mlp(in_channels, proj_hidden or in_channels, proj_dim) if head else nn.Identity()
        )

    def forward(
        self,
        fmap1: torch.Tensor,
        fmap2: torch.Tensor,
        boxes1: torch.Tensor,
        boxes2: torch.Tensor,
        flips1: torch.Tensor | None = None,
        flips2: torch.Tensor | None = None,
        *,
        regions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LocalOutput:
        """Local InfoNCE of two views' feature maps.

        Args:
            fmap1: ``(B, C, *spatial)`` feature maps of the first views.
            fmap2: ``(B, C, *spatial')`` feature maps of the second views.
            boxes1: ``(B, 2 * sd)`` crop boxes of the first views (``Views.boxes``).
            boxes2: crop boxes of the second views.
            flips1: ``(B, sd)`` flips of the first views (``Views.flips``), or ``None``.
            flips2: flips of the second views, or ``None``.
            regions: optional ``(B, R, 2 * sd)`` region boxes in source coordinates to use instead of drawing
                them (they must lie inside the overlap; used by tests).
            generator: optional RNG for the region draw.

        Returns:
            :class:`LocalOutput`.
        """
        sd = fmap1.ndim - 2
        if fmap2.ndim != fmap1.ndim or fmap1.shape[:2] != fmap2.shape[:2] or sd not in (2, 3):
            raise ValueError(f"feature maps must be (B, C, *spatial) alike, got {tuple(fmap1.shape)}, "
                             f"{tuple(fmap2.shape)}")
        boxes1 = boxes1.to(fmap1.device, torch.float32)
        boxes2 = boxes2.to(fmap1.device, torch.float32)
        overlap, valid = crop_overlap(boxes1, boxes2)
        if regions is None:
            regions = sample_regions(overlap, self.num_regions, self.region_scale, generator)
        idx = valid.nonzero().squeeze(1)
        n_valid = int(idx.numel())
        if n_valid == 0:
            zero = self.head(fmap1.new_zeros(0, fmap1.shape[1])).sum() + 0.0 * (fmap1.sum() + fmap2.sum())
            return LocalOutput(loss=zero, num_valid=0, regions=regions)
        reg = regions[idx].to(torch.float32)
        r1 = regions_in_view(reg, boxes1[idx], None if flips1 is None else flips1[idx])
        r2 = regions_in_view(reg, boxes2[idx], None if flips2 is None else flips2[idx])
        p1 = roi_pool(fmap1[idx], r1, self.output_size, self.sampling_ratio)
        p2 = roi_pool(fmap2[idx], r2, self.output_size, self.sampling_ratio)
        z1 = self.head(p1.reshape(-1, p1.shape[-1]))
        z2 = self.head(p2.reshape(-1, p2.shape[-1]))
        t = self.temperature
        loss = 0.5 * (info_nce(z1, z2, temperature=t, gather_distributed=False)
                      + info_nce(z2, z1, temperature=t, gather_distributed=False))
        return LocalOutput(loss=loss, num_valid=n_valid, regions=regions)
