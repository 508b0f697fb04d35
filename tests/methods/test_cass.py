"""CASS: the loss against its formula, gradients into both networks, two optimisers through the real trainer
(zero_grad between steps, per-set settings, checkpoint/resume), export of both encoders, evaluation of both."""

from __future__ import annotations

import csv
import math

import pytest
import safetensors.torch as st
import timm
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from medssl.api import evaluate, make_config, pretrain
from medssl.config import build_config
from medssl.engine.checkpoint import load_checkpoint
from medssl.errors import ConfigError
from medssl.methods import DataInfo, build_method
from medssl.methods.cass import CASS, cass_loss

SMALL = dict(data="phantom2d:64", image_size=32, batch_size=8, progress=False)
# timm's tiny test models (0.3 M parameters each) keep the trainer tests fast: checkpoints stay small
TINY = ["model.backbone=test_resnet", "method.vit_backbone=test_vit"]
# identity views: every step sees exactly the same images (up to their order in the batch)
PLAIN_VIEWS = ["views.intensity_p=0", "views.blur_p=0", "views.flip_p=0", "views.crop_scale=[1.0,1.0]",
               "views.crop_ratio=[1.0,1.0]"]


def _method(**method_kw) -> CASS:
    cfg = build_config({"method": {"name": "cass", **method_kw}, "model": {"backbone": "resnet18"}})
    torch.manual_seed(0)
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=64))


def _rows(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


# -- loss -------------------------------------------------------------------------------------------------------
def test_loss_matches_hand_written_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = 0.0
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        dot = sum(p * q for p, q in zip(x, y, strict=True))
        cos = dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y)))
        ref += (2 - 2 * cos) / 6
    loss = cass_loss(a, b)
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    loss.backward()
    # d/da (2 − 2 cos(a, b)) = −2 (b̂ − cos · â) / |a|, averaged over the batch; symmetric in b
    with torch.no_grad():
        na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
        ah, bh = a / na, b / nb
        cos = (ah * bh).sum(1, keepdim=True)
        assert torch.allclose(a.grad, -2 * (bh - cos * ah) / na / 6, atol=1e-10)
        assert torch.allclose(b.grad, -2 * (ah - cos * bh) / nb / 6, atol=1e-10)
    x = torch.randn(3, 4)
    assert cass_loss(x, 2 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert cass_loss(x, -x).item() == pytest.approx(4.0, abs=1e-6)
    with pytest.raises(ValueError):
        cass_loss(torch.randn(3, 4), torch.randn(3, 5))


# -- the method -------------------------------------------------------------------------------------------------
def test_both_networks_receive_gradient_and_sets_partition_the_parameters():
    m = _method()
    out = m({"image": torch.rand(4, 1, 32, 32)})
    assert 0.0 <= out.loss.item() <= 4.0 and {"cos", "embedding_std_cnn", "embedding_std_vit"} <= set(out.logs)
    assert {k: tuple(v.shape) for k, v in out.embeddings.items()} == {
        "cnn_backbone": (4, 512), "cnn_head": (4, 1000), "vit_backbone": (4, 192), "vit_head": (4, 1000)}
    out.loss.backward()
    sets = m.parameter_sets()
    assert set(sets) == {"cnn", "vit"}
    names = [n for s in sets.values() for n, _ in s]
    assert sorted(names) == sorted(n for n, p in m.named_parameters() if p.requires_grad)  # disjoint, complete
    assert all(n.startswith(("cnn.", "cnn_head.")) for n, _ in sets["cnn"])
    assert all(n.startswith(("vit.", "vit_head.")) for n, _ in sets["vit"])
    for name, params in sets.items():
        missing = [n for n, p in params if p.grad is None]
        assert not missing, (name, missing[:5])
        assert all(torch.isfinite(p.grad).all() for _, p in params)
        assert sum(float(p.grad.abs().sum()) for _, p in params) > 0, name
    # the backbones themselves (not only the heads) are trained, both of them
    assert m.cnn.conv1.weight.grad.abs().sum() > 0 and m.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_heads_logits_and_mlp():
    lg = _method()
    assert isinstance(lg.cnn_head, torch.nn.Linear) and lg.cnn_head.out_features == 1000
    assert lg.cnn_head.in_features == 512 and lg.vit_head.in_features == 192
    mlp = _method(head="mlp", embed_dim=64, mlp_hidden=32)
    x = torch.rand(2, 1, 32, 32)
    assert mlp.embed_cnn(x).shape == (2, 64) and mlp.embed_vit(x).shape == (2, 64)
    assert [mod.out_features for mod in mlp.vit_head if isinstance(mod, torch.nn.Linear)] == [32, 64]
    assert set(lg.encoders()) == {"cnn", "vit"} and lg.encoders()["vit"] is lg.vit


def test_config_errors():
    with pytest.raises(ConfigError, match="2D images only"):
        cfg = build_config({"method": "cass"})
        build_method(cfg, DataInfo(in_chans=1, spatial_dims=3, image_size=32, num_samples=8))
    with pytest.raises(ConfigError, match="multiple of the patch size 16"):
        cfg = build_config({"method": "cass"})
        build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=28, num_samples=8))
    with pytest.raises(ConfigError, match="vision transformer"):
        _method(vit_backbone="resnet18")
    with pytest.raises(ConfigError, match="must not be a transformer"):
        cfg = build_config({"method": "cass", "model": {"backbone": "vit_tiny_patch16_224"}})
        build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=8))
    with pytest.raises(ConfigError, match="method.head"):
        build_config({"method": {"name": "cass", "head": "proj"}})
    with pytest.raises(ConfigError, match="optim.sets.vit.lrr"):
        build_config({"method": "cass", "optim": {"sets": {"vit": {"lrr": 0.1}}}})
    with pytest.raises(ConfigError, match="optim.sets.vit.lr"):
        build_config({"method": "cass", "optim": {"sets": {"vit": {"lr": "fast"}}}})


