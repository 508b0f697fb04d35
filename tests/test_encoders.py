"""medssl.encoders: every encoder source read in one place; devices checked against the machine."""

from __future__ import annotations

import pytest
import torch
import yaml

import medssl.encoders as encoders
from medssl.encoders import (
    data_config,
    load_encoder,
    random_encoder,
    resolve_device,
    run_config,
    run_encoder_file,
    run_encoder_files,
    run_encoders,
    select_encoders,
)
from medssl.errors import CheckpointError, ConfigError
from medssl.export import save_encoder

META = {"model_name": "resnet18", "in_chans": 1, "image_size": 16, "stem": "default", "spatial_dims": 2}


def _save(path, seed=0):
    enc = random_encoder("resnet18", in_chans=1, image_size=16, seed=seed)
    save_encoder(enc.backbone, path, META)
    return enc


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device tpu9: not a device name"):
        resolve_device("tpu9")
    with pytest.raises(ConfigError, match="--device meta: medssl runs on cpu, cuda"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_run_discovery_and_selection(tmp_path):
    run = tmp_path / "cass"
    run.mkdir()
    for name in ("encoder_cnn.safetensors", "encoder_vit.safetensors", "whitening_cnn.safetensors"):
        (run / name).write_bytes(b"")
    files = run_encoder_files(run)
    assert files == {"cnn": run / "encoder_cnn.safetensors", "vit": run / "encoder_vit.safetensors"}
    assert run_encoder_file(run, "vit") == run / "encoder_vit.safetensors"
    with pytest.raises(ConfigError, match="several encoders \\(cnn, vit\\)"):
        run_encoder_file(run)
    with pytest.raises(ConfigError, match="--encoder mlp: run .* has no encoder 'mlp' \\(has: cnn, vit\\)"):
        run_encoder_file(run, "mlp")
    assert select_encoders(["cnn", "vit"], "both", "x") == select_encoders(["cnn", "vit"], None, "x") == ["cnn", "vit"]
    with pytest.raises(CheckpointError, match="no encoder\\*.safetensors"):
        run_encoder_files(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        run_encoder_files(tmp_path / "missing")


def test_run_encoders_label_and_weights(tmp_path):
    run = tmp_path / "moco"
    run.mkdir()
    ref = _save(run / "encoder.safetensors", seed=3)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "mocov2"}}))
    (found, cfg) = run_encoders(run)
    assert [n for n, _ in found] == ["mocov2"] and cfg == {"method": {"name": "mocov2"}}
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(found[0][1](x), ref(x))
    assert run_encoders(run, "backbone")[0][0][0] == "mocov2"
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(CheckpointError, match="config.yaml: expected a mapping"):
        run_config(run)


def test_data_config_keeps_the_runs_intensity_and_cache_only():
    run_cfg = {"data": {"spec": "npz:x.npz", "image_size": 32, "task": "other", "cache": False,
                        "intensity": {"mode": "percentile"}, "num_workers": 4}}
    dcfg = data_config("phantom2d", run_cfg, task="margin")
    assert (dcfg.spec, dcfg.image_size, dcfg.task, dcfg.cache, dcfg.num_workers) == ("phantom2d", 32, "margin",
                                                                                      False, 0)
    assert dcfg.intensity.mode == "percentile" and dcfg.splits is None
    assert data_config("phantom2d", run_cfg, image_size=16, splits="s.csv").image_size == 16
    assert data_config("phantom2d").image_size is None


def test_unreadable_encoder_files_are_one_error(tmp_path):
    good = tmp_path / "good.safetensors"
    _save(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_encoder(cut)
    whitened = tmp_path / "w" / "encoder.safetensors"
    whitened.parent.mkdir()
    enc = random_encoder("resnet18", in_chans=1, image_size=16)
    save_encoder(enc.backbone, whitened, {**META, "whitening": "whitening.safetensors"})
    (whitened.parent / "whitening.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="whitening.safetensors: cannot be read"):
        load_encoder(whitened)


def test_checkpoint_without_config_and_other_suffixes(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    torch.save({"step": 1, "model": {}}, ckpt)
    with pytest.raises(CheckpointError, match="x.ckpt: has no 'config' entry"):
        encoders.checkpoint_encoders(ckpt)
    torch.save({"step": 1, "model": {}, "config": {"method": {"name": "nosuch"}}}, ckpt)
    with pytest.raises(CheckpointError, match="x.ckpt: its config is not valid: .*nosuch"):
        encoders.checkpoint_encoders(ckpt)
    with pytest.raises(ConfigError, match="expected an encoder .safetensors or a training .ckpt"):
        encoders.checkpoint_encoders(tmp_path / "weights.pt")


def test_check_inits():
    # anything but random / imagenet names weights (a file, timm:NAME, hf-hub:ORG/NAME): foo is a missing file
    with pytest.raises(ConfigError, match="--init foo: file not found"):
        encoders.check_inits(["random", "foo"])
    assert encoders.check_inits(["random", "random"]) == ["random"]


def _last_bn_scales(encoder) -> set[float]:
    """The distinct initial scales of the last BatchNorm of every timm basic block (bn2) of a resnet18."""
    return {float(v) for name, p in encoder.backbone.named_parameters()
            if name.endswith("bn2.weight") and "layer" in name for v in p.detach().unique()}


@pytest.mark.parametrize(("model_cfg", "zero"), [
    ({"backbone": "resnet18", "zero_init_last": True}, True),  # a run built with timm's init
    ({"backbone": "resnet18", "zero_init_last": False}, False),  # a run with the default since issue 20
    ({"backbone": "resnet18"}, True),  # a run written before the key existed: it was built with timm's init
    ({}, False),  # no run: ModelConfig's default
])
def test_random_baseline_starts_as_the_compared_run_did(model_cfg, zero):
    from types import SimpleNamespace

    from medssl.config import ModelConfig

    assert ModelConfig().zero_init_last is False  # the "no run" row follows the default
    ds = SimpleNamespace(in_chans=1, image_size=16, spatial_dims=2)
    (label, enc), = encoders.init_encoders(["random"], ds, "resnet18", "default", model_cfg)[0]
    assert label == "random-init"
    assert _last_bn_scales(enc) == ({0.0} if zero else {1.0})


def test_random_baseline_refuses_an_edited_zero_init_last():
    from types import SimpleNamespace

    ds = SimpleNamespace(in_chans=1, image_size=16, spatial_dims=2)
    with pytest.raises(ConfigError, match="model.zero_init_last in the compared run's config: expected true/false"):
        encoders.init_encoders(["random"], ds, "resnet18", "default", {"backbone": "resnet18", "zero_init_last": 1})
