"""Collapse diagnostics: covariance spectrum, effective rank and spread of embeddings.

Contrastive methods can collapse *dimensionally*: the embeddings stop spreading over all directions and
live in a low-dimensional subspace (Jing et al., "Understanding Dimensional Collapse in Contrastive
Self-supervised Learning", ICLR 2022) — the failure Med-MoCo was designed against. Three numbers show it:

* the **spectrum**: eigenvalues of the embeddings' covariance matrix (its singular values, since it is
  symmetric positive semi-definite), sorted in decreasing order, plotted on a log scale (Jing et al.);
* the **effective rank** (Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
  EUSIPCO 2007): ``exp(H(p))`` with ``p_k = σ_k / Σ_j σ_j`` the normalised spectrum and ``H`` the Shannon
  entropy. It is ``r`` for ``r`` equally strong directions and ``1`` for a single one; it cannot exceed
  ``min(d, N − 1)`` for ``N`` samples, so compare runs at the same ``N``;
* the **std of L2-normalised embeddings** times ``√d``, averaged over dimensions, as MoCo v2 logs it
  (``embedding_std``): about 1 for embeddings spread over the sphere, 0 for complete collapse.

Embeddings with (numerically) no variance at all — complete collapse — get effective rank 1 and std 0.

Used during pretraining (the trainer logs ``<name>_eff_rank`` and ``<name>_std`` for the embeddings a method
returns in ``StepOutput.embeddings``) and on any trained encoder (``medssl evaluate --protocol collapse``,
:func:`evaluate_collapse`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medssl.errors import DataError

#: statistics the trainer writes per embedding name, as ``<name>_<stat>`` columns of metrics.csv
COLLAPSE_STATS: tuple[str, ...] = ("eff_rank", "std")

#: relative variance below which embeddings count as identical (complete collapse)
_COLLAPSED_RTOL = 1e-10

SPECTRUM_PLOT = "collapse_spectrum.png"


@dataclass
class CollapseStats:
    """Collapse statistics of one ``(N, d)`` embedding matrix.

    Attributes:
        spectrum: ``(d,)`` eigenvalues of the covariance, decreasing (zeros beyond rank ``N − 1``).
        effective_rank: ``exp`` of the entropy of the normalised spectrum (1 for complete collapse).
        std: mean over dimensions of the std of the L2-normalised embeddings, times ``√d``.
        dim: ``d``.
        num_samples: ``N``.
    """

    spectrum: np.ndarray
    effective_rank: float
    std: float
    dim: int
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the spectrum as a list)."""
        return {"effective_rank": self.effective_rank, "std": self.std, "dim": self.dim,
                "num_samples": self.num_samples, "spectrum": [float(v) for v in self.spectrum]}


