"""Projection heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                   batch_norm: bool = False) -> nn.Sequential:
    """MLP projector ``in → hidden → … → out`` with ReLU between layers (MoCo v2: 2 layers, d→d→128).

    Args:
        in_dim: backbone feature width.
        hidden_dim: width of hidden layers.
        out_dim: embedding width.
        num_layers: number of linear layers (≥ 1).
        batch_norm: BatchNorm1d after each hidden linear layer (SimCLR / MoCo v3 style); off for MoCo v2.
    """
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(d, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def mocov3_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP (Chen, Xie & He 2021): ``num_layers`` bias-free linear layers, BatchNorm + ReLU after every
    hidden one, and (``last_bn``, the projector) a BatchNorm without affine parameters after the last."""
    layers: list[nn.Module] = []
    d = in_dim
    for i in range(num_layers):
        last = i == num_layers - 1
        width = out_dim if last else hidden_dim
        layers.append(nn.Linear(d, width, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(width, affine=False))
        d = width
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021): an MLP ``in → hidden → … → bottleneck`` (GELU, optional
    BatchNorm), L2 normalisation, then a weight-normalised linear layer ``bottleneck → out`` without bias whose
    norm ``g`` is fixed to 1 when ``norm_last_layer`` (DINO's default for ViTs: it stabilises training).

    ``forward(x, freeze_last_layer=True)`` uses the last layer's weight detached, so it gets no gradient (its
    ``.grad`` stays ``None`` and the optimiser skips it: DINO's ``cancel_gradients_last_layer`` during the first
    epoch).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(max(num_layers, 1) - 1):
            layers.append(nn.Linear(d, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            d = hidden_dim
        layers.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        if freeze_last_layer:
            return F.linear(x, self.last_layer.weight.detach())
        return self.last_layer(x)
