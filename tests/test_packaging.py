"""Packaging polish: ``medssl --version``, shell completion (run in a real bash), the extras declared in
pyproject.toml, and the README's Python example run as written (with smaller sizes)."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import medssl
from medssl.cli import build_parser, main
from medssl.completion import command_table, completion_script

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"medssl {medssl.__version__}"
    assert importlib.metadata.version("medssl") == medssl.__version__  # one version: pyproject reads __version__


def test_version_from_the_installed_command():
    exe = Path(sys.executable).parent / "medssl"
    if not exe.exists():
        pytest.skip("no medssl entry point next to this interpreter")
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"medssl {medssl.__version__}"


def test_pyproject_extras_and_dynamic_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for name, package in [("monai", "monai"), ("tensorboard", "tensorboard"), ("onnx", "onnx"),
                          ("onnx", "onnxruntime"), ("hub", "huggingface_hub"), ("wandb", "wandb"),
                          ("mlflow", "mlflow")]:
        assert any(re.match(rf"{package}\b", req) for req in extras[name]), (name, package)
    # what the tests need runs in CI (which installs .[dev]): the optional formats' packages are dev requirements
    for package in ("onnx", "onnxruntime", "huggingface_hub", "selenium", "monai"):
        assert any(re.match(rf"{package}\b", req) for req in extras["dev"] + project["dependencies"]), package
    # the default log backend is a plain dependency: a default install writes TensorBoard events
    assert any(req.startswith("tensorboard") for req in project["dependencies"])
    assert "version" in project.get("dynamic", []) and "version" not in project


def _complete(script: str, words: list[str]) -> list[str]:
    """COMPREPLY of the generated bash function for the command line ``words`` (the last is being typed)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    prog = (f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _medssl; "
            "printf '%s\\n' \"${COMPREPLY[@]}\"")
    res = subprocess.run([bash, "--norc", "--noprofile", "-c", prog], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return [w for w in res.stdout.splitlines() if w]


def test_bash_completion_in_bash(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o filenames -F _medssl medssl" in script
    parser = build_parser()
    table = command_table(parser)
    assert set(_complete(script, ["medssl", ""])) >= {"pretrain", "evaluate", "export", "completion", "--version"}
    assert _complete(script, ["medssl", "ex"]) == ["export"]
    assert _complete(script, ["medssl", "export", "--format", ""]) == ["timm", "torchvision", "monai", "onnx",
                                                                        "hf-hub"]
    assert _complete(script, ["medssl", "evaluate", "--protocol", "k"]) == ["knn"]
    from medssl.methods import method_table

    assert _complete(script, ["medssl", "pretrain", "--method", ""]) == [n for n, _ in method_table()]
    assert "mae_phantom2d_cpu" in _complete(script, ["medssl", "pretrain", "--config", "mae_ph"])
    assert _complete(script, ["medssl", "pretrain", "--config", "pyproj"]) == ["pyproject.toml"]  # files too
    assert _complete(script, ["medssl", "pretrain", "--out", "READ"]) == ["README.md"]  # a value: file names
    # every option of every sub-command is offered after "-"
    for cmd, sub in table.items():
        if cmd:
            assert set(_complete(script, ["medssl", cmd, "--"])) == {o for o in sub["options"] if o.startswith("--")}
    assert "--quiet" in table["evaluate"]["options"] and "--push" in table["export"]["options"]


def test_zsh_script_and_bad_shell(capsys):
    script = completion_script("zsh", build_parser())
    assert script.startswith("#compdef medssl\n") and "bashcompinit" in script and "_medssl()" in script
    zsh = shutil.which("zsh")
    if zsh is not None:
        res = subprocess.run([zsh, "-f", "-c", script], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    with pytest.raises(SystemExit) as e:
        main(["completion", "fish"])
    assert e.value.code == 2 and "invalid choice: 'fish'" in capsys.readouterr().err


#: README example value -> the test's smaller value (each must occur in the example: a changed README is noticed)
README_SHRINK = {"image_size=64": "image_size=32", "batch_size=64": "batch_size=8", "max_steps=300": "max_steps=2",
                 '"phantom2d", "runs/moco"': '"phantom2d:48", "runs/moco"',
                 'medssl.evaluate("phantom2d"': 'medssl.evaluate("phantom2d:48"',
                 "seeds=(0, 1, 2))": "seeds=(0,), image_size=32, progress=False)"}


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow  # the README example: a pretraining run and an evaluation
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    code = readme_python_example()
    for old, new in README_SHRINK.items():
        assert old in code, f"README example changed: {old!r} not found; update README_SHRINK"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    assert "| Encoder | Protocol | Labels |" in out and "random" in out  # the printed comparison table
    assert (tmp_path / "runs" / "moco" / "encoder.safetensors").is_file()
    import torch

    x = torch.rand(2, 1, 32, 32)
    assert ns["encoder"](x).shape == (2, 512)
