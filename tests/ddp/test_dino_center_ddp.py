"""2-process gloo run: DINO's centre update equals the single-process update on the global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl.losses.dino import batch_center

pytestmark = pytest.mark.ddp

WORLD = 2
SIZES = (3, 5)  # samples per rank: unequal, so a mean of per-rank means would be wrong
K = 6
MOMENTUM = 0.9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    teacher = [torch.randn(2 * n, K, generator=g) for n in SIZES]  # per rank: 2 global crops x n samples
    center0 = torch.randn(1, K, generator=g)
    return teacher, center0


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        teacher, center0 = _data()
        # what DINO.after_optimizer_step applies: c <- m c + (1 - m) batch_center(teacher outputs of this rank)
        out[rank] = center0 * MOMENTUM + batch_center(teacher[rank]) * (1 - MOMENTUM)
    finally:
        dist.destroy_process_group()


def test_two_process_centre_equals_single_process() -> None:
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
        results = dict(out)
    teacher, center0 = _data()
    everything = torch.cat(teacher)  # the global batch, as one process would see it
    ref_center = center0 * MOMENTUM + everything.mean(0, keepdim=True) * (1 - MOMENTUM)
    per_rank_means = torch.stack([t.mean(0) for t in teacher]).mean(0, keepdim=True)
    assert not torch.allclose(everything.mean(0, keepdim=True), per_rank_means)  # the test can tell them apart
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank], ref_center, rtol=1e-6, atol=1e-6)
