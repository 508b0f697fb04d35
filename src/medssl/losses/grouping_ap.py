"""The smoothed-AP grouping loss of GraVIS: all views of an image should rank above every other view.

Zhou et al., "GraVIS: Grouping Augmented Views from Independent Sources for Dermatology Analysis",
IEEE TMI 2023 (arXiv 2301.04410); the sigmoid-smoothed ranking follows Brown et al., "Smooth-AP", ECCV 2020.

Each image contributes K augmented views that form a *homogeneous group*; every view of another image is
*heterogeneous*. For an anchor view ``q`` with group ``G(q)`` (the other views of the same image, the anchor
itself excluded) and similarities ``s``, the rank of a group member ``i`` among all views other than ``q`` is
smoothed with a sigmoid of temperature τ::

    R_all(q, i) = 1 + Σ_{j ∉ {q, i}}    σ((s_qj − s_qi) / τ)
    R_pos(q, i) = 1 + Σ_{j ∈ G(q), j ≠ i} σ((s_qj − s_qi) / τ)
    AP(q)       = Σ_{i ∈ G(q)} w_qi · R_pos(q, i) / R_all(q, i)
    L           = 1 − mean_q AP(q)

With ``w_qi = 1 / |G(q)|`` this is the smoothed average precision of the group in the anchor's ranking.

**Hardness-aware weighting (a documented choice).** The paper weights homogeneous views "by their
importance", favouring views of similar appearance over dissimilar ones, but never published the formula.
medssl uses ``w_q· = softmax_{i ∈ G(q)}(s_qi / τ_h)``: a group member that already looks like the anchor
counts more, one that an aggressive augmentation made unrecognisable counts less (its term cannot be
satisfied without pulling apart the rest of the ranking). The weights are detached from the graph by
default: they say *how much* each term matters, they are not something to optimise — with gradient through
them the loss could fall by concentrating all weight on the easiest positive instead of ranking the group
higher. ``hardness_temperature=None`` restores the plain mean.

Anchors whose group has no other member (a group of size 1, e.g. an image whose other views went to another
rank's short batch) have no positives and are left out of the mean; if no anchor has a positive the loss is
a zero that still carries the graph (its gradient is zero).

Under DDP (``gather_distributed=True``) every rank ranks its own anchors against the views of *all* ranks,
gathered with a gradient-preserving all-gather (ranks may hold different numbers of views: a short last
batch). Each rank returns ``world_size / A · Σ_{its anchors} (1 − AP(q))`` with ``A`` the number of anchors
with positives over all ranks, so that the mean over ranks (what DDP's gradient averaging applies) equals the
single-process loss on the global batch, value and gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl import distributed as dist_utils

SIMILARITIES = ("cosine", "dot")

__all__ = ["SIMILARITIES", "GroupingAPLoss", "grouping_ap_loss"]


def _gather_rows(x: torch.Tensor, n_max: int, sizes: list[int], *, with_grad: bool,
                 pad_value: float = 0.0) -> torch.Tensor:
    """All-gather ``x`` (rows may differ between ranks) by padding to ``n_max`` rows; drop the padding after."""
    pad = n_max - x.shape[0]
    if pad:
        filler = torch.full((pad, *x.shape[1:]), pad_value, dtype=x.dtype, device=x.device)
        x = torch.cat([x, filler], dim=0)
    full = dist_utils.gather(x, with_grad=with_grad)
    keep = torch.cat([torch.arange(n, device=x.device) + r * n_max for r, n in enumerate(sizes)])
    return full[keep]


def grouping_ap_loss(
    embeddings: torch.Tensor,
    groups: torch.Tensor,
    *,
    temperature: float = 0.2,
    similarity: str = "cosine",
    hardness_temperature: float | None = 1.0,
    detach_weights: bool = True,
    gather_distributed: bool = True,
    global_ids: bool = False,
) -> torch.Tensor:
    """GraVIS grouping loss ``1 − mean smoothed AP`` of each view's group (see the module docstring).

    Args:
        embeddings: ``(N, D)`` embeddings of this rank's views.
        groups: ``(N,)`` integer group ids (the source image of each view). Views with the same id are one
            homogeneous group, whatever their position in the batch; group sizes may differ.
        temperature: τ of the sigmoid that smooths the rank indicator (0.2 in GraVIS).
        similarity: ``cosine`` (L2-normalised embeddings, default) or ``dot`` (raw dot products, as in the
            authors' code).
        hardness_temperature: τ_h of the hardness-aware weights ``softmax(s_qi / τ_h)`` over an anchor's group;
            ``None`` = plain mean over the group.
        detach_weights: compute the hardness-aware weights without gradient (default; see module docstring).
        gather_distributed: rank against the views of every rank under DDP.
        global_ids: ``groups`` are already unique across ranks (e.g. dataset indices: two ranks holding views of
            the same image then form one group). When False they are only unique within a rank and are made
            global as ``id · world_size + rank`` (they must then be non-negative).

    Returns:
        A scalar tensor (fp32 for half-precision inputs, otherwise the input dtype).

    Raises:
        ValueError: on shapes, dtypes or settings that do not fit.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    if groups.dim() != 1 or groups.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"groups must be (N,) with N = {embeddings.shape[0]} (one id per view), got shape {tuple(groups.shape)}"
        )
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise ValueError(f"groups must hold integer ids, got dtype {groups.dtype}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got '{similarity}'")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hardness_temperature is not None and not hardness_temperature > 0:
        raise ValueError(f"hardness_temperature must be > 0 or None, got {hardness_temperature}")

    device = embeddings.device
    with torch.autocast(device_type=device.type, enabled=False):
        # Sigmoids of similarity gaps / 0.2 lose their resolution in bf16; rank in fp32 at least.
        z = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings
        if similarity == "cosine":
            z = F.normalize(z, dim=1)
        g = groups.long().to(device)
        n = z.shape[0]
        world = dist_utils.world_size() if gather_distributed else 1
        if world > 1:
            r = dist_utils.rank()
            if not global_ids:
                if bool((g < 0).any()):
                    raise ValueError("group ids must be non-negative to be made unique across ranks (global_ids=False)")
                g = g * world + r
            sizes = [int(s) for s in dist_utils.gather(torch.tensor([n], device=device), with_grad=False).tolist()]
            n_max = max(sizes)
            z_all = _gather_rows(z, n_max, sizes, with_grad=True)
            g_all = _gather_rows(g, n_max, sizes, with_grad=False, pad_value=-1)
            offset = sum(sizes[:r])
        else:
            z_all, g_all, offset = z, g, 0

        cols = torch.arange(z_all.shape[0], device=device)
        sim = z @ z_all.t()  # (n, N): this rank's anchors against every view
        is_self = cols[None, :] == (torch.arange(n, device=device) + offset)[:, None]
        pos = (g[:, None] == g_all[None, :]) & ~is_self  # G(q): same image, anchor excluded
        q_idx, i_idx = pos.nonzero(as_tuple=True)  # every (anchor, group member) pair, P of them

        s_qi = sim[q_idx, i_idx]
        sig = torch.sigmoid((sim[q_idx] - s_qi[:, None]) / temperature)  # (P, N): σ((s_qj − s_qi) / τ)
        not_i = cols[None, :] != i_idx[:, None]
        r_all = 1.0 + (sig * (~is_self[q_idx] & not_i)).sum(dim=1)
        r_pos = 1.0 + (sig * (pos[q_idx] & not_i)).sum(dim=1)
        ratio = r_pos / r_all

        if hardness_temperature is None:
            weights = 1.0 / pos.sum(dim=1).to(ratio.dtype)[q_idx]
        else:
            logits = (s_qi.detach() if detach_weights else s_qi) / hardness_temperature
            top = torch.full((n,), float("-inf"), dtype=logits.dtype, device=device)
            top = top.scatter_reduce(0, q_idx, logits.detach(), reduce="amax", include_self=True)
            e = torch.exp(logits - top[q_idx])
            denom = torch.zeros(n, dtype=e.dtype, device=device).index_add(0, q_idx, e)
            weights = e / denom[q_idx]
        ap = torch.zeros(n, dtype=ratio.dtype, device=device).index_add(0, q_idx, weights * ratio)

        has_pos = pos.any(dim=1)
        count = has_pos.sum().to(ratio.dtype)
        total = dist_utils.all_reduce_mean(count) * world if world > 1 else count
        # No anchor with a positive anywhere: the sum is an empty zero that still carries the graph (no branch,
        # so no host sync and every rank does the same thing).
        return world * ((1.0 - ap) * has_pos.to(ap.dtype)).sum() / total.detach().clamp(min=1.0)


class GroupingAPLoss(nn.Module):
    """Module form of :func:`grouping_ap_loss` (same arguments, fixed at construction)."""

    def __init__(
        self,
        temperature: float = 0.2,
        similarity: str = "cosine",
        hardness_temperature: float | None = 1.0,
        detach_weights: bool = True,
        gather_distributed: bool = True,
        global_ids: bool = False,
    ) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got '{similarity}'")
        self.temperature = temperature
        self.similarity = similarity
        self.hardness_temperature = hardness_temperature
        self.detach_weights = detach_weights
        self.gather_distributed = gather_distributed
        self.global_ids = global_ids

    def forward(self, embeddings: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Loss of ``embeddings`` grouped by ``groups``."""
        return grouping_ap_loss(
            embeddings,
            groups,
            temperature=self.temperature,
            similarity=self.similarity,
            hardness_temperature=self.hardness_temperature,
            detach_weights=self.detach_weights,
            gather_distributed=self.gather_distributed,
            global_ids=self.global_ids,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, similarity={self.similarity}, "
                f"hardness_temperature={self.hardness_temperature}, detach_weights={self.detach_weights}")
