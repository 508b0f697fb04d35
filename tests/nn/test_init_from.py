"""Starting a backbone from existing weights (model.init_from / --init): local files, timm / hf-hub names from the
cache (mocked: this machine is offline), input-channel adaptation, 2D->3D inflation, hostile files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch as st
import timm
import torch

from medssl.cli import main
from medssl.errors import CheckpointError, ConfigError
from medssl.nn import init_from
from medssl.nn.backbones import build_backbone
from medssl.nn.init_from import adapt_in_chans, inflate_2d_to_3d, load_init_weights, resolve_init_source


def _timm_resnet(in_chans: int = 3, seed: int = 0, num_classes: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model("resnet18", num_classes=num_classes, in_chans=in_chans).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a forgotten buffer would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_a_saved_timm_model_loads_and_gives_identical_features(fmt: str, tmp_path: Path) -> None:
    ref = _timm_resnet()
    state = ref.state_dict()  # with its 7-class head, which the backbone drops
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        st.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pth":
        torch.save(state, path)
    else:  # a training checkpoint: {"state_dict": {"module.<key>": ...}, "epoch": 3}
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    model = build_backbone("resnet18", in_chans=3, image_size=32, init_from=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), _features(ref, x), rtol=0, atol=0)


def test_a_medssl_encoder_file_starts_continued_pretraining(tmp_path: Path) -> None:
    from medssl.api import make_config
    from medssl.export import save_encoder
    from medssl.methods import DataInfo, build_method

    torch.manual_seed(1)
    src = build_backbone("resnet18", in_chans=1, image_size=32)
    path = tmp_path / "encoder.safetensors"
    save_encoder(src, path, {"model_name": "resnet18", "in_chans": "1"})
    cfg = make_config(method="mocov2", data="phantom2d", image_size=32,
                      overrides=["method.queue_size=8", f"model.init_from={path}"])
    info = DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=16)
    method = build_method(cfg, info)
    for name, tensor in src.state_dict().items():  # the query encoder and its momentum copy both start there
        assert torch.equal(method.backbone.state_dict()[name], tensor), name
        assert torch.equal(method.key_backbone.state_dict()[name], tensor), name
    path.unlink()  # a resumed run / a checkpoint rebuild does not read the initial weights again
    build_method(cfg, info, init_weights=False)
    with pytest.raises(ConfigError, match="file not found"):
        build_method(cfg, info)


def test_rgb_filters_become_one_channel_by_the_documented_rule(tmp_path: Path) -> None:
    ref = _timm_resnet(in_chans=3)
    torch.save(ref.state_dict(), tmp_path / "rgb.pth")
    w = ref.conv1.weight.detach()
    x = torch.rand(2, 1, 32, 32)
    summed = build_backbone("resnet18", in_chans=1, init_from=str(tmp_path / "rgb.pth")).eval()
    # sum rule (timm's adapt_input_conv): w'[:, 0] = w[:, 0] + w[:, 1] + w[:, 2] ...
    torch.testing.assert_close(summed.conv1.weight[:, 0], w[:, 0] + w[:, 1] + w[:, 2])
    # ... so a grey image gives the RGB network's features of that image replicated to three channels
    torch.testing.assert_close(summed(x), _features(ref, x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    mean = build_backbone("resnet18", in_chans=1, init_from=str(tmp_path / "rgb.pth"), init_adapt="mean").eval()
    torch.testing.assert_close(mean.conv1.weight[:, 0], (w[:, 0] + w[:, 1] + w[:, 2]) / 3)
    torch.testing.assert_close(mean(x), _features(ref, (x / 3).repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    # other counts: filters tiled over the channels, scaled by 3 / C
    two = adapt_in_chans(w, 2)
    torch.testing.assert_close(two, w[:, :2] * 1.5)
    five = adapt_in_chans(w, 5)
    torch.testing.assert_close(five, torch.cat([w, w[:, :2]], dim=1) * 0.6)
    assert adapt_in_chans(w, 3) is w
    with pytest.raises(ConfigError, match="init_adapt"):
        adapt_in_chans(w, 1, "median")


def test_the_timm_adapt_input_conv_rule_is_the_sum_rule() -> None:
    from timm.models import adapt_input_conv

    w = torch.randn(8, 3, 7, 7)
    torch.testing.assert_close(adapt_in_chans(w, 1), adapt_input_conv(1, w))
    torch.testing.assert_close(adapt_in_chans(w, 5), adapt_input_conv(5, w))


def test_vit_position_embeddings_are_resampled_to_the_image(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64, in_chans=3)
    st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model = build_backbone("vit_tiny_patch16_224", in_chans=1, image_size=32,
                           init_from=str(tmp_path / "vit.safetensors"))
    assert model.pos_embed.shape == (1, 1 + 4, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], src.pos_embed[:, 0])  # class token position kept
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.patch_embed.proj.weight[:, 0], src.patch_embed.proj.weight.sum(1))


def test_2d_weights_inflate_into_a_3d_resnet_only_when_asked(tmp_path: Path) -> None:
    ref = _timm_resnet(in_chans=1)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="init_inflate"):
        build_backbone("resnet18_3d", in_chans=1, spatial_dims=3, init_from=str(tmp_path / "r18.pth"))
    model = build_backbone("resnet18_3d", in_chans=1, spatial_dims=3, init_from=str(tmp_path / "r18.pth"),
                           init_inflate=True)
    w2, w3 = ref.layer1[0].conv1.weight.detach(), model.layer1[0].conv1.weight.detach()
    t = w3.shape[2]
    for d in range(t):  # I3D: each depth slice is the 2D kernel / depth
        torch.testing.assert_close(w3[:, :, d], w2 / t)
    torch.testing.assert_close(inflate_2d_to_3d(w2, 3).sum(2), w2)
    torch.testing.assert_close(model.bn1.running_var, ref.bn1.running_var)


def test_network_sources_come_from_the_cache_or_fail_offline(tmp_path: Path, monkeypatch) -> None:
    ref = _timm_resnet()
    cached = tmp_path / "model.safetensors"
    st.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(cached))
    asked: list[tuple[str, list[str]]] = []

    def fake_cache(repo: str, names: list[str]) -> str | None:
        asked.append((repo, names))
        return str(cached) if repo in ("timm/resnet18.a1_in1k", "acme/r18") else None

    monkeypatch.setattr(init_from, "_cached", fake_cache)
    assert resolve_init_source("timm:resnet18.a1_in1k") == cached
    assert asked[-1][0] == "timm/resnet18.a1_in1k"
    model = build_backbone("resnet18", in_chans=3, init_from="hf-hub:acme/r18").eval()
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(model(x), _features(ref, x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache.*offline"):
        resolve_init_source("hf-hub:acme/missing")
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve_init_source("timm:resnet50.a1_in1k")
    for bad, needle in [("timm:nosuchnet", "not a timm model"), ("hf-hub:justone", "hf-hub:ORG/NAME"),
                        ("https://x.org/w.pth", "not fetched"), ("  ", "empty")]:
        with pytest.raises(ConfigError, match=needle):
            resolve_init_source(bad)


class _Planted:  # a pickle that would run code: reconstructed through a global
    def __reduce__(self):
        return (print, ("pwned",))


def test_hostile_weights_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_init_weights(torch.nn.Linear(2, 2), str(tmp_path / "none.pth"))
    with pytest.raises(ConfigError, match="not a file"):
        load_init_weights(torch.nn.Linear(2, 2), str(tmp_path))
    planted = tmp_path / "planted.pth"
    planted.write_bytes(pickle.dumps({"conv1.weight": _Planted()}))
    with pytest.raises(CheckpointError, match="refused"):
        build_backbone("resnet18", in_chans=1, init_from=str(planted))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        build_backbone("resnet18", in_chans=1, init_from=str(garbage))
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict|no tensors"):
        build_backbone("resnet18", in_chans=1, init_from=str(tmp_path / "empty.pth"))
    torch.save(_timm_resnet().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="another architecture"):
        build_backbone("resnet34", in_chans=1, init_from=str(tmp_path / "r18.pth"))
    state = _timm_resnet().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="shape mismatch for 'layer1.0.conv1.weight'"):
        build_backbone("resnet18", in_chans=1, init_from=str(tmp_path / "shape.pth"))


@pytest.mark.parametrize(("value", "needle"), [
    ("{tmp}/missing.safetensors", "missing.safetensors: file not found"),
    ("hf-hub:medssl-none/none", "not in the local Hugging Face cache"),
    ("{tmp}/planted.pth", "refused"),
])
def test_pretrain_with_a_bad_init_from_exits_2_with_one_line(value: str, needle: str, tmp_path: Path,
                                                              capsys) -> None:
    (tmp_path / "planted.pth").write_bytes(pickle.dumps({"conv1.weight": _Planted()}))
    value, needle = value.replace("{tmp}", str(tmp_path)), needle.replace("{tmp}", str(tmp_path))
    argv = ["pretrain", "--method", "mocov2", "--data", "phantom2d:16", "--image-size", "32", "--batch-size", "4",
            "--max-steps", "1", "--set", f"model.init_from={value}", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.startswith("medssl: error:")
    assert len(err.strip().splitlines()) == 1


def test_evaluate_init_accepts_weights_and_refuses_hostile_ones(tmp_path: Path, capsys) -> None:
    from medssl.encoders import check_inits, init_label

    torch.save(_timm_resnet(in_chans=3).state_dict(), tmp_path / "r18.pth")
    assert check_inits(["random", str(tmp_path / "r18.pth"), "random"]) == ["random", str(tmp_path / "r18.pth")]
    assert init_label(str(tmp_path / "r18.pth")) == "init:r18.pth" and init_label("random") == "random-init"
    for bad, needle in [(str(tmp_path / "nope.pth"), "nope.pth: file not found"),
                        ("timm:resnet18.a1_in1k", "not in the local Hugging Face cache")]:
        assert main(["evaluate", "--init", bad, "--data", "phantom2d:16", "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


def test_init_settings_are_validated_in_the_config() -> None:
    from medssl.api import make_config

    with pytest.raises(ConfigError, match="model.init_adapt"):
        make_config(method="mocov2", overrides=["model.init_adapt=median"])
    with pytest.raises(ConfigError, match="model.init_from"):
        make_config(method="mocov2", overrides=["model.init_from=' '"])
    with pytest.raises(ConfigError, match="model.init_inflate"):
        make_config(method="mocov2", overrides=["model.init_inflate=maybe"])
    cfg = make_config(method="mocov2", overrides=["model.init_from=timm:resnet18.a1_in1k"])
    assert cfg.to_dict()["model"]["init_from"] == "timm:resnet18.a1_in1k"  # recorded in config.yaml
