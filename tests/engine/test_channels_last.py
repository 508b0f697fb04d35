"""``train.channels_last`` changes the memory format only, and tensor logs reach metrics.csv as numbers."""

from __future__ import annotations

import csv

import pytest
import safetensors.torch as st
import torch

from medssl.api import pretrain

pytestmark = pytest.mark.slow


def _run(tmp_path, name: str, channels_last: bool):
    run = tmp_path / name
    pretrain("mocov2", "phantom2d:64", run, max_steps=3, batch_size=8, image_size=16, progress=False,
             overrides=["method.queue_size=32", "train.log_every_n_steps=1", "train.collapse_every_n_steps=0",
                        "train.deterministic=true", f"train.channels_last={str(channels_last).lower()}"])
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    # the checkpoint keeps the strides the run trained with
    conv = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["model"]["backbone.layer1.0.conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last != conv.is_contiguous()
    return st.load_file(str(run / "encoder.safetensors")), rows


def test_channels_last_trains_the_same_weights_and_logs(tmp_path):
    torch.set_num_threads(1)
    plain, rows_plain = _run(tmp_path, "plain", False)
    nhwc, rows_nhwc = _run(tmp_path, "nhwc", True)
    assert plain.keys() == nhwc.keys()
    for k in plain:
        assert nhwc[k].is_contiguous()
        torch.testing.assert_close(nhwc[k], plain[k], rtol=1e-4, atol=1e-5)
    assert len(rows_plain) == len(rows_nhwc) == 3
    for a, b in zip(rows_plain, rows_nhwc, strict=True):
        # mocov2 returns its logs as 0-dim tensors; the trainer writes them as plain numbers
        for key in ("loss", "pos_sim", "embedding_std"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-5)
        assert -1.0 <= float(a["pos_sim"]) <= 1.0
