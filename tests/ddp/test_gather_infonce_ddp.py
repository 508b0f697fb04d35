"""2-process gloo runs: gathered InfoNCE and the MoCo queue equal a single-process run on the global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl import distributed as dist_utils
from medssl.losses import info_nce

pytestmark = pytest.mark.ddp

WORLD = 2
N_PER_RANK = 4
DIM = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    w = torch.randn(DIM, DIM, generator=g)  # a shared "network": embeddings = x @ w
    x_q = torch.randn(WORLD * N_PER_RANK, DIM, generator=g)
    x_k = torch.randn(WORLD * N_PER_RANK, DIM, generator=g)
    return w, x_q, x_k


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        w, x_q, x_k = _global_data()
        sl = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        # in-batch negatives, keys carry gradient (SimCLR-style use of the same InfoNCE)
        w1 = w.clone().requires_grad_(True)
        loss = info_nce(x_q[sl] @ w1, x_k[sl] @ w1, temperature=0.3, gather_distributed=True)
        loss.backward()
        grad = w1.grad.clone()
        dist.all_reduce(grad)
        grad /= WORLD  # what DDP's gradient averaging does
        loss_mean = dist_utils.all_reduce_mean(loss.detach())
        # MoCo-style: enqueue gathered keys
        from medssl.methods.mocov2 import MoCoV2

        class _Q:  # bind MoCoV2.enqueue to a bare object with a queue
            queue = torch.zeros(12, DIM)
            queue_ptr = torch.zeros((), dtype=torch.long)
            queue_ids = torch.full((12,), -1, dtype=torch.long)
            queue_size = 12

        q = _Q()
        keys = x_k[sl]
        ids = torch.arange(x_k.shape[0])[sl] + 100  # dataset indices of this rank's images
        MoCoV2.enqueue(q, dist_utils.gather(keys, with_grad=False),  # type: ignore[arg-type]
                       dist_utils.gather(ids, with_grad=False))
        MoCoV2.enqueue(q, dist_utils.gather(keys * 2, with_grad=False),  # type: ignore[arg-type]
                       dist_utils.gather(ids + 50, with_grad=False))
        out[rank] = (float(loss_mean), grad, q.queue.clone(), int(q.queue_ptr), q.queue_ids.clone())
    finally:
        dist.destroy_process_group()


def test_two_process_loss_gradient_and_queue_equal_single_process():
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
        results = dict(out)
    w, x_q, x_k = _global_data()
    w1 = w.clone().requires_grad_(True)
    ref_loss = info_nce(x_q @ w1, x_k @ w1, temperature=0.3, gather_distributed=False)
    ref_loss.backward()
    from medssl.methods.mocov2 import MoCoV2

    class _Q:
        queue = torch.zeros(12, DIM)
        queue_ptr = torch.zeros((), dtype=torch.long)
        queue_ids = torch.full((12,), -1, dtype=torch.long)
        queue_size = 12

    q = _Q()
    ids = torch.arange(x_k.shape[0]) + 100
    MoCoV2.enqueue(q, x_k, ids)  # type: ignore[arg-type]
    MoCoV2.enqueue(q, x_k * 2, ids + 50)  # type: ignore[arg-type]
    for rank in range(WORLD):
        loss, grad, queue, ptr, queue_ids = results[rank]
        assert torch.equal(queue_ids, q.queue_ids)  # every rank holds every rank's dataset indices, in queue order
        assert abs(loss - float(ref_loss.detach())) < 1e-5
        assert torch.allclose(grad, w1.grad, atol=1e-5)
        assert torch.equal(queue, q.queue)
        assert ptr == int(q.queue_ptr)
