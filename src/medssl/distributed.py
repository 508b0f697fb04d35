"""Small distributed helpers used by losses, methods and the engine.

They work unchanged in a single process (world size 1) and under any ``torch.distributed`` process group
that Lightning Fabric sets up (DDP on NCCL or gloo). A leaf module: it imports nothing of medssl, so any layer
(nn, losses, methods, engine, eval) may use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the gradient of its own slice.

    The gradient of the gathered tensor is summed over ranks first (every rank's loss depends on every
    slice), then each rank keeps its slice. Without this, gathered negatives carry no gradient and
    contrastive losses silently differ from the single-process loss on the same global batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n : (r + 1) * n]


def gather(x: torch.Tensor, *, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order). Identity in a single process.

    Args:
        x: a tensor with the same shape on every rank.
        with_grad: keep the autograd graph (gradient flows back to each rank's slice).
    """
    if not is_distributed():
        return x
    if with_grad and x.requires_grad:
        return _GatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (pickled), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (no gradient)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle a batch across ranks (MoCo's shuffle-BN) so BatchNorm statistics cannot leak the pairing.

    Returns this rank's slice of the globally permuted batch and the index that undoes the permutation
    (``None`` in a single process, where the call is the identity).
    """
    if not is_distributed():
        return x, None
    x_all = gather(x, with_grad=False)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    n = x.shape[0]
    r = rank()
    return x_all[perm[r * n : (r + 1) * n]], unshuffle


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on the outputs ``y`` (identity when ``unshuffle`` is None)."""
    if unshuffle is None:
        return y
    y_all = gather(y, with_grad=False)
    n = y.shape[0]
    r = rank()
    return y_all[unshuffle[r * n : (r + 1) * n]]