def test_optimizer_defaults_come_from_the_method():
    assert build_config({"method": "cass"}).optim.name == "adamw"
    assert build_config({"method": "mocov2"}).optim.name == "sgd"
    assert build_config({"method": "cass", "optim": {"name": "sgd"}}).optim.name == "sgd"
    c = make_config(method="cass", overrides=["optim.sets.vit.lr=5e-4", "optim.sets.vit.name=sgd"]).optim
    assert c.for_set("vit").lr == 5e-4 and c.for_set("vit").name == "sgd" and c.for_set("cnn").name == "adamw"


# -- through the real trainer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_grad", [True, False])
def test_second_identical_step_gives_identical_not_doubled_gradients(tmp_path, monkeypatch, zero_grad):
    """lr 0 keeps the weights fixed and identity views on an 8-image set make both steps see the same batch:
    with zero_grad between steps the gradients at the 2nd optimiser step equal the 1st; without it (the
    authors' notebook) they would be doubled — the second case checks that the test can tell."""
    if not zero_grad:
        monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", lambda self, set_to_none=True: None)
    grads: dict[int, list[list[torch.Tensor]]] = {}

    def record(opt, args, kwargs):
        grads.setdefault(id(opt), []).append(
            [p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None])

    handle = register_optimizer_step_pre_hook(record)
    try:
        pretrain("cass", data="phantom2d:8", out=tmp_path / "z", image_size=32, batch_size=8, max_steps=2, lr=0.0,
                 progress=False, overrides=[*TINY, *PLAIN_VIEWS, "train.deterministic=true", "data.split=all"])
    finally:
        handle.remove()
    assert len(grads) == 2  # two optimisers, cnn and vit
    for steps in grads.values():
        assert len(steps) == 2
        first, second = steps
        assert len(first) == len(second) > 10
        scale = 1.0 if zero_grad else 2.0
        for g1, g2 in zip(first, second, strict=True):
            assert torch.allclose(g2, scale * g1, rtol=1e-3, atol=1e-7)
        assert any(float(g.abs().max()) > 1e-6 for g in first)


