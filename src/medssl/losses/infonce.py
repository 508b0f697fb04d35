"""InfoNCE, the one contrastive loss shared by MoCo v2 and Med-MoCo's global and local terms.

For L2-normalised queries ``q`` and their positive keys ``k⁺``::

    L = -log  exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_n exp(q·n/τ))

(Oord et al. 2018; He et al. 2020 "MoCo"; Chen et al. 2020 "MoCo v2"). Negatives ``n`` are a memory queue
when one is given (MoCo), otherwise the other keys of the (globally gathered) batch. With a queue, entries that
hold an older key of the query's own image (same dataset index: ``query_ids`` / ``queue_ids``) are left out of
the negatives: that key is a positive, not a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medssl import distributed as dist_utils


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float = 0.2,
    queue: torch.Tensor | None = None,
    gather_distributed: bool = True,
    normalize: bool = True,
    query_ids: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss of ``query[i]`` against its positive ``key[i]``.

    Args:
        query: (N, D) queries.
        key: (N, D) positive keys, row-aligned with ``query``.
        temperature: τ.
        queue: optional (K, D) negatives (already normalised). When given, negatives are the queue only
            (MoCo); otherwise the keys of all other samples in the batch, gathered across ranks when
            ``gather_distributed`` (so the loss equals the single-process loss on the global batch).
        gather_distributed: gather keys from every rank for in-batch negatives.
        normalize: L2-normalise ``query`` and ``key`` first.
        query_ids: optional (N,) dataset index of each query's image; with ``queue_ids``, queue entries of the
            same image are masked out of the negatives (their logit is ``-inf``).
        queue_ids: optional (K,) dataset index of the image each queue entry was computed from (negative for
            an entry that holds no image, e.g. the random initial queue).

    Returns:
        A scalar tensor: the mean over this rank's queries. Under DDP the gradient averaging across ranks
        then equals the gradient of the mean over the global batch.
    """
    if query.shape != key.shape or query.dim() != 2:
        raise ValueError(f"query and key must both be (N, D); got {tuple(query.shape)} and {tuple(key.shape)}")
    # Similarities in fp32 even under bf16 autocast: exp/log of logits / 0.2 overflow bf16's 8-bit mantissa. A
    # .float() alone is not enough: autocast would run the matmuls below in bf16 again.
    with torch.autocast(device_type=query.device.type, enabled=False):
        query = query.float()
        key = key.float()
        if normalize:
            query = F.normalize(query, dim=1)
            key = F.normalize(key, dim=1)
        if queue is not None:
            pos = (query * key).sum(dim=1, keepdim=True)
            neg = query @ queue.float().t()
            if query_ids is not None and queue_ids is not None:
                if query_ids.shape != (query.shape[0],) or queue_ids.shape != (queue.shape[0],):
                    raise ValueError(f"query_ids must be ({query.shape[0]},) and queue_ids ({queue.shape[0]},); got "
                                     f"{tuple(query_ids.shape)} and {tuple(queue_ids.shape)}")
                own = query_ids.to(queue_ids.device)[:, None] == queue_ids[None, :]
                neg = neg.masked_fill(own, float("-inf"))
            logits = torch.cat([pos, neg], dim=1) / temperature
            labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
            return F.cross_entropy(logits, labels)
        keys = dist_utils.gather(key) if gather_distributed else key
        offset = dist_utils.rank() * query.shape[0] if gather_distributed else 0
        logits = query @ keys.t() / temperature
        labels = torch.arange(query.shape[0], device=query.device) + offset
        return F.cross_entropy(logits, labels)