def _as_matrix(z: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(z).detach()
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise DataError(f"collapse statistics need an (N, d) embedding matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise DataError("collapse statistics: the embeddings contain NaN or inf")
    return t.to(torch.float64)


def covariance_spectrum(z: torch.Tensor | np.ndarray) -> np.ndarray:
    """Eigenvalues of the covariance (``1/(N−1)`` normalisation) of ``(N, d)`` embeddings, decreasing.

    Computed as the squared singular values of the centred matrix in float64 (no ``d × d`` matrix is formed
    when ``N < d``); padded with zeros to length ``d``.
    """
    t = _as_matrix(z)
    n, d = t.shape
    if n < 2:
        return np.zeros(d)
    centred = t - t.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    eig = (s * s / (n - 1)).cpu().numpy()
    out = np.zeros(d)
    out[: eig.size] = np.sort(eig)[::-1]
    return out


def effective_rank(spectrum: np.ndarray | Sequence[float], scale: float | None = None) -> float:
    """Roy & Vetterli's effective rank ``exp(−Σ p_k log p_k)``, ``p = σ / Σσ``, of a non-negative spectrum.

    Args:
        spectrum: singular values (here: covariance eigenvalues).
        scale: a reference magnitude (e.g. the mean squared norm of the embeddings); when the spectrum's sum
            is below ``1e-10 · scale`` the embeddings count as identical and the result is 1.

    Values below ``d · ε_float64 · max(σ)`` are treated as 0 (numerical noise, as in ``numpy.linalg.matrix_rank``).
    """
    s = np.clip(np.asarray(spectrum, dtype=np.float64), 0.0, None)
    total = float(s.sum())
    if s.size == 0 or total <= 0.0 or (scale is not None and total <= _COLLAPSED_RTOL * scale):
        return 1.0
    s = np.where(s > s.size * np.finfo(np.float64).eps * s.max(), s, 0.0)
    p = s[s > 0] / s.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def normalized_std(z: torch.Tensor | np.ndarray) -> float:
    """Mean over dimensions of the std (over samples) of L2-normalised embeddings, times ``√d``."""
    t = _as_matrix(z)
    if t.shape[0] < 2:
        return 0.0
    zn = F.normalize(t, dim=1)
    return float(zn.std(dim=0).mean() * math.sqrt(t.shape[1]))


def collapse_stats(z: torch.Tensor | np.ndarray) -> CollapseStats:
    """Spectrum, effective rank and normalised std of ``(N, d)`` embeddings (see the module docstring).

    Raises:
        DataError: not an ``(N, d)`` matrix, or non-finite values.
    """
    t = _as_matrix(z)
    spectrum = covariance_spectrum(t)
    scale = float((t * t).sum(dim=1).mean())
    collapsed = float(spectrum.sum()) <= _COLLAPSED_RTOL * scale
    return CollapseStats(
        spectrum=spectrum,
        effective_rank=1.0 if collapsed else effective_rank(spectrum, scale),
        std=0.0 if collapsed else normalized_std(t),
        dim=int(t.shape[1]),
        num_samples=int(t.shape[0]),
    )


def collapse_columns(names: Sequence[str]) -> list[str]:
    """The metrics.csv columns for embeddings ``names``: ``<name>_eff_rank``, ``<name>_std``, ..."""
    return [f"{n}_{s}" for n in names for s in COLLAPSE_STATS]


def collapse_logs(embeddings: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{<name>_eff_rank, <name>_std}`` for every embedding matrix (what the trainer writes to metrics.csv)."""
    out: dict[str, float] = {}
    for name, z in embeddings.items():
        st = collapse_stats(z.float())
        out[f"{name}_eff_rank"] = st.effective_rank
        out[f"{name}_std"] = st.std
    return out


def plot_spectra(spectra: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Plot normalised spectra ``σ_k / σ_1`` (log scale) against the index ``k``; writes a PNG.

    Uses matplotlib's object-oriented API with the Agg canvas (no display, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    floor = 1e-12
    for label, spec in spectra.items():
        s = np.asarray(spec, dtype=np.float64)
        if s.size == 0:
            continue
        top = s[0] if s[0] > 0 else 1.0
        ax.plot(np.arange(1, s.size + 1), np.clip(s / top, floor, None), label=label, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("index k (sorted)")
    ax.set_ylabel("eigenvalue of the covariance / largest")
    ax.set_title(title or "embedding covariance spectrum")
    ax.grid(True, which="both", alpha=0.3)
    if spectra:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _sample_indices(n: int, max_samples: int | None) -> np.ndarray:
    if max_samples is None or n <= max_samples:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_samples).round().astype(np.int64))


def evaluate_collapse(
    encoders: Sequence[tuple[str, torch.nn.Module]],
    dataset: Any,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    max_samples: int | None = 5000,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Collapse diagnostics of trained encoders on a dataset: ``results.json``, ``results.md`` and a plot.

    The features of every image of the dataset (all splits; labels are not used), at most ``max_samples``
    evenly spaced ones, are extracted with :func:`medssl.eval.features.extract_features`. For an encoder
    that ends with a whitening layer (Med-MoCo), the features before the whitening are measured too, under
    ``<encoder> (before whitening)``: whitening spreads features by construction, so both are reported.

    Returns:
        ``{"rows", "summary", "table"}`` like :func:`medssl.api.evaluate`; each row has
        ``metrics = {eff_rank, std, dim, n}`` and ``params = {spectrum}``. ``results.json`` gets the spectra
        and ``meta["spectrum_plot"]`` names the PNG (``collapse_spectrum.png``) in ``out_dir``.
    """
    from medssl.eval.features import extract_features
    from medssl.eval.results import format_table, summarize, write_results
    from medssl.nn.whitening import WhitenedBackbone

    n_items = len(dataset)
    if n_items < 2:
        raise DataError(f"collapse diagnostics need at least 2 images, the dataset has {n_items}")
    idx = _sample_indices(n_items, max_samples)
    rows: list[dict[str, Any]] = []
    spectra: dict[str, np.ndarray] = {}
    for label, enc in encoders:
        parts: list[tuple[str, torch.nn.Module]] = [(label, enc)]
        inner = getattr(enc, "backbone", None)
        if isinstance(inner, WhitenedBackbone):
            from medssl.nn.backbones import Encoder

            parts.append((f"{label} (before whitening)", Encoder(inner.backbone)))
        for name, module in parts:
            feats = extract_features(module, dataset, idx, batch_size=batch_size, device=device,
                                     progress=f"features {name}" if progress else False)
            st = collapse_stats(feats)
            spectra[name] = st.spectrum
            rows.append({
                "encoder": name, "protocol": "collapse", "label_fraction": 1.0, "seed": 0, "n_train": st.num_samples,
                "metrics": {"eff_rank": st.effective_rank, "std": st.std, "dim": float(st.dim),
                            "n": float(st.num_samples)},
                "notes": [], "params": {"spectrum": [float(v) for v in st.spectrum]},
            })
            if progress:
                print(f"collapse {name}: effective rank {st.effective_rank:.2f} of d={st.dim} "
                      f"({st.num_samples} images), std {st.std:.3f}", flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_spectra(spectra, out / SPECTRUM_PLOT)
    write_results(rows, out, meta={**(meta or {}), "protocol": "collapse", "spectrum_plot": SPECTRUM_PLOT,
                                   "num_images": int(idx.size)})
    summary = summarize(rows)
    return {"rows": rows, "summary": summary, "table": format_table(summary)}
