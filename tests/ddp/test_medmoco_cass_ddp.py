"""2-process gloo runs of whole Med-MoCo and CASS steps equal one process on the global batch.

Med-MoCo's whitening statistics are all-gathered (``whitening_gather``) and its keys enter the queue gathered
from every rank; CASS's loss is per sample. In both, loss, every parameter gradient (averaged as DDP does) and
the queue must be those of one process seeing the whole batch. BatchNorm layers run on running statistics
(eval) so a rank's forward does not depend on the other rank's images through them — medssl does not sync
BatchNorm, which is a per-rank statistic by design, as in the papers' code. Med-MoCo's local term is left out
here: its negatives are the regions on the same rank (documented in medssl.losses.local_infonce).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl import distributed as dist_utils
from tests.ddp.test_gather_infonce_ddp import _free_port

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

WORLD = 2
PER_RANK = 3
SIZE = 32
PLAIN_VIEWS = {"intensity_p": 0.0, "blur_p": 0.0, "flip_p": 0.0, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0]}


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(WORLD * PER_RANK, 1, SIZE, SIZE, generator=g)


def _method(name: str):
    from medssl.config import build_config
    from medssl.methods import DataInfo, build_method

    if name == "medmoco":
        method_cfg = {"name": "medmoco", "local_weight": 0.0, "whitening": "zca", "whitening_group_size": 8,
                      "whitening_gather": True, "queue_size": 16, "proj_hidden": 32, "proj_dim": 16}
    else:
        method_cfg = {"name": "cass", "vit_backbone": "vit_tiny_patch16_224", "head": "mlp", "mlp_hidden": 32,
                      "embed_dim": 16}
    cfg = build_config({"method": method_cfg, "model": {"backbone": "resnet18"}, "views": PLAIN_VIEWS})
    torch.manual_seed(0)
    method = build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=SIZE, num_samples=32))
    method.train()
    for m in method.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return method


def _step(name: str, images: torch.Tensor) -> dict:
    method = _method(name)
    out = method.training_step({"image": images, "index": torch.arange(images.shape[0])})
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
    result = {"loss": out.loss.detach(), "grads": grads}
    if name == "medmoco":
        method.after_optimizer_step(1, 10)
        result["queue"] = method.queue.clone()
        result["queue_ptr"] = int(method.queue_ptr)
        result["running_cov"] = method.whitening.running_cov.clone()
    return result


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        images = _images()[rank * PER_RANK:(rank + 1) * PER_RANK]
        results = {}
        for name in ("medmoco", "cass"):
            r = _step(name, images)
            r["loss"] = dist_utils.all_reduce_mean(r["loss"])
            for g in r["grads"].values():  # what DDP's gradient averaging does
                dist.all_reduce(g)
                g /= WORLD
            results[name] = r
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_medmoco_and_cass_steps_equal_one_process():
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
        results = dict(out)
    images = _images()
    for name in ("medmoco", "cass"):
        ref = _step(name, images)
        assert len(ref["grads"]) > 10
        for rank in range(WORLD):
            got = results[rank][name]
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
            assert got["grads"].keys() == ref["grads"].keys()
            for key, g in ref["grads"].items():
                torch.testing.assert_close(got["grads"][key], g, rtol=1e-4, atol=1e-6, msg=f"{name} {key} rank {rank}")
            if name == "medmoco":
                assert torch.equal(got["queue"], ref["queue"])  # gathered keys, same order as one process
                # symmetric loss: the first view's keys enter
                assert got["queue_ptr"] == ref["queue_ptr"] == WORLD * PER_RANK
                torch.testing.assert_close(got["running_cov"], ref["running_cov"])
