"""Tests of medssl.transforms.masking: every strategy's shape and ratio in 2D and 3D, the geometry of each
strategy (blocks, centred disc/ball, whole slices, tubes), seeding, and mask resizing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from medssl.errors import ConfigError
from medssl.transforms.masking import (
    MASK_STRATEGIES,
    MaskConfig,
    grid_shape_for,
    mask_grid,
    num_masked,
    resize_mask,
    upsample_mask,
)

GRIDS = [(14, 14), (6, 10), (8, 8, 8), (4, 6, 5)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strategies(grid: tuple[int, ...]) -> list[str]:
    return [s for s in MASK_STRATEGIES if not (s == "tube" and len(grid) == 2)]


def _cases() -> list[tuple[str, tuple[int, ...], float]]:
    return [(s, g, r) for g in GRIDS for s in _strategies(g) for r in (0.3, 0.75)]


def _tolerance(strategy: str, grid: tuple[int, ...]) -> float:
    """Documented bound on |actual ratio - ratio| (center: checked separately against its ring rule)."""
    n = math.prod(grid)
    return {
        "random": 0.5 / n,
        "block": 0.5 / n,
        "slice": 0.5 / grid[0],
        "tube": 0.5 / (grid[-1] * grid[-2]) if len(grid) == 3 else 0.0,
        "center": 0.1,
    }[strategy]


@pytest.mark.parametrize("strategy,grid,ratio", _cases())
def test_shape_dtype_and_ratio(strategy: str, grid: tuple[int, ...], ratio: float) -> None:
    cfg = MaskConfig(strategy=strategy, ratio=ratio)
    m = mask_grid(cfg, 5, grid, generator=_gen(0))
    assert m.shape == (5, *grid) and m.dtype == torch.bool
    counts = m.flatten(1).sum(1)
    n = math.prod(grid)
    # The same count in every sample, equal to num_masked, within the documented tolerance of the ratio.
    assert (counts == counts[0]).all()
    assert int(counts[0]) == num_masked(cfg, grid)
    assert abs(int(counts[0]) / n - ratio) <= _tolerance(strategy, grid) + 1e-12


@pytest.mark.parametrize("grid", GRIDS)
def test_random_is_exact_round(grid: tuple[int, ...]) -> None:
    n = math.prod(grid)
    for ratio in (0.0, 0.1, 0.5, 0.75, 0.9):
        m = mask_grid(MaskConfig(ratio=ratio), 4, grid, generator=_gen(1))
        assert (m.flatten(1).sum(1) == round(ratio * n)).all()


def test_random_is_uniform_over_positions() -> None:
    m = mask_grid(MaskConfig(ratio=0.25), 4000, (4, 4), generator=_gen(2)).float().mean(0)
    assert torch.allclose(m, torch.full((4, 4), 0.25), atol=0.03)


@pytest.mark.parametrize("grid", [(8, 8, 8), (5, 4, 6)])
def test_slices_are_whole_slices(grid: tuple[int, ...]) -> None:
    m = mask_grid(MaskConfig(strategy="slice", ratio=0.5), 6, grid, generator=_gen(3))
    per_slice_all = m.flatten(2).all(2)
    per_slice_any = m.flatten(2).any(2)
    assert torch.equal(per_slice_all, per_slice_any)  # every depth slice is fully masked or fully visible
    assert (per_slice_all.sum(1) == round(0.5 * grid[0])).all()
    assert len({tuple(r.tolist()) for r in per_slice_all}) > 1  # which slices varies between samples


def test_slice_in_2d_masks_whole_rows() -> None:
    m = mask_grid(MaskConfig(strategy="slice", ratio=0.4), 6, (10, 7), generator=_gen(4))
    assert torch.equal(m.all(2), m.any(2))
    assert (m.all(2).sum(1) == 4).all()


def test_tubes_run_through_depth() -> None:
    grid = (6, 7, 5)
    m = mask_grid(MaskConfig(strategy="tube", ratio=0.6), 4, grid, generator=_gen(5))
    for d in range(grid[0]):
        assert torch.equal(m[:, d], m[:, 0])
    assert (m[:, 0].flatten(1).sum(1) == round(0.6 * 35)).all()
    assert not torch.equal(m[0, 0], m[1, 0])


def test_tube_needs_3d() -> None:
    with pytest.raises(ConfigError, match="3D"):
        mask_grid(MaskConfig(strategy="tube"), 2, (8, 8))


@pytest.mark.parametrize("grid", [(14, 14), (7, 7), (6, 10), (8, 8, 8), (5, 7, 9)])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.75])
def test_center_is_a_centred_disc(grid: tuple[int, ...], ratio: float) -> None:
    m = mask_grid(MaskConfig(strategy="center", ratio=ratio), 2, grid)
    assert torch.equal(m[0], m[1])
    mask = m[0].numpy()
    # Normalised coordinates of unit centres, written out per axis.
    coords = [np.array([(i + 0.5) / g - 0.5 for i in range(g)]) for g in grid]
    pos = np.array(list(itertools.product(*coords)))
    flat = mask.reshape(-1)
    # Centred: the centroid of the masked units is the grid centre.
    assert np.allclose(pos[flat].mean(0), 0.0, atol=1e-9)
    # A disc / ball: every masked unit is strictly closer to the centre than every visible unit.
    dist = np.sqrt((pos**2).sum(1))
    if 0 < flat.sum() < flat.size:
        assert dist[flat].max() < dist[~flat].min() - 1e-12
    # Ratio: off from round(ratio*n) by at most half of the ring at the boundary.
    k = round(ratio * flat.size)
    ring_out = np.sum(np.isclose(dist, dist[~flat].min()))
    ring_in = np.sum(np.isclose(dist, dist[flat].max()))
    assert abs(int(flat.sum()) - k) <= max(ring_in, ring_out) / 2


@pytest.mark.parametrize("grid,bound", [((14, 14), 8), ((16, 16), 8), ((8, 8, 8), 36)])
def test_center_within_documented_bound(grid: tuple[int, ...], bound: int) -> None:
    n = math.prod(grid)
    for ratio in np.linspace(0.0, 0.98, 50):
        m = mask_grid(MaskConfig(strategy="center", ratio=float(ratio)), 1, grid)
        assert abs(int(m.sum()) - round(ratio * n)) <= bound
        assert int(m.sum()) < n  # never everything


@pytest.mark.parametrize("strategy,grid", [("center", (2, 2)), ("random", (2, 2)), ("block", (2, 2)),
                                           ("slice", (1, 4, 4)), ("tube", (4, 1, 1))])
def test_never_masks_everything_on_a_coarse_grid(strategy: str, grid: tuple[int, ...]) -> None:
    m = mask_grid(MaskConfig(strategy=strategy, ratio=0.9), 3, grid, generator=_gen(0))
    assert not m.flatten(1).all(1).any()
    assert int(m[0].sum()) == num_masked(MaskConfig(strategy=strategy, ratio=0.9), grid)


def _boundary_pairs(m: torch.Tensor) -> float:
    """Mean number of masked/visible neighbour pairs along every axis (the mask's perimeter)."""
    total = 0
    for axis in range(1, m.ndim):
        a = m.narrow(axis, 0, m.shape[axis] - 1)
        b = m.narrow(axis, 1, m.shape[axis] - 1)
        total += int((a != b).sum())
    return total / m.shape[0]


@pytest.mark.parametrize("grid", [(14, 14), (8, 8, 8)])
def test_blocks_are_contiguous(grid: tuple[int, ...]) -> None:
    cfg = dict(ratio=0.4)
    block = mask_grid(MaskConfig(strategy="block", **cfg), 64, grid, generator=_gen(6))
    rand = mask_grid(MaskConfig(strategy="random", **cfg), 64, grid, generator=_gen(6))
    # Blocks have a far shorter boundary than scattered units covering the same area.
    assert _boundary_pairs(block) < 0.6 * _boundary_pairs(rand)
    # Blocks land everywhere, not only at one place: corners are hit about as often as the centre.
    many = mask_grid(MaskConfig(strategy="block", **cfg), 600, grid, generator=_gen(7)).float().mean(0)
    corner = many[(0,) * len(grid)]
    centre = many[tuple(g // 2 for g in grid)]
    assert corner > 0.25 and centre > 0.25 and abs(corner - centre) < 0.12


@pytest.mark.parametrize("strategy", ["random", "block", "slice", "tube"])
def test_seeds_reproduce_and_differ(strategy: str) -> None:
    cfg = MaskConfig(strategy=strategy, ratio=0.5)
    grid = (6, 8, 8)
    a = mask_grid(cfg, 4, grid, generator=_gen(7))
    b = mask_grid(cfg, 4, grid, generator=_gen(7))
    c = mask_grid(cfg, 4, grid, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # samples of a batch get different masks


def test_global_rng_seed_reproduces() -> None:
    torch.manual_seed(0)
    a = mask_grid(MaskConfig(strategy="block"), 3, (8, 8))
    torch.manual_seed(0)
    b = mask_grid(MaskConfig(strategy="block"), 3, (8, 8))
    assert torch.equal(a, b)


def test_device_argument() -> None:
    m = mask_grid(MaskConfig(), 2, (4, 4), device="cpu")
    assert m.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs,match",
    [({"strategy": "grid"}, "strategy"), ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"),
     ({"patch_size": 0}, "patch_size")],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MaskConfig(**kwargs)


def test_grid_shape_for() -> None:
    assert grid_shape_for((32, 48), 16) == (2, 3)
    assert grid_shape_for((16, 32, 32), (4, 8, 8)) == (4, 4, 4)
    with pytest.raises(ConfigError, match="divisible"):
        grid_shape_for((30, 32), 16)


@pytest.mark.parametrize("grid,patch", [((3, 4), 4), ((2, 3, 2), (2, 3, 4))])
def test_upsample_mask_against_loop(grid: tuple[int, ...], patch: int | tuple[int, ...]) -> None:
    m = mask_grid(MaskConfig(ratio=0.5), 2, grid, generator=_gen(9))
    up = upsample_mask(m, patch)
    ps = (patch,) * len(grid) if isinstance(patch, int) else patch
    assert up.shape == (2, 1, *(g * p for g, p in zip(grid, ps, strict=True)))
    for b in range(2):
        for idx in itertools.product(*(range(g * p) for g, p in zip(grid, ps, strict=True))):
            unit = tuple(i // p for i, p in zip(idx, ps, strict=True))
            assert bool(up[(b, 0, *idx)]) == bool(m[(b, *unit)])


@pytest.mark.parametrize("src,dst", [((8, 8), (4, 4)), ((8, 8), (3, 5)), ((4, 4), (8, 8)), ((6, 4, 4), (3, 2, 3))])
def test_resize_mask_against_loop(src: tuple[int, ...], dst: tuple[int, ...]) -> None:
    m = mask_grid(MaskConfig(ratio=0.6), 3, src, generator=_gen(10)).unsqueeze(1)
    out = resize_mask(m, dst)
    assert out.shape == (3, 1, *dst)
    for b in range(3):
        for idx in itertools.product(*(range(d) for d in dst)):
            # Region each output position covers (adaptive pooling bounds), masked iff all of it is masked.
            region = tuple(
                slice(math.floor(i * s / d), math.ceil((i + 1) * s / d)) for i, s, d in zip(idx, src, dst, strict=True)
            )
            assert bool(out[(b, 0, *idx)]) == bool(m[(b, 0, *region)].all())
