"""Every loss computes in float32 under bf16 autocast (what `train.precision=bf16-mixed` runs the step in).

bf16 keeps 8 bits of mantissa: a similarity matrix divided by τ = 0.2 and pushed through exp/log loses about
two decimal digits there. Each loss is called inside ``torch.autocast(bfloat16)`` on inputs that are exactly
representable in bf16 and must match its float32 value to float32 accuracy — a bf16 matmul or softmax inside
would miss by ~1e-2.
"""

from __future__ import annotations

import pytest
import torch

from medssl.losses.focal import sigmoid_focal_loss
from medssl.losses.grouping_ap import grouping_ap_loss
from medssl.losses.infonce import info_nce
from medssl.losses.reconstruction import reconstruction_loss
from medssl.methods.cass import cass_loss


def _bf16_exact(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(torch.bfloat16).float()


CASES = {
    "info_nce_in_batch": lambda a, b, q: info_nce(a, b, temperature=0.1, gather_distributed=False),
    "info_nce_queue": lambda a, b, q: info_nce(a, b, temperature=0.1, queue=torch.nn.functional.normalize(q, dim=1)),
    "cass": lambda a, b, q: cass_loss(a, b),
    "grouping_ap": lambda a, b, q: grouping_ap_loss(torch.cat([a, b]), torch.arange(a.shape[0]).repeat(2),
                                                    temperature=0.05, gather_distributed=False),
    "focal": lambda a, b, q: sigmoid_focal_loss(a * 4, (b > 0).float()),
    "reconstruction": lambda a, b, q: reconstruction_loss(a.reshape(4, 16, 8) * 3, b.reshape(4, 16, 8),
                                                          (q[:64, 0] > 0).reshape(4, 16)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_is_float32_under_bf16_autocast(name):
    a, b, q = _bf16_exact(64, 8, seed=1), _bf16_exact(64, 8, seed=2), _bf16_exact(256, 8, seed=3)
    reference = CASES[name](a, b, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = CASES[name](a, b, q)
        assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-6)


def test_a_bf16_matmul_would_be_caught():
    """The tolerance above is tight enough to see a similarity matrix computed in bf16."""
    a, b = _bf16_exact(64, 8, seed=1), _bf16_exact(64, 8, seed=2)
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    exact = torch.nn.functional.cross_entropy(a @ b.t() / 0.1, torch.arange(64))
    low = torch.nn.functional.cross_entropy((a.bfloat16() @ b.bfloat16().t()).float() / 0.1, torch.arange(64))
    assert not torch.allclose(low, exact, rtol=1e-5, atol=1e-6)
