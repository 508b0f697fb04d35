"""InfoNCE against the formula written out by hand (values and gradients)."""

from __future__ import annotations

import math

import torch

from medssl.losses import info_nce


def _hand_infonce(q: torch.Tensor, k: torch.Tensor, negs: list[list[torch.Tensor]], tau: float) -> torch.Tensor:
    """-mean_i log( exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_n exp(q_i·n/τ)) ), with explicit loops."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        ki = k[i] / k[i].norm()
        pos = torch.exp((qi * ki).sum() / tau)
        den = pos.clone()
        for n in negs[i]:
            den = den + torch.exp((qi * n).sum() / tau)
        total = total - torch.log(pos / den)
    return total / q.shape[0]


def test_queue_mode_matches_hand_formula_values_and_grads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g, requires_grad=True)
    k = torch.randn(5, 8, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    tau = 0.2
    ours = info_nce(q, k, temperature=tau, queue=queue)
    (g_ours,) = torch.autograd.grad(ours, q)
    q2 = q.detach().clone().requires_grad_(True)
    ref = _hand_infonce(q2, k, [list(queue) for _ in range(5)], tau)
    (g_ref,) = torch.autograd.grad(ref, q2)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_in_batch_mode_uses_other_keys_as_negatives():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 6, generator=g, requires_grad=True)
    k = torch.randn(4, 6, generator=g, requires_grad=True)
    ours = info_nce(q, k, temperature=0.5, queue=None, gather_distributed=False)
    kn = torch.nn.functional.normalize(k, dim=1)
    ref = _hand_infonce(q, k, [[kn[j] for j in range(4) if j != i] for i in range(4)], 0.5)
    assert torch.allclose(ours, ref, atol=1e-5)
    ga = torch.autograd.grad(ours, [q, k])
    gb = torch.autograd.grad(_hand_infonce(q, k, [[kn[j] for j in range(4) if j != i] for i in range(4)], 0.5), [q, k])
    for a, b in zip(ga, gb, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_perfect_alignment_with_orthogonal_negatives_gives_known_value():
    # q = k = e_0, negatives orthogonal: L = -log(e^{1/τ} / (e^{1/τ} + K))
    q = torch.zeros(1, 4)
    q[0, 0] = 1.0
    queue = torch.eye(4)[1:]
    tau = 0.2
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3))
    assert abs(float(info_nce(q, q.clone(), temperature=tau, queue=queue)) - expected) < 1e-5
