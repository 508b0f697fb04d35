"""Phantom generators: determinism, balance, multi-resolution consistency and learnability."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medssl.data import phantoms
from medssl.data.phantoms import (
    MARGIN_NAMES,
    PhantomDataset,
    phantom2d_params,
    phantom3d_params,
    render_phantom2d,
    render_phantom3d,
)
from medssl.errors import DataError

N_SANITY = 1600


@pytest.fixture(scope="module")
def sanity2d() -> tuple[np.ndarray, np.ndarray, float]:
    start = time.perf_counter()
    images, masks = render_phantom2d(np.arange(N_SANITY), 64, seed=0)
    return images, masks, time.perf_counter() - start


def _radial_features(images: np.ndarray, masks: np.ndarray, n_rad: int = 20, n_ang: int = 64) -> np.ndarray:
    """Hand-crafted margin features: mean radial profile and angular roughness around the lesion.

    The lesion centre and radius come from the mask; profiles are normalised by the lesion contrast so
    only the *shape* of the edge is left (sharp vs blurred, smooth vs bumpy, with or without spicules).
    """
    n, size, _ = images.shape
    grid = np.arange(size) + 0.5
    feats = []
    for image, mask in zip(images, masks, strict=True):
        w = mask.astype(float)
        area = w.sum()
        cy, cx = (w.sum(1) * grid).sum() / area, (w.sum(0) * grid).sum() / area
        radius = np.sqrt(area / np.pi)
        dy, dx = grid[:, None] - cy, grid[None, :] - cx
        r_bin = np.minimum((np.hypot(dx, dy) / radius / 2.0 * n_rad).astype(int), n_rad)
        a_bin = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * n_ang).astype(int) % n_ang
        ok = r_bin < n_rad
        key = r_bin[ok] * n_ang + a_bin[ok]
        sums = np.bincount(key, image[ok], n_rad * n_ang).reshape(n_rad, n_ang)
        counts = np.bincount(key, None, n_rad * n_ang).reshape(n_rad, n_ang)
        sectors = sums / np.maximum(counts, 1)
        profile = sums.sum(1) / np.maximum(counts.sum(1), 1)
        outside = profile[-3:].mean()
        contrast = profile[: n_rad // 4].mean() - outside + 1e-3
        roughness = np.sqrt(((sectors - np.roll(sectors, 1, axis=1)) ** 2).mean(1))
        feats.append(np.concatenate([(profile - outside) / contrast, roughness / contrast]))
    return np.asarray(feats)


def test_phantom2d_basic_properties(sanity2d: tuple[np.ndarray, np.ndarray, float]) -> None:
    images, masks, seconds = sanity2d
    assert images.dtype == np.float32 and images.shape == (N_SANITY, 64, 64)
    assert masks.dtype == np.uint8 and set(np.unique(masks)) == {0, 1}
    assert images.min() >= 0.0 and images.max() <= 1.0
    area = masks.reshape(N_SANITY, -1).mean(1)
    # radius 0.12-0.22 of the side (+-15 % shape) -> area fraction roughly 0.03-0.2
    assert area.min() > 0.02 and area.max() < 0.25
    # the lesion is brighter than a ring around it in the large majority of images
    inside = (images * masks).sum((1, 2)) / masks.sum((1, 2))
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(masks[:, None].astype(np.float32)), 9, 1, 4)[:, 0]
    ring = grown.numpy() - masks
    around = (images * ring).sum((1, 2)) / ring.sum((1, 2))
    assert np.mean(inside > around) > 0.9
    assert seconds < 8.0  # ~1.5 s on an idle core; generous for shared CI machines


def test_phantom2d_labels_are_balanced_and_pathology_is_noisy_margin() -> None:
    prm = phantom2d_params(np.arange(2000), seed=0)
    assert np.array_equal(np.bincount(prm.margin), [500, 500, 500, 500])
    for block in range(0, 2000, 16):
        assert np.array_equal(np.bincount(prm.margin[block : block + 16], minlength=4), [4, 4, 4, 4])
    expected = (prm.margin >= 2).astype(int)  # spiculated / ill-defined -> malignant
    flipped = np.mean(prm.pathology != expected)
    assert 0.12 < flipped < 0.18  # 15 % label noise; 2000 draws give sd ~0.008
    assert np.array_equal(prm.patient, np.arange(2000) // 4)


def test_phantom2d_margin_learnable_from_edge_features(
    sanity2d: tuple[np.ndarray, np.ndarray, float],
) -> None:
    images, masks, _ = sanity2d
    labels = phantom2d_params(np.arange(N_SANITY)).margin
    feats = _radial_features(images, masks)
    half = N_SANITY // 2
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(feats[:half], labels[:half])
    accuracy = clf.score(feats[half:], labels[half:])
    # chance is 0.25; measured ~0.65. The margin is learnable from edge evidence, but not trivially.
    assert 0.45 < accuracy < 0.95
    # the ill-defined class (blurred edge) is the easiest for a radial profile
    pred = clf.predict(feats[half:])
    ill = labels[half:] == MARGIN_NAMES.index("ill_defined")
    assert np.mean(pred[ill] == labels[half:][ill]) > 0.7


def test_phantom2d_deterministic_and_seeded() -> None:
    a, ma = render_phantom2d(np.arange(12), 64, seed=3)
    b, mb = render_phantom2d(np.arange(12), 64, seed=3)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    c, _ = render_phantom2d(np.arange(12), 64, seed=4)
    assert np.abs(a - c).mean() > 0.05
    # item i does not depend on the other items rendered with it
    d, md = render_phantom2d([7, 2], 64, seed=3)
    assert np.array_equal(d[0], a[7]) and np.array_equal(d[1], a[2]) and np.array_equal(md[0], ma[7])


def test_phantom2d_double_resolution_is_consistent() -> None:
    idx = np.arange(24)
    low, mask_low = render_phantom2d(idx, 64, seed=1)
    high, mask_high = render_phantom2d(idx, 128, seed=1)
    pooled = high.reshape(len(idx), 64, 2, 64, 2).mean(axis=(2, 4))
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(low, pooled, strict=True)]
    assert min(corr) > 0.9, corr
    assert np.abs(low - pooled).mean() < 0.03
    # the 128 render has genuinely finer detail: more energy left after removing the 2x2 means
    residual = high - np.repeat(np.repeat(pooled, 2, axis=1), 2, axis=2)
    assert residual.std() > 0.004
    pooled_mask = mask_high.reshape(len(idx), 64, 2, 64, 2).mean(axis=(2, 4)) > 0.5
    iou = (pooled_mask & (mask_low > 0)).sum() / (pooled_mask | (mask_low > 0)).sum()
    assert iou > 0.9


def test_phantom3d_properties() -> None:
    volumes, masks = render_phantom3d(np.arange(16), 32, seed=0)
    prm = phantom3d_params(np.arange(16), seed=0)
    assert volumes.shape == (16, 32, 32, 32) and volumes.dtype == np.float32
    assert volumes.min() >= 0 and volumes.max() <= 1
    assert np.array_equal(np.bincount(prm.lesion), [8, 8])
    has_mask = masks.reshape(16, -1).any(1)
    assert np.array_equal(has_mask, prm.lesion == 1)
    grown = torch.nn.functional.max_pool3d(torch.from_numpy(masks[:, None].astype(np.float32)), 5, 1, 2)[:, 0]
    shell = grown.numpy() - masks
    for v, m, s, lab in zip(volumes, masks, shell, prm.lesion, strict=True):
        if lab:
            assert v[m > 0].mean() < v[s > 0].mean() - 0.03  # a low-intensity lesion
    again, _ = render_phantom3d([5], 32, seed=0)
    assert np.array_equal(again[0], volumes[5])


def test_phantom_dataset_items_and_metadata() -> None:
    ds = PhantomDataset("phantom2d", n=40, task="pathology", seed=2)
    assert len(ds) == 40 and ds.spatial_dims == 2 and ds.in_chans == 1 and ds.image_size == 64
    assert ds.tasks == ("margin", "pathology") and ds.task == "pathology"
    assert ds.class_names == ["benign", "malignant"] and ds.num_classes == 2
    assert ds.labels is not None and ds.labels.dtype == np.int64
    item = ds[5]
    assert set(item) == {"image", "index", "label", "mask"}
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.int64
    images, masks = render_phantom2d([5], 64, seed=2)
    assert np.array_equal(item["image"][0].numpy(), images[0])
    assert np.array_equal(item["mask"].numpy(), masks[0])
    assert ds[-1]["index"] == 39
    with pytest.raises(IndexError):
        ds[40]
    item["image"].zero_()  # items are copies: the dataset is not modified
    assert ds[5]["image"].abs().sum() > 0
    assert ds.patient_ids[0] == "P_00001" and ds.patient_ids[4] == "P_00002"
    assert ds.sources[3] == "phantom2d#3"
    for patient in np.unique(ds.patient_ids):
        assert len(set(ds.splits[ds.patient_ids == patient])) == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 1, 64, 64) and batch["label"].shape == (8,)


def test_phantom_dataset_render_size_and_lazy_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    eager = PhantomDataset("phantom3d", n=6, image_size=16)
    assert eager[0]["image"].shape == (1, 16, 16, 16)
    monkeypatch.setattr(phantoms, "_EAGER_BYTES", 0)
    lazy = PhantomDataset("phantom3d", n=6, image_size=16)
    assert lazy._images is None
    for i in range(6):
        assert torch.equal(lazy[i]["image"], eager[i]["image"])
        assert torch.equal(lazy[i]["mask"], eager[i]["mask"])
    assert np.array_equal(lazy.images, eager.images)


def test_phantom_dataset_errors() -> None:
    with pytest.raises(DataError, match="margin, pathology"):
        PhantomDataset("phantom2d", n=8, task="birads")
    with pytest.raises(DataError, match="positive integer"):
        PhantomDataset("phantom3d", n=0)
    with pytest.raises(DataError, match=">= 8"):
        PhantomDataset("phantom2d", n=4, image_size=4)
