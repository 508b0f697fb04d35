"""Deterministic synthetic lesion phantoms: the embedded default datasets.

They exist so that the whole pipeline (pretraining, evaluation, reports) runs in minutes on a laptop with
no data to download, and so that tests can assert that something is *learnable*. They mimic the structure
of the seed tasks, not their appearance in detail, and are **not** a substitute for real data.

``phantom2d`` -- "mammography-like" patches (CBIS-DDSM mass margins):

* background: Gaussian noise with a power-law spectrum ``P(f) ~ f^-beta`` (``beta`` 2.4-3.3, the
  range measured for mammographic parenchyma), plus a smooth intensity ramp; texture parameters are shared
  by the images of one patient;
* one brighter lesion per image, near (but not at) the centre, radius 0.12-0.22 of the side, random
  contrast and ellipticity, whose **margin** is the 4-way label (task ``margin``): circumscribed (sharp,
  smooth edge), microlobulated (small scallops on the contour), spiculated (thin radiating spicules) or
  ill-defined (blurred edge, blur varying around the contour). The evidence lies at the lesion edge;
* task ``pathology``: benign/malignant, malignant for spiculated and ill-defined margins and benign for the
  others, with 15 % of the labels flipped (label noise);
* a lesion mask (inside the contour, spicules excluded), four images per patient.

``phantom3d`` -- "prostate-MRI-like" volumes: a textured, randomly oriented gland ellipsoid in noise; in
half of the volumes a small low-intensity lesion inside the gland (task ``lesion``); lesion mask; two
volumes per patient.

Everything is a pure function of ``(seed, index)`` -- item ``i`` is the same whatever ``N`` is -- and is
defined in normalised coordinates ``[0, 1]^d`` with pixel centres at ``(j + 0.5) / size``. The noise
is built from frequency coefficients that are shared across resolutions (coefficients of frequencies
already present at a lower resolution are reused, only finer ones are added), edges are analytically
antialiased, and thin structures keep their integrated intensity, so ``render_phantom2d(idx, 128)`` is a
faithful twice-as-detailed copy of ``render_phantom2d(idx, 64)`` (the target of multi-scale masked
image modelling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medssl.errors import DataError

from .base import ImageDataset
from .splits import assign_patient_splits

MARGIN_NAMES: list[str] = ["circumscribed", "microlobulated", "spiculated", "ill_defined"]
PATHOLOGY_NAMES: list[str] = ["benign", "malignant"]
LESION_NAMES: list[str] = ["absent", "present"]

PHANTOM2D_TASKS: tuple[str, ...] = ("margin", "pathology")
PHANTOM3D_TASKS: tuple[str, ...] = ("lesion",)
PHANTOM2D_DEFAULT_N = 2000
PHANTOM3D_DEFAULT_N = 400
PHANTOM2D_SIZE = 64
PHANTOM3D_SIZE = 32
IMAGES_PER_PATIENT_2D = 4
VOLUMES_PER_PATIENT_3D = 2
PATHOLOGY_LABEL_NOISE = 0.15

# Random streams: every random number is drawn from default_rng([seed, stream, key...]).
_S_PATIENT, _S_LABEL, _S_ITEM, _S_NOISE, _S_NOISE_FINE = 1, 2, 3, 4, 5
_NOISE_BASE_2D = 64  # frequency grid at which the base noise coefficients are drawn
_NOISE_BASE_3D = 32
_MAX_SPICULES = 18
_EAGER_BYTES = 256 * 2**20  # render in memory below this size, else on demand per item
_BOX_STD = 1.0 / 12.0**0.5  # std of a one-pixel box filter, in pixels


def _as_indices(indices: Sequence[int] | np.ndarray | int) -> np.ndarray:
    idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
    if idx.ndim != 1 or (idx.size and idx.min() < 0):
        raise ValueError("indices must be a 1-D sequence of non-negative integers")
    return idx


def _check_size(size: int, minimum: int = 8) -> int:
    if int(size) != size or int(size) < minimum:
        raise DataError(f"phantom image size must be an integer >= {minimum}, got {size!r}")
    return int(size)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _balanced_labels(indices: np.ndarray, seed: int, num_classes: int, block: int, stream: int) -> np.ndarray:
    """Class labels balanced within consecutive blocks of ``block`` indices (a shuffled repeat of 0..K-1)."""
    out = np.empty(len(indices), dtype=np.int64)
    blocks = indices // block
    for b in np.unique(blocks):
        perm = _rng(seed, stream, b).permutation(np.repeat(np.arange(num_classes), block // num_classes))
        sel = blocks == b
        out[sel] = perm[indices[sel] % block]
    return out


def _shifted_freqs(size: int) -> np.ndarray:
    """Signed integer frequencies (cycles per image) in fft-shifted order: ``-size//2 .. size - size//2 - 1``."""
    return np.arange(-(size // 2), size - size // 2)


def _powerlaw_noise(
    indices: np.ndarray, seed: int, stream: int, size: int, dims: int, beta: np.ndarray, base: int
) -> np.ndarray:
    """Real Gaussian fields with power spectrum ``|k|^-beta``, sampled at pixel centres.

    The field is ``sum_k c_k |k|^(-beta/2) exp(2 pi i k.u)`` over a Hermitian-symmetric set of integer
    frequencies ``k`` (cycles per image), stored as a half spectrum (last axis ``k >= 0``) and inverted
    with a real FFT. The complex coefficient ``c_k`` is drawn from the smallest level ``L = base * 2^j``
    whose grid (``[-L/2, L/2)`` on the leading axes, ``[0, L/2]`` on the last) contains ``k``, with a
    generator keyed by ``(seed, stream, index, L)``. Any two resolutions therefore share all their
    common frequencies, which makes a higher-resolution render the same field with finer detail. The
    fields have unit variance at the ``base`` resolution (slightly more at finer ones).

    Args:
        indices: ``(n,)`` item indices.
        seed: Dataset seed.
        stream: Random stream id (several independent fields per item).
        size: Side length in pixels.
        dims: 2 or 3.
        beta: ``(n,)`` spectral exponent per item.
        base: Side of the base frequency grid.

    Returns:
        float32 ``(n,) + (size,) * dims``.
    """
    n = len(indices)
    levels = [base]
    while levels[-1] < size:
        levels.append(levels[-1] * 2)
    half = size // 2
    coef = np.zeros((n,) + (size,) * (dims - 1) + (half + 1,), dtype=np.complex64)
    for level in reversed(levels):  # smaller levels overwrite, so the smallest containing level wins
        lh = level // 2
        lo, hi = max(-half, -lh), min(size - half, lh)
        dst = (slice(lo + half, hi + half),) * (dims - 1) + (slice(0, min(half, lh) + 1),)
        src = (slice(lo + lh, hi + lh),) * (dims - 1) + (slice(0, min(half, lh) + 1),)
        shape = (level,) * (dims - 1) + (lh + 1, 2)
        for j, idx in enumerate(indices):
            w = _rng(seed, stream, idx, level).standard_normal(shape, dtype=np.float32)
            coef[(j,) + dst] = w.view(np.complex64)[..., 0][src]
    k_lead = _shifted_freqs(size).astype(np.float32)
    k_last = np.arange(half + 1, dtype=np.float32)
    grids = np.meshgrid(*([k_lead] * (dims - 1) + [k_last]), indexing="ij")
    k2 = sum(g * g for g in grids)
    log_k = 0.5 * np.log(np.where(k2 > 0, k2, 1.0))
    b = beta.astype(np.float32).reshape((n,) + (1,) * dims)
    amplitude = np.where(k2 > 0, np.exp(-0.5 * b * log_k), 0.0).astype(np.float32)
    # The k_last = 0 and Nyquist planes hold each frequency pair twice (irfft keeps their real part):
    # sqrt(2) gives them the variance of the other pairs.
    edge_planes = (grids[-1] == 0) | ((size % 2 == 0) & (grids[-1] == half))
    amplitude = amplitude * np.where(edge_planes, np.float32(2**0.5), np.float32(1.0))
    # exp(i pi k / size) per axis moves the sample points from pixel corners to pixel centres.
    phase = np.exp(1j * np.pi * sum(grids) / size).astype(np.complex64)
    spectrum = coef * amplitude * phase
    lead_axes = tuple(range(1, dims))
    spectrum = np.fft.ifftshift(spectrum, axes=lead_axes)
    field = np.fft.irfftn(spectrum, s=(size,) * dims, axes=tuple(range(1, dims + 1))) * float(size**dims)
    kb = _shifted_freqs(base).astype(np.float64)
    kb2 = sum(g * g for g in np.meshgrid(*([kb] * dims), indexing="ij")).ravel()
    kb2 = kb2[kb2 > 0]
    norm = np.sqrt(2.0 * np.exp(-0.5 * beta.astype(np.float64)[:, None] * np.log(kb2)[None, :]).sum(axis=1))
    return field.astype(np.float32) / norm.astype(np.float32).reshape((n,) + (1,) * dims)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _chunks(n: int, size: int, dims: int, budget: int = 1 << 20) -> list[slice]:
    step = max(1, budget // size**dims)
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


# --------------------------------------------------------------------------------------------------- 2D


@dataclass(frozen=True)
class Phantom2DParams:
    """Per-image parameters of ``phantom2d`` (all arrays have length ``n``; coordinates normalised)."""

    margin: np.ndarray  # int64 0..3, index into MARGIN_NAMES
    pathology: np.ndarray  # int64 0/1, index into PATHOLOGY_NAMES
    patient: np.ndarray  # int64 patient number
    beta: np.ndarray  # spectral exponent of the parenchyma texture
    density: np.ndarray  # mean tissue level
    texture: np.ndarray  # texture amplitude
    ramp: np.ndarray  # (n, 3): linear ramp strength, direction, bowl curvature
    centre: np.ndarray  # (n, 2): lesion centre (x, y)
    radius: np.ndarray  # lesion radius
    contrast: np.ndarray  # lesion contrast in texture units
    shape: np.ndarray  # (n, 4): ellipticity, its angle, 3rd-harmonic amplitude, its phase
    edge: np.ndarray  # logistic edge scale of the contour
    fuzz: np.ndarray  # (n, 2): angular modulation of the edge blur (amplitude, angle)
    lobes: np.ndarray  # (n, 5): lobe count, amplitude, phase, amplitude modulation and its angle
    spicules: np.ndarray  # (n, 5, _MAX_SPICULES): angle, length, width, intensity, used (0/1)


def phantom2d_params(indices: Sequence[int] | np.ndarray, seed: int = 0) -> Phantom2DParams:
    """Draws the ``phantom2d`` parameters (labels, patient, texture, lesion) of the given items.

    Args:
        indices: Item indices.
        seed: Dataset seed.

    Returns:
        The parameters; ``margin`` is balanced within every block of 16 consecutive indices.
    """
    idx = _as_indices(indices)
    n = len(idx)
    margin = _balanced_labels(idx, seed, 4, 16, _S_LABEL)
    patient = idx // IMAGES_PER_PATIENT_2D
    out: dict[str, np.ndarray] = {
        "beta": np.empty(n),
        "density": np.empty(n),
        "texture": np.empty(n),
        "ramp": np.empty((n, 3)),
        "centre": np.empty((n, 2)),
        "radius": np.empty(n),
        "contrast": np.empty(n),
        "shape": np.empty((n, 4)),
        "edge": np.empty(n),
        "fuzz": np.zeros((n, 2)),
        "lobes": np.zeros((n, 5)),
        "spicules": np.zeros((n, 5, _MAX_SPICULES)),
        "pathology": np.empty(n, dtype=np.int64),
    }
    patient_cache: dict[int, np.ndarray] = {}
    for j, (i, m) in enumerate(zip(idx, margin, strict=True)):
        p = int(patient[j])
        if p not in patient_cache:
            patient_cache[p] = _rng(seed, _S_PATIENT, p).random(3)
        pu = patient_cache[p]
        r = _rng(seed, _S_ITEM, i)
        u = r.random(24)
        spic = r.random((4, _MAX_SPICULES))
        out["beta"][j] = 2.4 + 0.9 * pu[0] + 0.15 * (u[0] - 0.5)
        out["density"][j] = -0.4 + 0.8 * pu[1] + 0.2 * (u[1] - 0.5)
        out["texture"][j] = 0.5 + 0.3 * pu[2]
        out["ramp"][j] = (0.8 * u[2], 2 * np.pi * u[3], 1.5 * (u[4] - 0.5))
        off_r, off_a = 0.14 * np.sqrt(u[5]), 2 * np.pi * u[6]
        out["centre"][j] = (0.5 + off_r * np.cos(off_a), 0.5 + off_r * np.sin(off_a))
        out["radius"][j] = 0.12 + 0.10 * u[7]
        out["contrast"][j] = 1.6 + 1.4 * u[8]
        out["shape"][j] = (0.15 * u[9], np.pi * u[10], 0.05 * u[11], 2 * np.pi * u[12])
        if m == 0:  # circumscribed: sharp, smooth
            out["edge"][j] = 0.001 + 0.003 * u[13]
        elif m == 1:  # microlobulated: sharp, scalloped
            out["edge"][j] = 0.001 + 0.003 * u[13]
            out["lobes"][j] = (
                8 + int(6 * u[14]),
                0.07 + 0.07 * u[15],
                2 * np.pi * u[16],
                0.6 * u[18],
                2 * np.pi * u[19],
            )
        elif m == 2:  # spiculated: moderately sharp core plus spicules
            out["edge"][j] = 0.003 + 0.005 * u[13]
            count = 10 + int(9 * u[14])
            k = np.arange(_MAX_SPICULES)
            out["spicules"][j, 0] = 2 * np.pi * (u[15] + k / count + 0.3 * (spic[0] - 0.5) / count)
            out["spicules"][j, 1] = (0.6 + 0.8 * spic[1]) * out["radius"][j]
            out["spicules"][j, 2] = 0.004 + 0.004 * spic[2]
            out["spicules"][j, 3] = 0.6 + 0.4 * spic[3]
            out["spicules"][j, 4] = k < count
        else:  # ill-defined: blurred edge, blur varying around the contour
            out["edge"][j] = 0.014 + 0.016 * u[13]
            out["fuzz"][j] = (0.6 * u[14], 2 * np.pi * u[15])
        malignant = m >= 2
        out["pathology"][j] = int(malignant != (u[17] < PATHOLOGY_LABEL_NOISE))
    return Phantom2DParams(margin=margin, patient=patient, **out)


def _render2d_chunk(
    idx: np.ndarray, prm: Phantom2DParams, sel: slice, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    def f(a: np.ndarray) -> np.ndarray:
        return a[sel].astype(np.float32)

    pix = 1.0 / size
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    x = grid[None, None, :]
    y = grid[None, :, None]
    noise = _powerlaw_noise(idx, seed, _S_NOISE, size, 2, prm.beta[sel], _NOISE_BASE_2D)
    ramp = f(prm.ramp)
    g, ang, bowl = (ramp[:, k, None, None] for k in range(3))
    background = (
        f(prm.density)[:, None, None]
        + g * ((x - 0.5) * np.cos(ang) + (y - 0.5) * np.sin(ang))
        + bowl * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
        + f(prm.texture)[:, None, None] * noise
    )
    centre = f(prm.centre)
    cx = centre[:, 0, None, None]
    cy = centre[:, 1, None, None]
    dx, dy = x - cx, y - cy
    rho = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    r = f(prm.radius)[:, None, None]
    sh = f(prm.shape)
    ell, psi, a3, ph3 = (sh[:, k, None, None] for k in range(4))
    contour = r * (1.0 + ell * np.cos(2.0 * (theta - psi)) + a3 * np.cos(3.0 * theta + ph3))
    lb = f(prm.lobes)
    m_lobes, a_lobes, ph_lobes, mod, ph_mod = (lb[:, k, None, None] for k in range(5))
    a_lobes = a_lobes * (1.0 + mod * np.cos(theta - ph_mod))  # lobes of uneven size around the contour
    contour = contour * (
        1.0 + a_lobes * (2.0 * np.abs(np.cos(0.5 * (m_lobes * theta + ph_lobes))) - 4.0 / np.pi)
    )
    fz = f(prm.fuzz)
    edge = f(prm.edge)[:, None, None] * (1.0 + fz[:, 0, None, None] * np.cos(theta - fz[:, 1, None, None]))
    edge_eff = np.sqrt(edge**2 + (0.55 * _BOX_STD * pix) ** 2)  # logistic scale ~ 0.55 std
    core = _sigmoid((contour - rho) / edge_eff)
    dome = 0.8 + 0.2 * np.clip(1.0 - (rho / contour) ** 2, 0.0, 1.0)
    lesion = core * dome
    spiculated = np.flatnonzero(prm.margin[sel] == 2)
    if len(spiculated):
        lesion[spiculated] = np.maximum(
            lesion[spiculated],
            _spicules(f(prm.spicules)[spiculated], rho[spiculated], theta[spiculated], r[spiculated], pix),
        )
    field = background + f(prm.contrast)[:, None, None] * lesion
    image = _sigmoid(np.float32(0.9) * field).astype(np.float32)
    mask = (rho < contour).astype(np.uint8)
    return image, mask


def _spicules(sp: np.ndarray, rho: np.ndarray, theta: np.ndarray, r: np.ndarray, pix: float) -> np.ndarray:
    """Intensity of thin radiating lines (Gaussian cross-section, tapering outward) for spiculated images."""
    n = len(sp)
    count = sp[:, 4].sum(axis=1).astype(np.int64)
    k_count = count[:, None, None].astype(np.float32)
    start = sp[:, 0, 0][:, None, None]
    position = (theta - start) * k_count / (2 * np.pi)
    nominal = np.round(position).astype(np.int64)
    # The two spicules whose nominal angles bracket the pixel include the nearest one (jitter is at most
    # 0.3 of the spacing); farther ones are more than two line widths away wherever they are not hidden
    # under the lesion core.
    neighbour = nominal + np.where(position >= nominal, 1, -1)
    out = np.zeros_like(rho)
    rows = np.arange(n)[:, None, None]
    for nearest in (nominal, neighbour):
        j = np.mod(nearest, count[:, None, None])
        ang, length, width, inten = (sp[:, q][rows, j] for q in range(4))
        delta = np.mod(theta - ang + np.pi, 2 * np.pi) - np.pi
        along = rho * np.cos(delta)
        perp = rho * np.sin(delta)
        width_eff = np.sqrt(width**2 + (_BOX_STD * pix) ** 2)
        start_r, end_r = 0.5 * r, r + length
        taper = np.clip((end_r - along) / (end_r - start_r), 0.0, 1.0) * (along > start_r)
        line = inten * (width / width_eff) * np.exp(-0.5 * (perp / width_eff) ** 2) * taper**0.7
        out = np.maximum(out, line)
    return out


def render_phantom2d(
    indices: Sequence[int] | np.ndarray, size: int = PHANTOM2D_SIZE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Renders ``phantom2d`` items at any resolution.

    The scene is defined in normalised coordinates, so ``size=128`` renders the same lesion and the same
    background as ``size=64`` with twice the detail (2x2 average pooling of the former approximates the
    latter).

    Args:
        indices: Item indices (item ``i`` does not depend on which other items are rendered).
        size: Side length in pixels (>= 8).
        seed: Dataset seed.

    Returns:
        ``(images, masks)``: float32 ``(n, size, size)`` in ``[0, 1]`` and uint8 ``(n, size, size)``
        lesion masks (0/1).
    """
    size = _check_size(size)
    idx = _as_indices(indices)
    prm = phantom2d_params(idx, seed)
    images = np.empty((len(idx), size, size), dtype=np.float32)
    masks = np.empty((len(idx), size, size), dtype=np.uint8)
    for sel in _chunks(len(idx), size, 2):
        images[sel], masks[sel] = _render2d_chunk(idx[sel], prm, sel, size, seed)
    return images, masks


# --------------------------------------------------------------------------------------------------- 3D


@dataclass(frozen=True)
class Phantom3DParams:
    """Per-volume parameters of ``phantom3d`` (arrays of length ``n``; coordinates normalised, (z, y, x))."""

    lesion: np.ndarray  # int64 0/1
    patient: np.ndarray
    beta: np.ndarray  # spectral exponent of the gland texture
    centre: np.ndarray  # (n, 3) gland centre
    axes: np.ndarray  # (n, 3) gland semi-axes
    rotation: np.ndarray  # (n, 3, 3) gland orientation
    levels: np.ndarray  # (n, 3): background level, gland level, texture amplitude
    lesion_centre: np.ndarray  # (n, 3)
    lesion_axes: np.ndarray  # (n, 3)
    lesion_depth: np.ndarray  # intensity drop of the lesion (0 when absent)


def _rotation(alpha: float, tilt: float) -> np.ndarray:
    ca, sa, ct, st = np.cos(alpha), np.sin(alpha), np.cos(tilt), np.sin(tilt)
    about_z = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])  # rotates (y, x) in-plane
    about_x = np.array([[ct, -st, 0], [st, ct, 0], [0, 0, 1]])  # tilts z towards y
    return about_x @ about_z


def phantom3d_params(indices: Sequence[int] | np.ndarray, seed: int = 0) -> Phantom3DParams:
    """Draws the ``phantom3d`` parameters; ``lesion`` is balanced within blocks of 8 consecutive indices.

    Args:
        indices: Item indices.
        seed: Dataset seed.

    Returns:
        The parameters.
    """
    idx = _as_indices(indices)
    n = len(idx)
    lesion = _balanced_labels(idx, seed, 2, 8, _S_LABEL)
    patient = idx // VOLUMES_PER_PATIENT_3D
    beta, depth = np.empty(n), np.zeros(n)
    centre, axes, levels = np.empty((n, 3)), np.empty((n, 3)), np.empty((n, 3))
    lc, la, rot = np.zeros((n, 3)), np.ones((n, 3)), np.empty((n, 3, 3))
    for j, i in enumerate(idx):
        pu = _rng(seed, _S_PATIENT, int(patient[j])).random(5)
        u = _rng(seed, _S_ITEM, i).random(20)
        beta[j] = 2.5 + 0.8 * pu[0]
        axes[j] = (0.26 + 0.12 * pu[1:4]) * (1.0 + 0.1 * (u[0:3] - 0.5))
        centre[j] = 0.5 + 0.06 * (u[3:6] - 0.5)
        rot[j] = _rotation(np.pi * u[6], 0.6 * (u[7] - 0.5))
        levels[j] = (-1.0 + 0.4 * u[8], 0.6 + 0.4 * pu[4], 0.35 + 0.2 * u[9])
        # lesion centre: uniform in the inner 55 % of the gland ellipsoid
        v = u[10:13] * 2 - 1
        v = v / max(np.linalg.norm(v), 1e-9) * u[13] ** (1 / 3)
        lc[j] = centre[j] + rot[j] @ (0.55 * axes[j] * v)
        la[j] = (0.07 + 0.05 * u[14]) * (1.0 + 0.3 * (u[15:18] - 0.5))
        if lesion[j]:
            depth[j] = 1.2 + 0.6 * u[18]
    return Phantom3DParams(
        lesion=lesion,
        patient=patient,
        beta=beta,
        centre=centre,
        axes=axes,
        rotation=rot,
        levels=levels,
        lesion_centre=lc,
        lesion_axes=la,
        lesion_depth=depth,
    )


def _render3d_chunk(
    idx: np.ndarray, prm: Phantom3DParams, sel: slice, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    n = len(idx)
    pix = 1.0 / size

    def f(a: np.ndarray) -> np.ndarray:  # per-volume parameter broadcast against (n, z, y, x)
        a = a[sel].astype(np.float32)
        return a.reshape(a.shape + (1, 1, 1))

    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    coords = [grid[:, None, None], grid[None, :, None], grid[None, None, :]]  # z, y, x
    texture = _powerlaw_noise(idx, seed, _S_NOISE, size, 3, prm.beta[sel], _NOISE_BASE_3D)
    fine = _powerlaw_noise(idx, seed, _S_NOISE_FINE, size, 3, np.full(n, 1.0), _NOISE_BASE_3D)
    centre, axes, rot, levels = f(prm.centre), f(prm.axes), f(prm.rotation), f(prm.levels)
    rel = [coords[d] - centre[:, d] for d in range(3)]
    q2 = np.zeros((n,) + (size,) * 3, dtype=np.float32)
    for a in range(3):  # gland frame coordinate a = sum_d R[d, a] * rel_d (R maps gland -> world)
        p = rot[:, 0, a] * rel[0] + rot[:, 1, a] * rel[1] + rot[:, 2, a] * rel[2]
        q2 += (p / axes[:, a]) ** 2
    gland = _sigmoid((1.0 - np.sqrt(q2)) / 0.06)
    bg, level, amp = levels[:, 0], levels[:, 1], levels[:, 2]
    field = bg + 0.3 * texture + gland * (level - bg + amp * texture) + 0.25 * fine
    lc, la = f(prm.lesion_centre), f(prm.lesion_axes)
    lq2 = sum(((coords[d] - lc[:, d]) / la[:, d]) ** 2 for d in range(3))
    dist = (np.sqrt(lq2) - 1.0) * la.mean(axis=1)  # approximate signed distance to the lesion surface
    edge = (0.006**2 + (0.55 * _BOX_STD * pix) ** 2) ** 0.5
    field = field - f(prm.lesion_depth) * _sigmoid(-dist / edge) * gland
    masks = ((lq2 < 1.0) & (f(prm.lesion) > 0)).astype(np.uint8)
    images = _sigmoid(1.1 * field).astype(np.float32)
    return images, masks


def render_phantom3d(
    indices: Sequence[int] | np.ndarray, size: int = PHANTOM3D_SIZE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Renders ``phantom3d`` volumes at any resolution (normalised coordinates, as for 2D).

    Args:
        indices: Item indices.
        size: Side length in voxels (>= 8).
        seed: Dataset seed.

    Returns:
        ``(volumes, masks)``: float32 ``(n, size, size, size)`` in ``[0, 1]`` and uint8 lesion masks
        (all zero for volumes without a lesion).
    """
    size = _check_size(size)
    idx = _as_indices(indices)
    prm = phantom3d_params(idx, seed)
    images = np.empty((len(idx),) + (size,) * 3, dtype=np.float32)
    masks = np.empty((len(idx),) + (size,) * 3, dtype=np.uint8)
    for sel in _chunks(len(idx), size, 3):
        images[sel], masks[sel] = _render3d_chunk(idx[sel], prm, sel, size, seed)
    return images, masks


# ---------------------------------------------------------------------------------------------- dataset


class PhantomDataset(ImageDataset):
    """``phantom2d`` / ``phantom3d`` as an :class:`ImageDataset` (images, labels, lesion masks).

    Items are rendered once at construction and kept in memory as float32 when that takes less than
    256 MiB (the defaults take 32 MiB and 52 MiB); larger requests (e.g. ``phantom3d`` at 96^3) are
    rendered on demand per item, which gives identical values.

    Args:
        kind: ``"phantom2d"`` or ``"phantom3d"``.
        n: Number of items.
        image_size: Side length; ``None`` for the native size (64 for 2D, 32 for 3D). Other sizes are
            rendered at that resolution, not resized.
        task: ``"margin"`` (default) or ``"pathology"`` for 2D, ``"lesion"`` for 3D.
        seed: Seed of the generator and of the patient-level split.
        name: Spec string to record (defaults to ``kind:n``).

    Raises:
        DataError: For an unknown kind or task, ``n < 1`` or an image size below 8.
    """

    def __init__(
        self,
        kind: str = "phantom2d",
        n: int | None = None,
        image_size: int | None = None,
        task: str | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if kind == "phantom2d":
            dims, tasks = 2, PHANTOM2D_TASKS
            n = PHANTOM2D_DEFAULT_N if n is None else n
            size = PHANTOM2D_SIZE if image_size is None else image_size
        elif kind == "phantom3d":
            dims, tasks = 3, PHANTOM3D_TASKS
            n = PHANTOM3D_DEFAULT_N if n is None else n
            size = PHANTOM3D_SIZE if image_size is None else image_size
        else:
            raise DataError(f"unknown phantom {kind!r}; valid: phantom2d, phantom3d")
        if int(n) != n or int(n) < 1:
            raise DataError(f"{kind}: the number of items must be a positive integer, got {n!r}")
        n, size = int(n), _check_size(size)
        task = tasks[0] if task is None else task
        if task not in tasks:
            raise DataError(f"{kind} has no task {task!r}; valid tasks: {', '.join(tasks)}")
        self.kind = kind
        self.seed = int(seed)
        idx = np.arange(n)
        if kind == "phantom2d":
            p2 = phantom2d_params(idx, self.seed)
            labels = p2.margin if task == "margin" else p2.pathology
            class_names = MARGIN_NAMES if task == "margin" else PATHOLOGY_NAMES
            patient = p2.patient
        else:
            p3 = phantom3d_params(idx, self.seed)
            labels, class_names, patient = p3.lesion, LESION_NAMES, p3.patient
        patient_ids = np.array([f"P_{p + 1:05d}" for p in patient])
        self._set_metadata(
            name=name or f"{kind}:{n}",
            spatial_dims=dims,
            in_chans=1,
            image_size=size,
            labels=labels,
            class_names=class_names,
            multilabel=False,
            patient_ids=patient_ids,
            splits=assign_patient_splits(patient_ids, seed=self.seed),
            sources=[f"{kind}#{i}" for i in range(n)],
            task=task,
            tasks=tasks,
            has_masks=True,
        )
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        if n * size**dims * 4 <= _EAGER_BYTES:
            self._images, self._masks = self._render(idx)

    def _render(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        render = render_phantom2d if self.kind == "phantom2d" else render_phantom3d
        return render(idx, self.image_size, self.seed)

    @property
    def images(self) -> np.ndarray:
        """All images as a float32 ``(N, S, S[, S])`` array (rendered now if the dataset is lazy)."""
        if self._images is None:
            return self._render(np.arange(len(self)))[0]
        return self._images

    @property
    def masks(self) -> np.ndarray:
        """All lesion masks as a uint8 ``(N, S, S[, S])`` array."""
        if self._masks is None:
            return self._render(np.arange(len(self)))[1]
        return self._masks

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._images is not None and self._masks is not None:
            image, mask = self._images[index], self._masks[index]
        else:
            images, masks = self._render(np.array([index]))
            image, mask = images[0], masks[0]
        return (
            torch.from_numpy(np.array(image, dtype=np.float32)).unsqueeze(0),
            torch.from_numpy(mask.astype(np.int64)),
        )
