"""Hostile inputs to ``medssl pretrain`` that the engine owns: config values of the train / optim / checkpoint
sections, run directories, checkpoint files. Each runs the real CLI in a subprocess and must end with exit code
2, one ``medssl: error:`` line naming the key or file, no traceback, and nothing trained.

The subprocesses of all cases start together (a few at a time) in one module fixture; each test then checks
its own case.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # 41 subprocesses in one fixture

BASE = ["pretrain", "--method", "mocov2", "--data", "phantom2d:64", "--image-size", "16", "--batch-size", "8",
        "--max-steps", "2", "--set", "method.queue_size=32", "--quiet"]


@dataclass(frozen=True)
class Case:
    """``args(tmp)`` are the CLI arguments after ``medssl``; ``names(tmp)`` what stderr's one line must contain."""

    id: str
    args: Callable[[Path], list[str]]
    names: Callable[[Path], str]
    prelude: str = ""


def _set(key: str, value: str, *, expect: str | None = None) -> Case:
    return Case(f"{key}={value}", lambda t: [*BASE, "--out", str(t / "run"), "--set", f"{key}={value}"],
                lambda t: expect or key)


def _flag(flag: str, value: str, key: str) -> Case:
    return Case(f"{flag} {value}", lambda t: [*BASE, "--out", str(t / "run"), flag, value], lambda t: key)


CONFIG_CASES = [
    _set("train.batch_size", "-4"),  # looped for ever before: an empty loader
    _set("train.batch_size", "2.5"),
    _set("train.epochs", "0"),
    _set("train.max_steps", "0"),
    _set("train.devices", "0"),
    _set("train.num_nodes", "0"),
    _set("train.log_every_n_steps", "0"),
    _set("train.collapse_every_n_steps", "-1"),
    _set("train.visualize_every_n_steps", "-5"),
    _set("train.precision", "64"),
    _set("train.accelerator", "tpu9"),
    _set("train.seed", "99999999999"),
    _flag("--lr", "-1", "optim.lr"),
    _flag("--lr", "nan", "optim.lr"),
    _flag("--lr", "inf", "optim.lr"),
    _flag("--seed", "-7", "train.seed"),
    _set("optim.lr", ".nan"),
    _set("optim.weight_decay", "-0.1"),
    _set("optim.momentum", "5"),
    _set("optim.betas", "[0.9,1.5]", expect="optim.betas[1]"),
    _set("optim.warmup_fraction", "1.5"),
    _set("optim.warmup_steps", "-1"),
    _set("optim.min_lr_ratio", "2"),
    _set("optim.grad_clip", "-1"),
    _set("optim.name", "adam"),
    _set("optim.sets.backbone.lr", "-1", expect="optim.sets.backbone.lr"),
    _set("checkpoint.every_n_steps", "-1"),
    _set("checkpoint.keep_last_k", "0"),
    _set("data.split", "test"),
]

# A read-only file system, as the kernel reports it (EROFS) for everything under the given directory.
_READ_ONLY = """
import errno, os
_real_mkdir, _real_open = os.mkdir, os.open
def _refuse(path):
    if str(path).startswith({prefix!r}):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
os.mkdir = lambda path, *a, **k: (_refuse(path), _real_mkdir(path, *a, **k))[1]
os.open = lambda path, *a, **k: (_refuse(path), _real_open(path, *a, **k))[1]
"""


def _sys_is_unwritable() -> bool:
    probe = Path("/sys/medssl-probe")
    try:
        probe.mkdir()
    except OSError:
        return True
    probe.rmdir()
    return False


