"""``--init imagenet``: weights from a local file (no network), a clear skip offline, never a crash."""

from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import timm
import torch

import medssl.encoders as encoders
from medssl.api import evaluate
from medssl.encoders import IMAGENET_WEIGHTS_ENV, WeightsUnavailable, imagenet_encoder
from medssl.errors import CheckpointError


@pytest.fixture
def no_network(monkeypatch):
    """Every way timm could fetch weights fails as it does offline, and nothing is cached."""
    def refuse(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known (mocked)")

    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_state_dict_from_hf", refuse)
    monkeypatch.setattr(builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(encoders, "_cached_imagenet_file", lambda name: None)
    monkeypatch.delenv(IMAGENET_WEIGHTS_ENV, raising=False)


def _fake_imagenet_file(tmp_path, name="resnet18"):
    """A 3-channel, 1000-class checkpoint in timm's layout, standing in for downloaded ImageNet weights."""
    torch.manual_seed(123)
    ref = timm.create_model(name, num_classes=1000, in_chans=3)
    path = tmp_path / f"{name}_in1k.safetensors"
    st.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref.state_dict(), path


def test_local_weights_file_loads_and_adapts_one_channel(tmp_path, monkeypatch, no_network):
    ref, path = _fake_imagenet_file(tmp_path)
    monkeypatch.setenv(IMAGENET_WEIGHTS_ENV, str(path))
    enc = imagenet_encoder("resnet18", in_chans=1, image_size=32)
    got = enc.backbone.state_dict()
    # timm's in_chans=1 adaptation sums the RGB filters of the first convolution
    torch.testing.assert_close(got["conv1.weight"], ref["conv1.weight"].sum(dim=1, keepdim=True))
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias"):
        torch.testing.assert_close(got[key], ref[key])
    assert "fc.weight" not in got  # num_classes=0: pooled features out
    assert enc(torch.rand(2, 1, 32, 32)).shape == (2, 512)


def test_offline_without_cache_is_a_clear_skip(monkeypatch, no_network):
    monkeypatch.setattr(encoders, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(WeightsUnavailable, match="imagenet weights unavailable offline: resnet18 is not in the"):
        imagenet_encoder("resnet18", in_chans=1, image_size=32)


def test_download_failure_is_a_clear_skip(monkeypatch, no_network):
    monkeypatch.setattr(encoders, "_hub_reachable", lambda *a, **k: True)  # the download itself then fails
    with pytest.raises(WeightsUnavailable, match="imagenet weights unavailable offline: OSError: .*mocked"):
        imagenet_encoder("resnet18", in_chans=1, image_size=32)


def test_missing_weights_file_names_it(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv(IMAGENET_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match=r"\$MEDSSL_IMAGENET_WEIGHTS .*nope.pth: not found"):
        imagenet_encoder("resnet18", in_chans=1, image_size=32)


def test_evaluate_skips_imagenet_offline_and_keeps_random(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setattr(encoders, "_hub_reachable", lambda *a, **k: False)
    res = evaluate("phantom2d:80", tmp_path / "ev", init=["random", "imagenet"], image_size=16, backbone="resnet18",
                   protocol="knn", label_fractions=[1.0], seeds=[0], progress=False, device="cpu")
    assert {r["encoder"] for r in res["rows"]} == {"random-init"}
    meta = json.loads((tmp_path / "ev" / "results.json").read_text())["meta"]
    assert meta["skipped"].startswith("imagenet-init: imagenet weights unavailable offline:")
    assert meta["skipped"].endswith("; skipped")
    assert "imagenet weights unavailable offline" in (tmp_path / "ev" / "results.md").read_text()


def test_evaluate_uses_imagenet_weights_from_env(tmp_path, monkeypatch, no_network):
    _, path = _fake_imagenet_file(tmp_path)
    monkeypatch.setenv(IMAGENET_WEIGHTS_ENV, str(path))
    res = evaluate("phantom2d:80", tmp_path / "ev", init="imagenet", image_size=16, backbone="resnet18",
                   protocol="knn", label_fractions=[1.0], seeds=[0], progress=False, device="cpu")
    assert {r["encoder"] for r in res["rows"]} == {"imagenet-init"}
