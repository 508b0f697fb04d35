"""MoCo v2's queue never offers a query an older key of its own image as a negative (issue 15, item 5).

The queue stores the dataset index of each key; InfoNCE masks queue entries with the query's index. Reference:
the formula written out by hand over the negatives that remain; and, on a real MoCo v2 step, replacing the
queue entries of the batch's own images by anything at all must leave the loss unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.config import build_config
from medssl.losses import info_nce
from medssl.methods import DataInfo, build_method
from medssl.methods import mocov2 as mocov2_module


def _hand(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, qids: list[int], kids: list[int], tau: float):
    total = 0.0
    for i in range(q.shape[0]):
        qi, ki = F.normalize(q[i], dim=0), F.normalize(k[i], dim=0)
        pos = torch.exp(qi @ ki / tau)
        den = pos + sum(torch.exp(qi @ queue[j] / tau) for j in range(queue.shape[0]) if kids[j] != qids[i])
        total = total - torch.log(pos / den)
    return total / q.shape[0]


def test_info_nce_leaves_same_index_queue_entries_out():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    queue = F.normalize(torch.randn(9, 8, generator=g), dim=1)
    qids = [3, 7, 11, 7]
    kids = [7, -1, 3, 5, 11, 7, 2, -1, 9]
    ours = info_nce(q, k, temperature=0.2, queue=queue, query_ids=torch.tensor(qids), queue_ids=torch.tensor(kids))
    assert torch.allclose(ours, _hand(q, k, queue, qids, kids, 0.2), atol=1e-5)
    assert not torch.allclose(ours, info_nce(q, k, temperature=0.2, queue=queue), atol=1e-4)
    # a query whose every queue entry is its own image: only the positive remains, loss 0, no NaN
    one = info_nce(q[:1], k[:1], queue=queue[:2], query_ids=torch.tensor([5]), queue_ids=torch.tensor([5, 5]))
    assert torch.isfinite(one) and float(one) == 0.0


def _mocov2(symmetric: bool):
    cfg = build_config({"method": {"name": "mocov2", "queue_size": 16, "symmetric": symmetric, "proj_hidden": 32,
                                   "proj_dim": 16},
                        "model": {"backbone": "resnet18", "stem": "cifar"}, "data": {"image_size": 16}})
    torch.manual_seed(0)
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=16, num_samples=16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_no_logit_pairs_a_query_with_its_own_images_key(monkeypatch, symmetric):
    model = _mocov2(symmetric)
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([0, 5, 9, 2, 14, 7])
    # fill the queue with the keys of these very images (the state the sampler reaches within an epoch)
    for _ in range(3):
        model.training_step({"image": images, "index": index}).loss.backward()
        model.after_optimizer_step(0, 10)
    assert set(model.queue_ids.tolist()) >= set(index.tolist())
    real = mocov2_module.info_nce
    seen = []

    def spy(q, k, *, queue, **kw):
        loss = real(q, k, queue=queue, **kw)
        # per query: make its own image's queue rows the query itself (logit 1/τ, the strongest negative there
        # can be) and check that query's loss does not move
        for i in range(q.shape[0]):
            rows = model.queue_ids == index[i % index.shape[0]]
            assert rows.any()
            forged = queue.clone()
            forged[rows] = F.normalize(q[i].detach().float(), dim=0)
            kw_i = dict(kw)
            if kw.get("query_ids") is not None:
                kw_i["query_ids"] = kw["query_ids"][i : i + 1]
            before = real(q[i : i + 1], k[i : i + 1], queue=queue, **kw_i)
            after = real(q[i : i + 1], k[i : i + 1], queue=forged, **kw_i)
            assert torch.allclose(after, before, atol=1e-6), (i, float(before), float(after))
        seen.append(True)
        return loss

    monkeypatch.setattr(mocov2_module, "info_nce", spy)
    model.training_step({"image": images, "index": index})
    assert seen


def test_queue_without_indices_still_trains():
    model = _mocov2(True)
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    out = model.training_step({"image": images})
    out.loss.backward()
    model.after_optimizer_step(0, 10)
    assert torch.isfinite(out.loss) and int((model.queue_ids == -1).sum()) == 16


def test_old_checkpoints_without_queue_ids_load():
    model = _mocov2(True)
    state = {k: v for k, v in model.state_dict().items() if k != "queue_ids"}
    model.queue_ids.fill_(3)
    model.load_state_dict(state, strict=True)
    assert bool((model.queue_ids == -1).all())