@pytest.mark.slow  # three pretraining runs, like the e2e resume test
def test_two_optimizers_and_schedules_survive_resume(tmp_path, monkeypatch):
    """Crash mid-run, resume: model, both optimiser states and both schedules equal an uninterrupted run; each
    set follows its own peak lr through warm-up + cosine."""
    args = dict(SMALL, max_steps=8, overrides=[
        *TINY, "train.log_every_n_steps=1", "checkpoint.every_n_steps=3", "train.deterministic=true",
        "optim.warmup_steps=2", "optim.lr=1e-3", "optim.sets.vit.lr=5e-4", "optim.sets.vit.weight_decay=0.05"])
    full = pretrain("cass", out=tmp_path / "full", **args)

    def crash_after_step_4(self, step, total):
        if step == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(CASS, "after_optimizer_step", crash_after_step_4)
        with pytest.raises(KeyboardInterrupt):
            pretrain("cass", out=tmp_path / "cut", **args)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")["step"] < 5
    pretrain(out=tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(full / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["step"] == b["step"] == 8
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k
    assert set(a["optimizers"]) == set(b["optimizers"]) == {"cnn", "vit"}
    for name in ("cnn", "vit"):
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert len(sa) == len(sb) > 0
        for i in sa:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.allclose(sa[i][key].float(), sb[i][key].float(), atol=1e-7), (name, i, key)
        assert a["schedulers"][name]["last_epoch"] == b["schedulers"][name]["last_epoch"] == 8
    groups = {n: a["optimizers"][n]["param_groups"] for n in ("cnn", "vit")}
    assert {g["initial_lr"] for g in groups["cnn"]} == {1e-3} and {g["initial_lr"] for g in groups["vit"]} == {5e-4}
    assert max(g["weight_decay"] for g in groups["vit"]) == 0.05
    assert max(g["weight_decay"] for g in groups["cnn"]) == 1e-4

    def factor(s):  # warm-up 2 steps then cosine to 0 over the remaining 6 (hand-written)
        return (s + 1) / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))

    for run in (full, tmp_path / "cut"):
        rows = _rows(run)
        assert [int(r["step"]) for r in rows] == list(range(1, 9))
        for r in rows:
            s = int(r["step"])  # logged after s scheduler steps
            assert float(r["lr_cnn"]) == pytest.approx(1e-3 * factor(s), rel=1e-4, abs=1e-12)
            assert float(r["lr_vit"]) == pytest.approx(5e-4 * factor(s), rel=1e-4, abs=1e-12)


def test_optim_sets_naming_an_unknown_set_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="trains the parameter set"):
        pretrain("cass", out=tmp_path / "u", max_steps=1, overrides=[*TINY, "optim.sets.transformer.lr=1e-4"],
                 **SMALL)
    assert not (tmp_path / "u" / "checkpoints" / "last.ckpt").exists()


# -- export and evaluation --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return pretrain("cass", out=tmp_path_factory.mktemp("cass") / "run", max_steps=2, **SMALL)


def test_both_encoders_load_strictly_into_fresh_timm_models(run):
    assert not (run / "encoder.safetensors").exists()
    model = load_checkpoint(run / "checkpoints" / "last.ckpt")["model"]
    x = torch.rand(3, 1, 32, 32)
    fresh = {"cnn": timm.create_model("resnet18", num_classes=0, in_chans=1),
             "vit": timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=32)}
    for name, m in fresh.items():
        m.load_state_dict(st.load_file(str(run / f"encoder_{name}.safetensors")), strict=True)
        ref = timm.create_model(m.default_cfg["architecture"], num_classes=0, in_chans=1,
                                **({"img_size": 32} if name == "vit" else {}))
        ref.load_state_dict({k.removeprefix(f"{name}."): v for k, v in model.items() if k.startswith(f"{name}.")})
        with torch.no_grad():
            assert torch.allclose(m.eval()(x), ref.eval()(x), atol=1e-6)


def test_load_encoder_rebuilds_both_from_metadata(run):
    from medssl.encoders import load_encoder, read_metadata

    meta = read_metadata(run / "encoder_vit.safetensors")
    assert meta["model_name"] == "vit_tiny_patch16_224" and meta["image_size"] == "32" and meta["in_chans"] == "1"
    assert read_metadata(run / "encoder_cnn.safetensors")["model_name"] == "resnet18"
    with torch.no_grad():
        assert load_encoder(run / "encoder_cnn.safetensors")(torch.rand(2, 1, 32, 32)).shape == (2, 512)
        assert load_encoder(run / "encoder_vit.safetensors")(torch.rand(2, 1, 32, 32)).shape == (2, 192)


def test_evaluate_both_encoders_into_one_table_or_one(run, tmp_path):
    kw = dict(protocol="knn", label_fractions=(1.0,), seeds=(0,), progress=False)
    both = evaluate("phantom2d:64", tmp_path / "both", run=run, encoder="both", **kw)
    assert [r["encoder"] for r in both["rows"]] == ["cass:cnn", "cass:vit"]
    assert "cass:cnn" in both["table"] and "cass:vit" in both["table"]
    assert all(0.0 <= r["metrics"]["auc_macro"] <= 1.0 for r in both["rows"])
    vit = evaluate("phantom2d:64", tmp_path / "vit", run=run, encoder="vit", **kw)
    assert [r["encoder"] for r in vit["rows"]] == ["cass:vit"]
    assert vit["rows"][0]["metrics"] == both["rows"][1]["metrics"]
    with pytest.raises(ConfigError, match="no encoder 'cnnn'"):
        evaluate("phantom2d:64", tmp_path / "x", run=run, encoder="cnnn", **kw)


