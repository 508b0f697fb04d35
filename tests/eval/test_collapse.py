"""Collapse diagnostics against NumPy references: spectrum, effective rank, normalised std, trainer columns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medssl.engine.metrics import _collapse_update
from medssl.errors import DataError
from medssl.eval.collapse import (
    collapse_columns,
    collapse_logs,
    collapse_stats,
    covariance_spectrum,
    effective_rank,
    evaluate_collapse,
    normalized_std,
    plot_spectra,
)
from medssl.eval.protocol import FeatureSet, run_protocol


def _rank_r(n: int, d: int, r: int, seed: int = 0, equal: bool = True) -> np.ndarray:
    """n points in an r-dimensional subspace of R^d (random orientation, offset from the origin)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, r)))
    coef = rng.standard_normal((n, r))
    if equal:  # exactly equal variance along the r directions: whiten the sample coefficients
        coef -= coef.mean(0)
        u, _, vt = np.linalg.svd(coef, full_matrices=False)
        coef = u @ vt * math.sqrt(n - 1)
    return coef @ basis.T + rng.standard_normal(d)


def test_spectrum_matches_numpy_covariance_eigenvalues():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((50, 8)) @ rng.standard_normal((8, 8))
    ref = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
    np.testing.assert_allclose(covariance_spectrum(z), ref, rtol=1e-9, atol=1e-12)
    # fewer samples than dimensions: zeros beyond rank N-1
    small = covariance_spectrum(z[:4])
    assert small.shape == (8,) and np.all(small[3:] < 1e-20 * small[0]) and np.all(small[:3] > 1e-3 * small[0])


@pytest.mark.parametrize("r", [1, 3, 10])
def test_rank_r_embedding_has_effective_rank_r(r):
    z = _rank_r(400, 32, r)
    assert collapse_stats(z).effective_rank == pytest.approx(r, rel=1e-6)
    # random (not exactly equal) variances along r directions with many samples: close to r
    assert collapse_stats(_rank_r(20000, 32, r, seed=2, equal=False)).effective_rank == pytest.approx(r, rel=0.02)


def test_identical_embeddings_have_effective_rank_one_and_zero_std():
    row = np.array([0.1, 0.7, -0.3, 0.2])  # 0.1 is not exactly representable: the mean is off by rounding
    z = np.tile(row, (33, 1))
    st = collapse_stats(z)
    assert st.effective_rank == 1.0 and st.std == 0.0
    assert collapse_stats(torch.zeros(5, 3)).effective_rank == 1.0


def test_effective_rank_formula_by_hand():
    p = np.array([3.0, 1.0]) / 4.0
    assert effective_rank([3.0, 1.0]) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert effective_rank([2.0, 2.0, 2.0, 0.0]) == pytest.approx(3.0)
    assert effective_rank([5.0]) == pytest.approx(1.0)


def test_normalized_std_matches_numpy():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((40, 6)) + 2.0
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    assert normalized_std(z) == pytest.approx(zn.std(axis=0, ddof=1).mean() * math.sqrt(6), rel=1e-9)
    # isotropic Gaussian embeddings are spread over the sphere: about 1
    assert normalized_std(rng.standard_normal((20000, 64))) == pytest.approx(1.0, abs=0.02)


def test_bad_input_raises_data_error():
    with pytest.raises(DataError):
        collapse_stats(np.zeros(5))
    with pytest.raises(DataError):
        collapse_stats(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_logs_and_columns_name_every_embedding():
    emb = {"backbone": torch.as_tensor(_rank_r(64, 16, 4)), "projector": torch.randn(64, 8)}
    logs = collapse_logs(emb)
    assert list(logs) == collapse_columns(["backbone", "projector"]) == [
        "backbone_eff_rank", "backbone_std", "projector_eff_rank", "projector_std"]
    assert logs["backbone_eff_rank"] == pytest.approx(4.0, rel=1e-4)


def test_trainer_fills_columns_every_n_steps_and_at_the_last_step():
    emb = {"backbone": torch.as_tensor(_rank_r(32, 16, 2))}
    empty = {"backbone_eff_rank": "", "backbone_std": ""}
    assert _collapse_update(emb, 3, 12, 5, {}) == empty  # columns present, not computed
    row = _collapse_update(emb, 5, 12, 5, {})
    assert row["backbone_eff_rank"] == pytest.approx(2.0, rel=1e-4)
    assert _collapse_update(emb, 6, 12, 5, row) == row  # kept until the next metrics row is written
    assert _collapse_update(emb, 12, 12, 5, {})["backbone_std"] != ""  # the last step
    assert _collapse_update(emb, 5, 12, 0, {}) == {}  # 0 = off
    assert _collapse_update({}, 5, 12, 5, {}) == {}  # a method without embeddings


def test_collapse_protocol_on_a_feature_set():
    rng = np.random.default_rng(4)
    feats = _rank_r(90, 12, 5)
    fs = FeatureSet(train_x=feats[:60], train_y=rng.integers(0, 2, 60), test_x=feats[60:],
                    test_y=np.array([0, 1] * 15))
    rows = run_protocol(fs, "collapse", [1.0], [0])
    assert rows[0]["metrics"]["eff_rank"] == pytest.approx(5.0, rel=1e-6)
    assert rows[0]["metrics"]["n"] == 90.0
    np.testing.assert_allclose(rows[0]["params"]["spectrum"], covariance_spectrum(feats))


class _Linear(torch.nn.Module):
    """A fixed linear 'encoder' on flattened images, so features are known in closed form."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


def test_evaluate_collapse_writes_results_and_plot(tmp_path):
    g = torch.Generator().manual_seed(5)
    images = torch.rand(30, 1, 4, 4, generator=g)
    dataset = [{"image": im} for im in images]
    w = torch.randn(16, 6, generator=g)
    w[:, 3:] = 0  # rank-3 features
    res = evaluate_collapse([("lin", _Linear(w))], dataset, tmp_path, batch_size=8, progress=False)
    ref = collapse_stats(images.flatten(1) @ w)
    data = json.loads((tmp_path / "results.json").read_text())
    row = data["rows"][0]
    assert row["metrics"]["eff_rank"] == pytest.approx(ref.effective_rank, rel=1e-5)
    assert 1.0 < row["metrics"]["eff_rank"] <= 3.0
    assert len(row["params"]["spectrum"]) == 6
    assert data["meta"]["spectrum_plot"] == "collapse_spectrum.png"
    assert (tmp_path / "collapse_spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eff_rank" in res["table"]


def test_plot_spectra_handles_zero_spectra(tmp_path):
    path = plot_spectra({"a": np.array([4.0, 1.0, 0.0]), "collapsed": np.zeros(3)}, tmp_path / "s.png")
    assert path.stat().st_size > 1000
