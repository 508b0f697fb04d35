"""Hostile inputs to the entry points, through the real command line in a subprocess.

Every case must exit with code 2, name the file, flag or key at fault on stderr and print no traceback; the
errors medssl raises itself are one line. Export cases also check that no file of the run changed (and that
none was created). The hostile files are made here: a run directory as pretraining leaves it, checkpoints
without a config or cut short, garbage safetensors, files where directories are expected, symbolic links.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medssl.encoders import random_encoder
from medssl.export import save_encoder

pytestmark = pytest.mark.slow

DATA = "phantom2d:40"
EVAL = ["--data", DATA, "--image-size", "16", "--label-fractions", "1", "--seeds", "0", "--device", "cpu"]


def _run_dir(root: Path) -> Path:
    """A run directory with every file a finished pretraining run has (small stand-ins where content is unused)."""
    root.mkdir(parents=True)
    enc = random_encoder("resnet18", in_chans=1, image_size=16, seed=0)
    save_encoder(enc.backbone, root / "encoder.safetensors",
                 {"model_name": "resnet18", "in_chans": 1, "image_size": 16, "stem": "default", "spatial_dims": 2})
    cfg = {"method": {"name": "mocov2"}, "model": {"backbone": "resnet18", "stem": "default"},
           "data": {"spec": "phantom2d", "image_size": 16}}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (root / "splits.csv").write_text("index,split\n0,train\n")
    (root / "checkpoints").mkdir()
    torch.save({"step": 1, "model": {"w": torch.zeros(3)}, "config": cfg}, root / "checkpoints" / "last.ckpt")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    run = _run_dir(tmp / "run")
    paths = {"tmp": tmp, "run": run}
    (tmp / "afile").write_text("I am a file, not a directory\n")
    (tmp / "empty").mkdir()
    torch.save({"step": 3, "model": {"w": torch.zeros(4)}}, tmp / "noconfig.ckpt")  # a checkpoint without config
    torch.save({"w": torch.zeros(4), "b": torch.ones(2)}, tmp / "tensors.ckpt")  # tensors only
    full = tmp / "full.ckpt"
    torch.save({"step": 1, "model": {"w": torch.zeros(10000)}}, full)
    (tmp / "truncated.ckpt").write_bytes(full.read_bytes()[:300])
    (tmp / "garbage.ckpt").write_bytes(b"not a checkpoint at all\n" * 10)
    (tmp / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    (tmp / "truncated.safetensors").write_bytes((run / "encoder.safetensors").read_bytes()[:100_000])
    (tmp / "link.safetensors").symlink_to(run / "encoder.safetensors")
    (tmp / "runlink").symlink_to(run, target_is_directory=True)
    bad = tmp / "badrun"
    bad.mkdir()
    (bad / "encoder.safetensors").write_bytes((run / "encoder.safetensors").read_bytes())
    (bad / "config.yaml").write_text("method: [unclosed\n")
    edited = tmp / "editedrun"  # a finished run whose config.yaml was edited by hand
    edited.mkdir()
    (edited / "encoder.safetensors").write_bytes((run / "encoder.safetensors").read_bytes())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["zero_init_last"] = "perhaps"
    (edited / "config.yaml").write_text(yaml.safe_dump(cfg))
    return paths


def _fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (id, argv with {run} / {tmp} placeholders, text stderr must contain, is it an argparse error)
CASES = [
    # export must never overwrite a file of the run it reads
    ("export-over-own-encoder", ["export", "--run", "{run}", "--format", "timm", "--out", "{run}/encoder.safetensors"],
     "encoder.safetensors: a file of run", False),
    ("export-over-own-encoder-dotdot", ["export", "--run", "{run}", "--format", "timm", "--out",
                                        "{run}/checkpoints/../encoder.safetensors"], "must not be overwritten", False),
    ("export-over-own-encoder-symlink", ["export", "--run", "{run}", "--format", "timm", "--out",
                                         "{tmp}/link.safetensors"], "(that is {run}/encoder.safetensors)", False),
    ("export-into-run-via-dir-symlink", ["export", "--run", "{run}", "--format", "timm", "--out",
                                         "{tmp}/runlink/encoder.safetensors"], "must not be overwritten", False),
    ("export-over-whitening-name", ["export", "--run", "{run}", "--format", "timm", "--out",
                                    "{run}/whitening.safetensors"], "whitening.safetensors: a file of run", False),
    ("export-into-checkpoints", ["export", "--run", "{run}", "--format", "timm", "--out",
                                 "{run}/checkpoints/last.safetensors"], "last.safetensors: a file of run", False),
    ("export-source-over-itself", ["export", "--checkpoint", "{run}/encoder.safetensors", "--format", "timm",
                                   "--out", "{run}/encoder.safetensors"], "must not be overwritten", False),
    ("export-over-config", ["export", "--run", "{run}", "--format", "timm", "--out", "{run}/config.yaml"],
     "config.yaml: expected a .safetensors file name", False),
    ("export-under-a-file", ["export", "--run", "{run}", "--format", "timm", "--out", "{tmp}/afile/x.safetensors"],
     "afile is a file", False),
    ("export-unknown-encoder", ["export", "--run", "{run}", "--format", "timm", "--encoder", "vit", "--out",
                                "{tmp}/x.safetensors"], "--encoder vit", False),
    ("export-unknown-format", ["export", "--run", "{run}", "--format", "keras", "--out", "{tmp}/x.safetensors"],
     "--format", True),
    # devices
    ("evaluate-cuda-without-gpu", ["evaluate", "--run", "{run}", *EVAL[:-1], "cuda", "--out", "{tmp}/e"],
     "--device cuda: no CUDA GPU", False),
    ("evaluate-random-baseline-edited-config", ["evaluate", "--run", "{tmp}/editedrun", "--init", "random", *EVAL,
                                                "--out", "{tmp}/e"],
     "model.zero_init_last in the compared run's config: expected true/false, got 'perhaps'", False),
    ("evaluate-device-tpu9", ["evaluate", "--run", "{run}", *EVAL[:-1], "tpu9", "--out", "{tmp}/e"],
     "--device tpu9: not a device name", False),
    ("embed-device-meta", ["embed", "--run", "{run}", "--data", DATA, "--device", "meta", "--out", "{tmp}/m"],
     "--device meta", False),
    # checkpoints and encoder files
    ("checkpoint-without-config", ["evaluate", "--checkpoint", "{tmp}/noconfig.ckpt", *EVAL, "--out", "{tmp}/e"],
     "noconfig.ckpt: has no 'config' entry", False),
    ("checkpoint-tensors-only", ["evaluate", "--checkpoint", "{tmp}/tensors.ckpt", *EVAL, "--out", "{tmp}/e"],
     "tensors.ckpt", False),
    ("checkpoint-truncated", ["evaluate", "--checkpoint", "{tmp}/truncated.ckpt", *EVAL, "--out", "{tmp}/e"],
     "truncated.ckpt", False),
    ("checkpoint-garbage", ["evaluate", "--checkpoint", "{tmp}/garbage.ckpt", *EVAL, "--out", "{tmp}/e"],
     "garbage.ckpt", False),
    ("checkpoint-missing", ["evaluate", "--checkpoint", "{tmp}/missing.ckpt", *EVAL, "--out", "{tmp}/e"],
     "missing.ckpt: file not found", False),
    ("safetensors-garbage", ["evaluate", "--checkpoint", "{tmp}/garbage.safetensors", *EVAL, "--out", "{tmp}/e"],
     "garbage.safetensors: not a readable safetensors file", False),
    ("safetensors-truncated", ["evaluate", "--checkpoint", "{tmp}/truncated.safetensors", *EVAL, "--out", "{tmp}/e"],
     "truncated.safetensors", False),
    ("safetensors-missing", ["embed", "--checkpoint", "{tmp}/missing.safetensors", "--data", DATA, "--out",
                             "{tmp}/m"], "missing.safetensors: not found", False),
    ("run-config-not-yaml", ["evaluate", "--run", "{tmp}/badrun", *EVAL, "--out", "{tmp}/e"],
     "badrun/config.yaml: not valid YAML", False),
    # output paths
    ("evaluate-out-is-file", ["evaluate", "--run", "{run}", *EVAL, "--out", "{tmp}/afile"],
     "--out {tmp}/afile: is a file", False),
    ("evaluate-out-under-file", ["evaluate", "--run", "{run}", *EVAL, "--out", "{tmp}/afile/sub"],
     "afile is a file, not a directory", False),
    ("embed-out-is-file", ["embed", "--run", "{run}", "--data", DATA, "--device", "cpu", "--out", "{tmp}/afile"],
     "--out {tmp}/afile: is a file", False),
    ("embed-out-under-file", ["embed", "--run", "{run}", "--data", DATA, "--device", "cpu", "--out",
                              "{tmp}/afile/sub"], "afile is a file, not a directory", False),
    ("compare-out-is-file", ["compare", "{run}", *EVAL, "--protocol", "knn", "--out", "{tmp}/afile"],
     "--out {tmp}/afile: is a file", False),
    ("compare-out-under-file", ["compare", "{run}", *EVAL, "--protocol", "knn", "--out", "{tmp}/afile/sub"],
     "afile is a file, not a directory", False),
    ("report-missing-run", ["report", "{tmp}/no_such_run"], "no_such_run: not found", False),
    ("report-out-under-file", ["report", "{run}", "--out", "{tmp}/afile/r.html"], "afile is a file", False),
    # resume
    ("resume-empty-dir", ["pretrain", "--resume", "--out", "{tmp}/empty"], "nothing to resume in {tmp}/empty", False),
    ("resume-missing-dir", ["pretrain", "--resume", "--out", "{tmp}/nothing_here"],
     "nothing to resume in {tmp}/nothing_here", False),
    # values
    ("label-fraction-not-a-number", ["evaluate", "--run", "{run}", "--data", DATA, "--label-fractions", "0.5,x",
                                     "--out", "{tmp}/e"], "--label-fractions", True),
    ("label-fraction-above-one", ["evaluate", "--run", "{run}", "--data", DATA, "--label-fractions", "1.5",
                                  "--out", "{tmp}/e"], "--label-fractions", True),
    ("label-fraction-nan", ["compare", "{run}", "--data", DATA, "--label-fractions", "nan", "--out", "{tmp}/c"],
     "--label-fractions", True),
    ("seeds-not-integers", ["evaluate", "--run", "{run}", "--data", DATA, "--seeds", "a", "--out", "{tmp}/e"],
     "--seeds", True),
    ("seeds-repeated", ["evaluate", "--run", "{run}", "--data", DATA, "--seeds", "1,1", "--out", "{tmp}/e"],
     "seeds must be distinct", True),
    ("protocol-unknown", ["evaluate", "--run", "{run}", "--data", DATA, "--protocol", "foo", "--out", "{tmp}/e"],
     "--protocol", True),
    ("compare-protocol-unknown", ["compare", "{run}", "--data", DATA, "--protocol", "knn", "foo", "--out",
                                  "{tmp}/c"], "--protocol", True),
    ("epochs-for-a-probe", ["evaluate", "--run", "{run}", *EVAL, "--protocol", "knn", "--epochs", "2", "--out",
                            "{tmp}/e"], "--epochs applies to --protocol finetune / segment, not knn", False),
    ("encoder-unknown", ["evaluate", "--run", "{run}", *EVAL, "--encoder", "vit", "--out", "{tmp}/e"],
     "--encoder vit: run {run} has no encoder 'vit' (has: backbone)", False),
    ("embed-encoder-unknown", ["embed", "--run", "{run}", "--data", DATA, "--device", "cpu", "--encoder", "cnn",
                               "--out", "{tmp}/m"], "--encoder cnn", False),
    # --init takes random / imagenet or weights (a file, timm:NAME, hf-hub:ORG/NAME): anything else is a missing file
    ("init-unknown", ["evaluate", "--init", "foo", "--data", DATA, "--out", "{tmp}/e"],
     "--init foo: file not found (expected a weights file, timm:NAME or hf-hub:ORG/NAME)", False),
    ("compare-init-unknown", ["compare", "--init", "foo", "--data", DATA, "--out", "{tmp}/c"],
     "--init foo: file not found", False),
    ("init-hub-offline", ["evaluate", "--init", "hf-hub:medssl-none/none", "--data", DATA, "--out", "{tmp}/e"],
     "not in the local Hugging Face cache", False),
    ("pretrain-precision-unknown", ["pretrain", "--method", "mocov2", "--precision", "fp8", "--out", "{tmp}/p"],
     "--precision", True),
]


@pytest.mark.parametrize(("argv", "needle", "argparse_error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_clear_error(env, argv, needle, argparse_error):
    run, tmp = env["run"], env["tmp"]
    args = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in argv]
    needle = needle.replace("{run}", str(run)).replace("{tmp}", str(tmp))
    before = _fingerprint(run)
    proc = subprocess.run([sys.executable, "-m", "medssl", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert needle in err, err
    lines = err.strip().splitlines()
    if argparse_error:
        assert lines[-1].startswith("medssl ") and ": error: argument" in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("medssl: error: "), err
    assert _fingerprint(run) == before  # no file of the run changed, none appeared


def test_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)