def test_training_checkpoint_gives_both_encoders(run):
    from medssl.encoders import checkpoint_encoders, load_encoder

    encs = dict(checkpoint_encoders(run / "checkpoints" / "last.ckpt"))
    assert set(encs) == {"cass@2:cnn", "cass@2:vit"}
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encs["cass@2:vit"](x), load_encoder(run / "encoder_vit.safetensors")(x), atol=1e-6)


def test_f1_is_not_recall():
    """The authors' notebook reported recall as F1; medssl's f1_macro is the F1 (harmonic mean with precision)."""
    import numpy as np
    from sklearn.metrics import f1_score, recall_score

    from medssl.eval.metrics import classification_metrics

    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 2, 1, 1, 2, 0])
    m = classification_metrics(y, np.eye(3)[pred])
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert abs(m["f1_macro"] - recall_score(y, pred, average="macro")) > 0.05
    assert m["balanced_accuracy"] == pytest.approx(recall_score(y, pred, average="macro"))


# -- recipes ----------------------------------------------------------------------------------------------------
def test_paper_recipe_settings():
    cfg = make_config(config="cass_histopathology")
    assert cfg.method_name == "cass" and cfg.method["vit_backbone"] == "vit_base_patch16_384"
    assert cfg.method["head"] == "logits" and cfg.model.backbone == "resnet50"
    # both networks start from ImageNet weights, named (read from the local cache, never downloaded)
    assert cfg.model.init_from == "timm:resnet50.a1_in1k"
    assert cfg.method["vit_init_from"] == "timm:vit_base_patch16_384.augreg_in21k_ft_in1k"
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.0
    assert cfg.train.batch_size == 16 and cfg.train.epochs == 100 and cfg.data.image_size == 384
    scratch = make_config(config="cass_histopathology_scratch")
    assert scratch.model.init_from is None and scratch.method["vit_init_from"] is None
    assert scratch.data.image_size == 224 and scratch.method["vit_backbone"] == "vit_base_patch16_224"


def test_paper_recipe_fails_clearly_without_its_weights(tmp_path, capsys, monkeypatch):
    from medssl.cli import main
    from medssl.nn import init_from

    monkeypatch.setattr(init_from, "_cached", lambda repo, names: None)  # an empty Hugging Face cache
    argv = ["pretrain", "--config", "cass_histopathology", "--data", "phantom2d:16", "--max-steps", "1",
            "--batch-size", "4", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "timm:resnet50.a1_in1k" in err and "not in the local Hugging Face cache" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_vit_init_from_loads_the_vit_and_collapse_warns(tmp_path, caplog):
    import logging

    import safetensors.torch as st

    from medssl.methods import DataInfo, build_method
    from medssl.nn.backbones import build_backbone

    torch.manual_seed(5)
    vit = build_backbone("vit_tiny_patch16_224", in_chans=1, image_size=32)
    st.save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    cfg = make_config(method="cass", data="phantom2d", image_size=32,
                      overrides=["method.head=mlp", "method.embed_dim=16", "method.mlp_hidden=16",
                                 f"method.vit_init_from={tmp_path / 'vit.safetensors'}",
                                 "method.collapse_warn_std=100", "method.collapse_check_every=2"])
    m = build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=16))
    for k, v in vit.state_dict().items():
        assert torch.equal(m.vit.state_dict()[k], v), k
    m.training_step({"image": torch.rand(4, 1, 32, 32)})
    with caplog.at_level(logging.WARNING, logger="medssl"):
        m.after_optimizer_step(0, 10)  # not a check step
        assert not caplog.records
        m.after_optimizer_step(1, 10)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("is collapsing at step 2" in w for w in warnings)
    assert "embedding_std_vit" in warnings[1] and "method.collapse_warn_std 100" in warnings[1]
    assert m.check_collapse(4) == []  # once per network
    m.hparams.collapse_warn_std = 1e-6
    m._warned.clear()
    assert m.check_collapse(4) == []  # spread-out embeddings do not warn


def test_cpu_recipe_runs(tmp_path):
    run = pretrain(config="cass_phantom2d_cpu", data="phantom2d:32", out=tmp_path / "cpu", max_steps=1,
                   batch_size=4, progress=False)
    assert (run / "encoder_cnn.safetensors").is_file() and (run / "encoder_vit.safetensors").is_file()
