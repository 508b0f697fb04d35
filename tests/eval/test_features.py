"""Feature extraction: order, eval mode, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from medssl.errors import DataError
from medssl.eval.features import extract_features


class TinyImages(Dataset):
    """Items whose image encodes their index: image[c, h, w] = index / 100."""

    def __init__(self, n: int = 23) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"image": torch.full((1, 4, 4), i / 100.0), "index": i, "label": torch.tensor(i % 2)}


class MeanEncoder(torch.nn.Module):
    """(B, C, H, W) -> (B, 2): [mean, 1 if training else 0]; dropout shows whether eval() was set."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.flatten(1).mean(dim=1) * self.scale
        flag = torch.full_like(mean, float(self.training))
        return torch.stack([mean, flag], dim=1)


def test_order_batches_and_eval_mode() -> None:
    enc = MeanEncoder().train()
    idx = np.array([5, 0, 22, 7, 13, 1, 9])
    feats = extract_features(enc, TinyImages(), idx, batch_size=3)
    assert feats.dtype == np.float32 and feats.shape == (7, 2)
    np.testing.assert_allclose(feats[:, 0], 2 * idx / 100.0, rtol=1e-6)
    assert np.all(feats[:, 1] == 0)  # run in eval mode
    assert enc.training  # previous mode restored
    assert not torch.is_grad_enabled() or enc.scale.grad is None


def test_errors() -> None:
    ds = TinyImages()
    with pytest.raises(DataError):
        extract_features(MeanEncoder(), ds, np.array([], dtype=np.int64))
    with pytest.raises(DataError):
        extract_features(MeanEncoder(), ds, np.array([0, 23]))

    class MapEncoder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x  # (B, C, H, W): not pooled

    with pytest.raises(DataError, match="pool"):
        extract_features(MapEncoder(), ds, np.arange(4))

    class NaNEncoder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 3), float("nan"))

    with pytest.raises(DataError, match="non-finite"):
        extract_features(NaNEncoder(), ds, np.arange(4))