PATH_CASES = [
    Case("out is a file", lambda t: [*BASE, "--out", str(t / "a_file")], lambda t: f"--out {t / 'a_file'}: is a file"),
    Case("out under a file", lambda t: [*BASE, "--out", str(t / "a_file" / "run")],
         lambda t: f"{t / 'a_file'} is a file, not a directory"),
    Case("out inside the folder data root", lambda t: [*BASE[:3], "--data", f"folder:{t / 'imgs'}", *BASE[5:],
                                                       "--out", str(t / "imgs" / "runs" / "r1")],
         lambda t: f"inside the data folder {t / 'imgs'}"),
    Case("out is the folder data root", lambda t: [*BASE[:3], "--data", f"folder:{t / 'imgs'}", *BASE[5:],
                                                   "--out", str(t / "imgs")],
         lambda t: f"inside the data folder {t / 'imgs'}"),
    Case("out on a read-only file system", lambda t: [*BASE, "--out", str(t / "ro" / "run")],
         lambda t: f"cannot create run directory {t / 'ro' / 'run'}: read-only file system",
         prelude="ro"),
]
if _sys_is_unwritable():
    PATH_CASES.append(Case("out in an unwritable directory", lambda t: [*BASE, "--out", "/sys/medssl-hostile/run"],
                           lambda t: "cannot create run directory /sys/medssl-hostile/run"))


class _TouchOnLoad:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _ckpt_case(name: str, content: Callable[[Path], bytes], problem: str) -> Case:
    def args(t: Path) -> list[str]:
        last = t / f"ck_{name}" / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True, exist_ok=True)
        last.write_bytes(content(t))
        return [*BASE, "--out", str(last.parent.parent), "--resume"]

    return Case(f"last.ckpt {name}", args,
                lambda t: f"checkpoint {t / f'ck_{name}' / 'checkpoints' / 'last.ckpt'}: {problem}")


def _torch_bytes(obj: object, t: Path) -> bytes:
    path = t / "obj.pt"
    torch.save(obj, path)
    return path.read_bytes()


CHECKPOINT_CASES = [
    _ckpt_case("planted pickle", lambda t: pickle.dumps({"step": 1, "model": _TouchOnLoad(str(t / "marker"))}),
               "cannot be read"),
    _ckpt_case("planted torch pickle", lambda t: _torch_bytes({"step": 1, "model": _TouchOnLoad(str(t / "marker"))},
                                                              t), "refused, it asks to import the Python object"),
    _ckpt_case("garbage", lambda t: b"\x00garbage" * 10, "cannot be read"),
    _ckpt_case("empty", lambda t: b"", "cannot be read"),
    _ckpt_case("truncated", lambda t: _torch_bytes({"step": 1, "model": {"w": torch.zeros(1000)}}, t)[:500],
               "cannot be read"),
    _ckpt_case("foreign", lambda t: _torch_bytes({"weights": torch.zeros(3)}, t), "not a medssl training checkpoint"),
]

CASES = CONFIG_CASES + PATH_CASES + CHECKPOINT_CASES


def _run(case: Case, t: Path) -> tuple[list[str], subprocess.CompletedProcess]:
    t.mkdir()
    (t / "a_file").write_text("not a directory\n")
    (t / "imgs").mkdir()
    (t / "ro").mkdir()
    args = case.args(t)
    prelude = _READ_ONLY.format(prefix=str(t / "ro")) if case.prelude == "ro" else ""
    code = f"{prelude}\nimport sys\nfrom medssl.cli import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return args, proc


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[Path, list[str], subprocess.CompletedProcess]]:
    tmp = tmp_path_factory.mktemp("hostile")
    dirs = {case.id: tmp / f"case{i:02d}" for i, case in enumerate(CASES)}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case.id: pool.submit(_run, case, dirs[case.id]) for case in CASES}
    return {cid: (dirs[cid], *f.result()) for cid, f in futures.items()}


def test_there_are_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gives_one_line_and_exit_2(results, case):
    t, args, proc = results[case.id]
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medssl: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert case.names(t) in errors[0], errors[0]
    assert not (t / "marker").exists()  # no planted code ran
    assert not list(t.rglob("metrics.csv")) and not list(t.rglob("encoder*.safetensors"))  # nothing trained
