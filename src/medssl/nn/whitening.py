"""Feature decorrelation (whitening) layers: ZCA by eigen-decomposition and IterNorm.

Med-MoCo (Hassanpour et al., ISBI 2024, arXiv 2402.14611) ends the backbone with a layer that removes the
linear dependence between feature channels, against the dimensional collapse of contrastive learning on
medical images (Jing et al., ICLR 2022). For centred features ``x`` with covariance ``Σ`` the layer outputs
``W (x − μ)`` with ``W ≈ Σ^{-1/2}``, so the output covariance is (close to) the identity:

* ``zca`` — exact ZCA whitening by eigen-decomposition, ``Σ^{-1/2} = U diag(λ + ε)^{-1/2} Uᵀ``
  (Huang et al., "Decorrelated Batch Normalization", CVPR 2018), computed in float64 by default. Its
  backward pass uses the Daleckii–Krein formula with the divided differences of ``λ^{-1/2}`` written in a
  closed form that stays finite for repeated eigenvalues, where the generic ``eigh`` backward divides by
  ``λ_i − λ_j`` and blows up (a batch smaller than the group size has many equal, ε-sized eigenvalues).
* ``iternorm`` — Newton–Schulz iterations (Huang et al., "Iterative Normalization: Beyond Standardization
  towards Efficient Whitening", CVPR 2019): ``Σ_N = Σ / tr Σ``, ``P₀ = I``,
  ``P_{k+1} = 1.5 P_k − 0.5 P_k³ Σ_N``, ``W = P_T / √tr Σ``. With few iterations (``T = 5``) it whitens
  the dominant directions and only partly stretches the weakest ones, which is cheaper and more stable;
  with many iterations it converges to ZCA. The iterates are computed in the equivalent coupled
  Newton–Schulz form, which stays accurate for any ``T`` (see :func:`iternorm_matrix`).

Channels are whitened in groups of ``group_size`` (block-diagonal ``W``), as DBN and IterNorm do: a batch of
``N`` samples estimates at most ``N − 1`` directions, so groups should be smaller than the batch. Med-MoCo
whitens the backbone's last **feature map** as one group, with statistics over all ``N·H·W`` positions
(``forward(pooled, stats=positions)``): enough samples for one group of every channel. Since the layer is affine,
whitening every position and then average-pooling equals whitening the pooled features with the same ``W`` and
``μ``, which is what the layer computes.

In training mode the batch statistics are used (optionally gathered across ranks) and exponential moving
averages of the mean and covariance are kept; in eval mode ``W`` is computed from the running covariance,
so inference does not depend on the batch. :meth:`Whitening.to_linear` folds the eval-mode transform into
an ``nn.Linear(d, d)`` (weight ``W``, bias ``−W μ``), which is how :mod:`medssl.export` writes it.
"""

from __future__ import annotations

import torch
from torch import nn

from medssl import distributed as dist_utils
from medssl.errors import ConfigError

WHITENING_METHODS = ("none", "zca", "iternorm")
#: where the statistics come from: every position of the last feature map (Med-MoCo) or the pooled features
WHITENING_STATS = ("feature_map", "pooled")

__all__ = ["WHITENING_METHODS", "WHITENING_STATS", "Whitening", "WhitenedBackbone", "feature_positions", "inv_sqrt_psd",
           "iternorm_matrix", "whiten_map", "zca_matrix"]


class _InvSqrtPSD(torch.autograd.Function):
    """``Σ ↦ Σ^{-1/2}`` for symmetric positive-definite ``Σ`` (batched), with a stable backward.

    For ``F = U f(Λ) Uᵀ`` the gradient is ``∂L/∂Σ = U (K ∘ (Uᵀ Ḡ U)) Uᵀ`` with ``Ḡ`` the symmetrised
    incoming gradient and ``K_ij = (f(λ_i) − f(λ_j)) / (λ_i − λ_j)`` (``f'(λ_i)`` when equal). For
    ``f(λ) = λ^{-1/2}`` this is exactly ``K_ij = −1 / (s_i s_j (s_i + s_j))`` with ``s = √λ``, finite for
    repeated eigenvalues.
    """

    @staticmethod
    def forward(ctx, cov: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        lam, u = torch.linalg.eigh(cov)
        floor = torch.finfo(cov.dtype).tiny ** 0.5
        s = lam.clamp(min=floor).sqrt()
        out = (u / s.unsqueeze(-2)) @ u.transpose(-1, -2)
        ctx.save_for_backward(u, s)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        u, s = ctx.saved_tensors
        g = 0.5 * (grad + grad.transpose(-1, -2))
        si = s.unsqueeze(-1)
        sj = s.unsqueeze(-2)
        k = -1.0 / (si * sj * (si + sj))
        inner = u.transpose(-1, -2) @ g @ u
        return u @ (k * inner) @ u.transpose(-1, -2)


def inv_sqrt_psd(cov: torch.Tensor) -> torch.Tensor:
    """``Σ^{-1/2}`` of symmetric positive-definite matrices ``(..., g, g)`` by eigen-decomposition.

    Differentiable with a backward pass that is finite for repeated eigenvalues (see :class:`_InvSqrtPSD`).
    """
    return _InvSqrtPSD.apply(cov)


def _eye_like(cov: torch.Tensor) -> torch.Tensor:
    return torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)


