"""Projection heads."""

from __future__ import annotations

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
