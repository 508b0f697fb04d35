"""GraVIS smoothed-AP grouping loss against a direct loop over anchors, group members and ranked views."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.losses.grouping_ap import GroupingAPLoss, grouping_ap_loss


def _loop_reference(
    z: torch.Tensor,
    groups: list[int],
    *,
    tau: float,
    similarity: str = "cosine",
    tau_h: float | None = None,
    detach_weights: bool = True,
) -> torch.Tensor:
    """The formula of METHODS.md written out term by term (scalars, Python loops)."""
    n = z.shape[0]
    if similarity == "cosine":
        z = z / z.norm(dim=1, keepdim=True)

    def s(a: int, b: int) -> torch.Tensor:
        return (z[a] * z[b]).sum()

    def sigmoid(x: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + torch.exp(-x))

    aps = []
    for q in range(n):
        members = [i for i in range(n) if i != q and groups[i] == groups[q]]
        if not members:
            continue
        if tau_h is None:
            w = [1.0 / len(members)] * len(members)
        else:
            sims = [s(q, i).detach() if detach_weights else s(q, i) for i in members]
            ex = [torch.exp(v / tau_h) for v in sims]
            tot = sum(ex)
            w = [e / tot for e in ex]
        ap = 0.0
        for wi, i in zip(w, members, strict=True):
            r_all = 1.0
            r_pos = 1.0
            for j in range(n):
                if j in (q, i):
                    continue
                t = sigmoid((s(q, j) - s(q, i)) / tau)
                r_all = r_all + t
                if groups[j] == groups[q]:
                    r_pos = r_pos + t
            ap = ap + wi * r_pos / r_all
        aps.append(ap)
    if not aps:
        return z.sum() * 0.0
    return 1.0 - sum(aps) / len(aps)


def _compare(groups: list[int], dim: int = 5, **kw) -> None:
    g = torch.Generator().manual_seed(len(groups) * 7 + dim)
    x = torch.randn(len(groups), dim, generator=g, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    loss = grouping_ap_loss(a, torch.tensor(groups), temperature=kw.get("tau", 0.2),
                            similarity=kw.get("similarity", "cosine"), hardness_temperature=kw.get("tau_h"),
                            detach_weights=kw.get("detach_weights", True))
    ref = _loop_reference(b, groups, tau=kw.get("tau", 0.2), similarity=kw.get("similarity", "cosine"),
                          tau_h=kw.get("tau_h"), detach_weights=kw.get("detach_weights", True))
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, ref, atol=1e-12), (float(loss), float(ref))
    loss.backward()
    ref.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


# K = 2, K = 4, views interleaved / grouped by position, and uneven groups with a singleton.
K2 = [0, 1, 2, 3, 0, 1, 2, 3]
K4 = [0, 1, 2] * 4
UNEVEN = [5, 5, 5, 9, 9, 2, 7, 7, 7, 7, 11]  # sizes 3, 2, 1, 4, 1: ids need not be 0..G-1


@pytest.mark.parametrize("groups", [K2, K4, UNEVEN], ids=["K2", "K4", "uneven"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("tau_h", [None, 0.5], ids=["mean", "hardness"])
def test_matches_loop_reference_values_and_gradients(groups, similarity, tau_h):
    _compare(groups, similarity=similarity, tau_h=tau_h, tau=0.2 if similarity == "cosine" else 1.0)


def test_hardness_weights_with_gradient_match_reference():
    _compare(K4, tau_h=0.3, detach_weights=False)
    _compare(UNEVEN, tau_h=2.0, detach_weights=False, tau=0.5)


def test_hardness_weights_favour_similar_views():
    """One anchor, two group members: the loss is the softmax-weighted mean of the two members' precisions."""
    # anchor e0; member A identical to it, member B orthogonal; one negative at 45 degrees.
    z = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1])
    tau, tau_h = 0.2, 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    c = 1 / math.sqrt(2)
    # anchor 0: s(A)=1, s(B)=0, s(neg)=c
    prec_a = (1 + sig((0 - 1) / tau)) / (1 + sig((0 - 1) / tau) + sig((c - 1) / tau))
    prec_b = (1 + sig((1 - 0) / tau)) / (1 + sig((1 - 0) / tau) + sig((c - 0) / tau))
    wa, wb = math.exp(1 / tau_h), math.exp(0 / tau_h)
    ap0 = (wa * prec_a + wb * prec_b) / (wa + wb)
    ap0_plain = (prec_a + prec_b) / 2
    members_of = {0: [1, 2], 1: [0, 2], 2: [0, 1]}
    cos = torch.nn.functional.cosine_similarity(z[:, None], z[None], dim=2)
    assert math.isclose(float(cos[0, 3]), c)
    aps_h, aps_p = [], []
    for q, mem in members_of.items():
        s_m = [float(cos[q, i]) for i in mem]
        precs = []
        for i in mem:
            others = [j for j in range(4) if j not in (q, i)]
            r_all = 1 + sum(sig((float(cos[q, j]) - float(cos[q, i])) / tau) for j in others)
            r_pos = 1 + sum(sig((float(cos[q, j]) - float(cos[q, i])) / tau) for j in others if groups[j] == 0)
            precs.append(r_pos / r_all)
        ws = [math.exp(v / tau_h) for v in s_m]
        aps_h.append(sum(w * p for w, p in zip(ws, precs, strict=True)) / sum(ws))
        aps_p.append(sum(precs) / 2)
    assert math.isclose(aps_h[0], ap0) and math.isclose(aps_p[0], ap0_plain)
    # the easy member A ranks first, so weighting it more raises the anchor's AP
    assert ap0 > ap0_plain
    lh = grouping_ap_loss(z, groups, temperature=tau, hardness_temperature=tau_h)
    lp = grouping_ap_loss(z, groups, temperature=tau, hardness_temperature=None)
    assert math.isclose(float(lh), 1 - sum(aps_h) / 3, abs_tol=1e-12)
    assert math.isclose(float(lp), 1 - sum(aps_p) / 3, abs_tol=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_perfect_grouping_gives_zero_loss(k):
    """Views of an image identical, images orthogonal: every group ranks first."""
    n_img = 5
    base = torch.eye(n_img, 8, dtype=torch.float64) * 3.0
    z = base.repeat(k, 1)  # views grouped by position: view v of image b at row v * n_img + b
    groups = torch.arange(n_img).repeat(k)
    assert float(grouping_ap_loss(z, groups, temperature=0.01)) < 1e-12
    # At τ = 0.2 the sigmoid of a gap of −1 is not zero: the closed form of this configuration.
    tau = 0.2
    r_pos = 1 + (k - 2) * 0.5  # ties inside the group count one half each
    r_all = r_pos + (n_img * k - k) / (1 + math.exp(1 / tau))
    expected = 1 - r_pos / r_all
    for tau_h in (None, 1.0):
        got = float(grouping_ap_loss(z, groups, temperature=tau, hardness_temperature=tau_h))
        assert math.isclose(got, expected, rel_tol=1e-9)
    # and a random embedding is far from it
    rand = torch.randn(n_img * k, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(grouping_ap_loss(rand, groups, temperature=0.01)) > 0.2


def test_groups_are_by_id_not_position():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 6, generator=g)
    groups = torch.tensor([0, 1, 2] * 4)
    perm = torch.randperm(12, generator=g)
    a = grouping_ap_loss(z, groups)
    b = grouping_ap_loss(z[perm], groups[perm])
    assert torch.allclose(a, b, atol=1e-6)
    relabel = grouping_ap_loss(z, groups * 10 + 3)
    assert torch.allclose(a, relabel, atol=0)


def test_singletons_only_give_zero_with_graph():
    z = torch.randn(4, 3, requires_grad=True)
    loss = grouping_ap_loss(z, torch.arange(4))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) == 0