def zca_matrix(cov: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ZCA whitening matrix ``U diag(λ + ε)^{-1/2} Uᵀ`` of covariances ``(..., g, g)``."""
    return inv_sqrt_psd(cov + eps * _eye_like(cov))


def iternorm_matrix(cov: torch.Tensor, eps: float = 1e-5, iterations: int = 5) -> torch.Tensor:
    """IterNorm whitening matrix ``P_T / √tr Σ`` by Newton–Schulz iterations (Huang et al. 2019).

    Args:
        cov: ``(..., g, g)`` covariances; ``ε I`` is added first.
        eps: ridge added to the covariance.
        iterations: ``T``, the number of Newton steps ``P ← 1.5 P − 0.5 P³ Σ_N``.
    """
    cov = cov + eps * _eye_like(cov)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    sigma_n = cov / trace
    # Coupled form (Higham, "Functions of Matrices", 2008, §6.7): with Y₀ = Σ_N, Z₀ = I,
    # T = 1.5 I − 0.5 Z Y, Y ← Y T, Z ← T Z. Every iterate is a polynomial in Σ_N, so Y_k = Σ_N Z_k and
    # Z_k = P_k exactly (same iterates, same 3 matrix products per step); unlike the literal P³Σ_N form, whose
    # rounding errors grow once it has converged, it is numerically stable for any T.
    eye = _eye_like(cov)
    y, z = sigma_n, eye
    for _ in range(iterations):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return z / trace.sqrt()


class Whitening(nn.Module):
    """Decorrelation layer for ``(N, d)`` features: ``y = W (x − μ)`` with ``W ≈ Σ^{-1/2}`` per channel group.

    Args:
        num_features: ``d``.
        method: ``zca`` or ``iternorm``.
        group_size: channels per group (block-diagonal whitening); ``0`` or ``≥ d`` whitens all channels
            together. Must divide ``d``.
        eps: ridge ``ε`` added to the covariance.
        momentum: weight of the new batch in the running mean / covariance (as in BatchNorm).
        iterations: Newton steps of ``iternorm``.
        dtype: ``float64`` (default) or ``float32``: the precision of the statistics and the matrix function.
        gather_distributed: compute the batch statistics over all ranks (gradient-preserving all-gather);
            off by default, like BatchNorm, where each rank uses its own batch.

    Raises:
        ConfigError: unknown method or dtype, or a group size that does not divide ``d``.
    """

    def __init__(
        self,
        num_features: int,
        method: str = "zca",
        *,
        group_size: int = 64,
        eps: float = 1e-5,
        momentum: float = 0.1,
        iterations: int = 5,
        dtype: str = "float64",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if method not in ("zca", "iternorm"):
            raise ConfigError(f"whitening must be one of {WHITENING_METHODS}, got '{method}'")
        if dtype not in ("float32", "float64"):
            raise ConfigError(f"whitening dtype must be float32 or float64, got '{dtype}'")
        if num_features < 1:
            raise ConfigError(f"whitening needs num_features >= 1, got {num_features}")
        g = num_features if group_size <= 0 or group_size >= num_features else group_size
        if num_features % g:
            raise ConfigError(
                f"whitening group_size {group_size} does not divide the feature width {num_features}; "
                "choose a divisor (e.g. 32 or 64) or 0 for one group"
            )
        if eps <= 0:
            raise ConfigError(f"whitening eps must be > 0, got {eps}")
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"whitening momentum must be in (0, 1], got {momentum}")
        if iterations < 1:
            raise ConfigError(f"whitening iterations must be >= 1, got {iterations}")
        self.num_features = num_features
        self.method = method
        self.group_size = g
        self.num_groups = num_features // g
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.iterations = int(iterations)
        self.compute_dtype = torch.float64 if dtype == "float64" else torch.float32
        self.gather_distributed = gather_distributed
        self.register_buffer("running_mean", torch.zeros(num_features, dtype=self.compute_dtype))
        self.register_buffer(
            "running_cov", torch.eye(g, dtype=self.compute_dtype).repeat(self.num_groups, 1, 1)
        )

    def extra_repr(self) -> str:
        return (f"{self.num_features}, method={self.method}, group_size={self.group_size}, eps={self.eps}, "
                f"momentum={self.momentum}" + (f", iterations={self.iterations}" if self.method == "iternorm" else ""))

    def matrix(self, cov: torch.Tensor) -> torch.Tensor:
        """The whitening matrices ``(G, g, g)`` of covariances ``(G, g, g)`` (ridge ``ε`` added here)."""
        if self.method == "zca":
            return zca_matrix(cov, self.eps)
        return iternorm_matrix(cov, self.eps, self.iterations)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, d) → (G, N, g)``."""
        return x.reshape(x.shape[0], self.num_groups, self.group_size).transpose(0, 1)

    def forward(self, x: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
        """Whiten ``x`` ``(N, d)``.

        Args:
            x: the features to whiten.
            stats: optional ``(M, d)`` samples the training-mode statistics are computed from instead of ``x``
                (Med-MoCo: every position of the feature map whose average is ``x``). Ignored in eval mode.
        """
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"Whitening expects (N, {self.num_features}) features, got {tuple(x.shape)}")
        if stats is not None and (stats.ndim != 2 or stats.shape[1] != self.num_features):
            raise ValueError(f"Whitening statistics must be (M, {self.num_features}), got {tuple(stats.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(self.compute_dtype)
            if self.training:
                xs = xc if stats is None else stats.to(self.compute_dtype)
                xs = dist_utils.gather(xs) if self.gather_distributed else xs
                n = xs.shape[0]
                mean = xs.mean(dim=0)
                centred = self._grouped(xs - mean)
                cov = centred.transpose(1, 2) @ centred / n
                w = self.matrix(cov)
                with torch.no_grad():
                    unbiased = cov.detach() * (n / max(n - 1, 1))
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_cov.lerp_(unbiased, self.momentum)
            else:
                mean = self.running_mean
                w = self.matrix(self.running_cov)
            out = self._grouped(xc - mean) @ w  # W is symmetric: rows of (x − μ) W = (W (x − μ))ᵀ
            out = out.transpose(0, 1).reshape(x.shape[0], self.num_features)
        return out.to(x.dtype) if x.dtype in (torch.float32, torch.float64) else out.float()

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode transform as ``(weight (d, d), bias (d,))``: ``y = weight @ x + bias``."""
        w = torch.block_diag(*self.matrix(self.running_cov).unbind(0))
        return w, -(w @ self.running_mean)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear(d, d)`` (float32) computing the eval-mode whitening (what exports store)."""
        w, b = self.eval_affine()
        lin = nn.Linear(self.num_features, self.num_features)
        lin.weight.copy_(w.float())
        lin.bias.copy_(b.float())
        return lin.to(self.running_mean.device)


def feature_positions(fmap: torch.Tensor) -> torch.Tensor:
    """The positions of a feature map ``(N, C, *S)`` as samples ``(N·ΠS, C)``."""
    return fmap.movedim(1, -1).reshape(-1, fmap.shape[1])


def whiten_map(whitening: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """Apply a whitening layer (a :class:`Whitening` or its folded ``nn.Linear``) to every position of a feature
    map ``(N, C, *S)``: a 1×1 convolution with the whitening's ``W`` and bias ``−W μ``."""
    y = whitening(feature_positions(fmap))
    return y.reshape(fmap.shape[0], *fmap.shape[2:], -1).movedim(-1, 1)


class WhitenedBackbone(nn.Module):
    """A backbone followed by a whitening layer (a :class:`Whitening` or its folded ``nn.Linear``).

    Its ``forward`` returns the whitened pooled features; :mod:`medssl.export` writes ``backbone`` and
    ``whitening`` to separate files so the backbone file stays in timm's key layout.
    """

    def __init__(self, backbone: nn.Module, whitening: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.whitening = whitening

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.whitening(self.backbone(x))
