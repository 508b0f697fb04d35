"""2-process gloo runs on shards: every item is read exactly once per epoch across the ranks, with 0 or 2 loader
workers giving the same batches, and a mid-epoch start continues with exactly the remaining batches."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl.data.prepare import prepare

pytestmark = pytest.mark.ddp

WORLD = 2
N = 48  # data.split=all: 48 items = 6 global batches of 2 x 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _epochs(shards: str, workers: int, rank: int) -> dict:
    from medssl.api import make_config
    from medssl.data.specs import open_from_config
    from medssl.engine.loader import build_loader
    from medssl.methods import get_method

    cfg = make_config(method="mocov2", data=f"shards:{shards}", image_size=16, batch_size=4, max_steps=100,
                      overrides=["data.split=all", f"data.num_workers={workers}", "data.shuffle_buffer=6"])
    ds = open_from_config(cfg.data)
    fabric = SimpleNamespace(world_size=WORLD, global_rank=rank, device=torch.device("cpu"))
    data = build_loader(cfg, ds, get_method("mocov2").view_spec_for(cfg.method), fabric)
    out: dict = {"steps_per_epoch": data.steps_per_epoch, "epochs": []}
    for epoch in (0, 1):
        data.sampler.set_epoch(epoch)
        batches = []
        for batch in data.loader:
            idx = batch["index"].tolist()
            if not batches:  # the tensors are the item's
                assert all(torch.equal(batch["image"][j], ds[i]["image"]) for j, i in enumerate(idx))
            batches.append(idx)
        out["epochs"].append(batches)
    data.sampler.set_epoch(1, start_batch=2)  # what --resume does after step steps_per_epoch + 2
    out["resumed"] = [b["index"].tolist() for b in data.loader]
    return out


def _worker(rank: int, port: int, shards: str, results: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mine = {w: _epochs(shards, w, rank) for w in (0, 2)}
        gathered: list = [None] * WORLD
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            results.update({"ranks": gathered})
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_shards") / "p"
    prepare(f"phantom2d:{N}", out, image_size=16, workers=1, chunk_mb=0.006, progress=False)
    return out


def test_two_ranks_read_disjoint_parts_covering_each_epoch(shards: Path) -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), str(shards), results), nprocs=WORLD, join=True)
    ranks = results["ranks"]
    for workers in (0, 2):
        per_rank = [r[workers] for r in ranks]
        assert per_rank[0]["steps_per_epoch"] == N // (WORLD * 4)
        for epoch in (0, 1):
            seen = [i for r in per_rank for b in r["epochs"][epoch] for i in b]
            assert sorted(seen) == list(range(N))  # every item exactly once per epoch across the ranks
            assert all(len(r["epochs"][epoch]) == N // (WORLD * 4) for r in per_rank)  # ranks stay in step
        assert per_rank[0]["epochs"][0] != per_rank[0]["epochs"][1]  # reshuffled every epoch
        for r in per_rank:
            assert r["resumed"] == r["epochs"][1][2:]  # mid-epoch start: the remaining batches, nothing else
    for r in ranks:  # the order does not depend on the number of loader workers
        assert r[0]["epochs"] == r[2]["epochs"]
