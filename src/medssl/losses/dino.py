"""DINO's self-distillation loss and its centre (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021).

The teacher's outputs of the two global crops are centred and sharpened, the student's outputs of every crop
are softened with its own temperature, and each student crop learns the teacher distribution of every *other*
global crop::

    P_t(i) = softmax((g_t(x_i) − c) / τ_t)          i ∈ global crops
    log P_s(v) = log_softmax(g_s(x_v) / τ_s)         v ∈ all crops
    L = 1/|pairs| · Σ_{i} Σ_{v ≠ i} mean_batch( − Σ_k P_t(i)_k · log P_s(v)_k )

The centre ``c`` is an EMA of the teacher's mean output over the **global** batch::

    c ← m · c + (1 − m) · mean_{all ranks, global crops} g_t(x)

(:func:`batch_center` averages over ranks with an all-reduce of sums and counts, so it equals the
single-process mean of the global batch). Centring prevents one dimension from dominating, sharpening prevents
the uniform collapse; together they avoid collapse without negatives.

The loss is computed in fp32 even under autocast (``exp`` / ``log`` of logits / 0.04 overflow bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medssl import distributed as dist_utils

__all__ = ["batch_center", "dino_loss", "teacher_probs"]


def teacher_probs(teacher_out: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Centred, sharpened teacher distributions ``softmax((t − c) / τ_t)`` (no gradient)."""
    with torch.autocast(device_type=teacher_out.device.type, enabled=False):
        return F.softmax((teacher_out.detach().float() - center.float()) / temperature, dim=-1)


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, *,
              num_global: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO's cross-entropy between the teacher's global crops and the student's other crops (module docstring).

    Args:
        student_out: ``(V · B, K)`` student logits of every crop, crop-major (the ``num_global`` global crops
            first, then the local ones), each crop a block of ``B`` rows.
        teacher_out: ``(G · B, K)`` teacher logits of the global crops, in the same order (no gradient taken).
        center: ``(K,)`` or ``(1, K)`` the current centre.
        num_global: ``G``, the global crops (2 in DINO).
        student_temp: τ_s (0.1).
        teacher_temp: τ_t (0.04 → 0.07 after its warm-up in DINO).

    Returns:
        The scalar loss, averaged over the crop pairs and this rank's batch.

    Raises:
        ValueError: outputs that do not split into whole crops.
    """
    g = int(num_global)
    if teacher_out.shape[0] % g or student_out.shape[0] % (teacher_out.shape[0] // g):
        raise ValueError(f"{teacher_out.shape[0]} teacher rows and {student_out.shape[0]} student rows do not "
                         f"split into {g} global crops of one batch")
    b = teacher_out.shape[0] // g
    views = student_out.shape[0] // b
    t = teacher_probs(teacher_out, center, teacher_temp).chunk(g)
    with torch.autocast(device_type=student_out.device.type, enabled=False):
        s = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(views)
        total = student_out.new_zeros((), dtype=torch.float32)
        pairs = 0
        for i, ti in enumerate(t):
            for v, sv in enumerate(s):
                if v == i:
                    continue
                total = total + (-(ti * sv).sum(dim=-1)).mean()
                pairs += 1
    return total / max(pairs, 1)


@torch.no_grad()
def batch_center(teacher_out: torch.Tensor) -> torch.Tensor:
    """The mean teacher output over the global batch (all ranks, all global crops), ``(1, K)`` fp32.

    Sums and counts are averaged over ranks and divided, so ranks with different batch sizes still give the
    mean of the concatenated batch, as one process would compute it.
    """
    x = teacher_out.detach().float()
    total = x.sum(dim=0, keepdim=True)
    count = torch.tensor([float(x.shape[0])], device=x.device)
    total, count = dist_utils.all_reduce_mean(total), dist_utils.all_reduce_mean(count)
    return total / count
