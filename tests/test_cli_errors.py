"""Every error a user can cause is one line and exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from medssl.cli import main


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["pretrain", "--method", "nosuchmethod", "--data", "phantom2d", "--out", "{tmp}/r"],
            "unknown method 'nosuchmethod'",
        ),
        (["pretrain", "--method", "mocov2", "--data", "nosuch:spec", "--out", "{tmp}/r", "--max-steps", "1"], "nosuch"),
        (
            [
                "pretrain",
                "--method",
                "mocov2",
                "--data",
                "npz:{tmp}/missing.npz",
                "--out",
                "{tmp}/r",
                "--max-steps",
                "1",
            ],
            "missing.npz",
        ),
        (
            ["pretrain", "--method", "mocov2", "--data", "phantom2d", "--out", "{tmp}/r", "--set", "train.batchsize=3"],
            "did you mean 'batch_size'",
        ),
        (
            ["pretrain", "--method", "mocov2", "--data", "phantom2d", "--out", "{tmp}/r", "--set", "novalue"],
            "key=value",
        ),
        (
            [
                "pretrain",
                "--method",
                "mocov2",
                "--data",
                "phantom2d",
                "--out",
                "{tmp}/r",
                "--config",
                "{tmp}/nope.yaml",
            ],
            "nope.yaml",
        ),
        (
            ["pretrain", "--method", "mocov2", "--data", "phantom2d", "--out", "{tmp}/r", "--resume"],
            "nothing to resume",
        ),
        (
            ["pretrain", "--method", "mocov2", "--data", "phantom2d", "--out", "{tmp}/r", "--backbone", "resnet999"],
            "resnet999",
        ),
        (["evaluate", "--run", "{tmp}/norun", "--data", "phantom2d", "--out", "{tmp}/e"], "norun"),
        (["evaluate", "--data", "phantom2d", "--out", "{tmp}/e"], "nothing to evaluate"),
        (
            ["evaluate", "--checkpoint", "{tmp}/x.safetensors", "--data", "phantom2d", "--out", "{tmp}/e"],
            "x.safetensors",
        ),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    needle = needle.replace("{tmp}", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert err.startswith("medssl: error:")


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--method", "mocov2"],
        ["evaluate", "--label-fractions", "2", "--data", "x", "--out", "y"],
        ["pretrain", "--out", "x", "--batch-size", "0"],
    ],
)
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_methods_lists_mocov2(capsys):
    assert main(["methods"]) == 0
    assert "mocov2" in capsys.readouterr().out