def test_singleton_is_a_negative_but_not_an_anchor():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    groups = [0, 0, 1, 1, 0, 1, 8]  # view 6 is alone in its group
    with_single = grouping_ap_loss(z, torch.tensor(groups))
    without = grouping_ap_loss(z[:6], torch.tensor(groups[:6]))
    assert not torch.allclose(with_single, without)  # it is ranked as a heterogeneous view ...
    ref = _loop_reference(z, groups, tau=0.2, tau_h=1.0)
    assert torch.allclose(with_single, ref, atol=1e-12)  # ... and its own AP (no positives) is not averaged
    ap_six = 1 - float(ref)
    assert not math.isclose(1 - float(with_single), ap_six * 6 / 7)


def test_bf16_input_is_ranked_in_fp32_and_module_form():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(8, 4, generator=g)
    groups = torch.tensor([0, 1] * 4)
    full = grouping_ap_loss(z.bfloat16().float(), groups)
    half = grouping_ap_loss(z.bfloat16(), groups)
    assert half.dtype == torch.float32 and torch.allclose(half, full)
    mod = GroupingAPLoss(temperature=0.2, hardness_temperature=1.0)
    assert torch.allclose(mod(z, groups), grouping_ap_loss(z, groups))


def test_bad_inputs_raise():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="groups"):
        grouping_ap_loss(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        grouping_ap_loss(z, torch.zeros(4))
    with pytest.raises(ValueError, match="similarity"):
        grouping_ap_loss(z, torch.zeros(4, dtype=torch.long), similarity="l2")
    with pytest.raises(ValueError, match="temperature"):
        grouping_ap_loss(z, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        grouping_ap_loss(z[0], torch.zeros(3, dtype=torch.long))
