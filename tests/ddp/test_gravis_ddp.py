"""2-process gloo runs: the GraVIS grouping loss and a GraVIS step equal a single-process run on the global batch.

The step runs in **training mode**: BatchNorm takes its statistics over the views of both ranks (``sync_bn``), as
one process does over the global batch; with per-rank statistics (``sync_bn: false``) the step differs (checked).

Ranks hold different numbers of views (a short last batch) and one image has views on both ranks (the batch
sampler repeats an image when a last batch is smaller than the world size): loss and gradients must still be
those of one process seeing everything.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl import distributed as dist_utils
from medssl.losses.grouping_ap import grouping_ap_loss
from tests.ddp.test_gather_infonce_ddp import _free_port

pytestmark = pytest.mark.ddp

WORLD = 2
DIM = 6
# Global batch: image ids of every view, split unevenly between the ranks (12 views and 8 views).
# Image 3 has views on both ranks; image 8 is a singleton (no positives).
GROUPS = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 8, 4, 5, 3, 6, 4, 5, 6, 3]
SPLIT = [slice(0, 12), slice(12, 20)]
LOSS_KW = {"temperature": 0.2, "hardness_temperature": 0.5}
# GraVIS step: images per rank (uneven), dataset indices, K views each.
STEP_INDEX = [torch.tensor([11, 4, 27]), torch.tensor([8, 11])]  # image 11 sits on both ranks
PLAIN_VIEWS = {"intensity_p": 0.0, "blur_p": 0.0, "flip_p": 0.0, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0]}


def _global_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(321)
    w = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)  # a shared "network": embeddings = x @ w
    x = torch.randn(len(GROUPS), DIM, generator=g, dtype=torch.float64)
    return w, x


def _images() -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = sorted({int(i) for t in STEP_INDEX for i in t})
    return {i: torch.rand(1, 16, 16, generator=g) for i in ids}


def _gravis(sync_bn: bool = True):
    from medssl.config import build_config
    from medssl.methods import DataInfo, build_method

    cfg = build_config({"method": {"name": "gravis", "num_views": 3, "proj_hidden": 16, "proj_dim": 8,
                                   "sync_bn": sync_bn},
                        "model": {"backbone": "resnet18"}, "views": PLAIN_VIEWS})
    torch.manual_seed(0)
    # training mode: BatchNorm uses batch statistics, which must span both ranks' views
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=16, num_samples=32)).train()


def _grad_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.projector.parameters()])


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        w, x = _global_data()
        sl = SPLIT[rank]
        groups = torch.tensor(GROUPS[sl])
        results = {}
        # ids unique across ranks (dataset indices): image 3's views on both ranks form one group
        w1 = w.clone().requires_grad_(True)
        loss = grouping_ap_loss(x[sl] @ w1, groups, global_ids=True, **LOSS_KW)
        loss.backward()
        grad = w1.grad.clone()
        dist.all_reduce(grad)
        results["global"] = (float(dist_utils.all_reduce_mean(loss.detach())), grad / WORLD)  # DDP averages
        # ids only unique within a rank: made global as id * world + rank
        w2 = w.clone().requires_grad_(True)
        loss = grouping_ap_loss(x[sl] @ w2, groups, global_ids=False, **LOSS_KW)
        loss.backward()
        grad = w2.grad.clone()
        dist.all_reduce(grad)
        results["local"] = (float(dist_utils.all_reduce_mean(loss.detach())), grad / WORLD)
        # a whole GraVIS step in training mode, groups from batch["index"]; then the same with per-rank BatchNorm
        imgs = _images()
        index = STEP_INDEX[rank]
        for key, sync in (("step", True), ("step_local_bn", False)):
            method = _gravis(sync)
            step = method.training_step({"image": torch.stack([imgs[int(i)] for i in index]), "index": index})
            step.loss.backward()
            grad = _grad_of(method)
            dist.all_reduce(grad)
            results[key] = (float(dist_utils.all_reduce_mean(step.loss.detach())), grad / WORLD)
            results[key + "_running_var"] = method.backbone.bn1.running_var.clone()
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process():
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
        results = dict(out)
    w, x = _global_data()
    refs = {}
    w1 = w.clone().requires_grad_(True)
    loss = grouping_ap_loss(x @ w1, torch.tensor(GROUPS), gather_distributed=False, **LOSS_KW)
    loss.backward()
    refs["global"] = (float(loss.detach()), w1.grad)
    w2 = w.clone().requires_grad_(True)
    rank_of = [0] * 12 + [1] * 8
    local_ids = torch.tensor([g * WORLD + r for g, r in zip(GROUPS, rank_of, strict=True)])
    loss = grouping_ap_loss(x @ w2, local_ids, gather_distributed=False, **LOSS_KW)
    loss.backward()
    refs["local"] = (float(loss.detach()), w2.grad)
    assert abs(refs["local"][0] - refs["global"][0]) > 1e-4  # the two scenarios really differ (image 3)
    method = _gravis()
    imgs = _images()
    index = torch.cat(STEP_INDEX)
    # one process, the global batch: rank 0's images then rank 1's (the gathered order)
    step = method.training_step({"image": torch.stack([imgs[int(i)] for i in index]), "index": index})
    step.loss.backward()
    refs["step"] = (float(step.loss.detach()), _grad_of(method))
    for rank in range(WORLD):
        # BatchNorm's running statistics too: those of one process over the global batch
        torch.testing.assert_close(results[rank]["step_running_var"], method.backbone.bn1.running_var)
        # control: per-rank BatchNorm statistics give another step (what the test guards against)
        loss, grad = results[rank]["step_local_bn"]
        step_loss, step_grad = refs["step"]
        grad_gap = float((grad - step_grad).abs().max()) / float(step_grad.abs().max())
        assert abs(loss - step_loss) > 1e-4 or grad_gap > 1e-3
        for key, (ref_loss, ref_grad) in refs.items():
            loss, grad = results[rank][key]
            assert abs(loss - ref_loss) < 1e-5, (rank, key, loss, ref_loss)
            # fp32 sums in another order (gathered vs one batch): agree to rounding, relative to the gradient's size
            d = float((grad.to(ref_grad.dtype) - ref_grad).abs().max())
            assert d < 1e-4 * float(ref_grad.abs().max()), (rank, key, d)
            assert grad.abs().sum() > 0
