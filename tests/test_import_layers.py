"""Imports flow one way: no module of medssl imports a module of a higher layer.

The layer order this test enforces (lowest first; a module may import its own layer and every layer below):

    0  leaves       errors, checks, fileio, distributed,
                    visual, the package root ``medssl`` (its import is lazy), and the registries
                    (methods.registry, eval.registry, data.registry): they import only leaves, so anything may
                    import them
    1  data, transforms
    2  config       (the typed run configuration over data's and transforms' settings)
    3  nn
    4  losses
    5  methods
    6  engine       (with export: the trainer writes the encoder files)
    7  eval
    8  api          (api, encoders, export_formats, export_onnx, export_hub, embed, compare, report: the library
                    entry points)
    9  cli          (cli, cli_eval, completion, demo, __main__)

Two checks:

* statically, over the AST of every module under ``src/medssl`` (imports inside functions included,
  ``if TYPE_CHECKING:`` blocks excluded): an import of a higher layer is an error, except the few lazy
  (function-level) imports listed in ``LAZY_UPWARD`` with their reason;
* at run time, in a fresh interpreter: importing the modules in layer order, no import loads a module of a
  higher layer (this sees what package ``__init__`` files pull in: importing a registry loads its package, so
  at run time a registry counts as a member of its package's layer).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "medssl"

LEAF, DATA, CONFIG, NN, LOSSES, METHODS, ENGINE, EVAL, API, CLI = range(10)
LAYER_NAMES = ["leaves", "data/transforms", "config", "nn", "losses", "methods", "engine", "eval", "api", "cli"]

#: module (or package) -> layer; a module takes the layer of its longest listed prefix
LAYERS = {
    "medssl": LEAF,
    "medssl.errors": LEAF, "medssl.checks": LEAF, "medssl.fileio": LEAF, "medssl.distributed": LEAF,
    "medssl.visual": LEAF,
    "medssl.methods.registry": LEAF, "medssl.eval.registry": LEAF, "medssl.data.registry": LEAF,
    "medssl.data": DATA, "medssl.transforms": DATA,
    "medssl.config": CONFIG,
    "medssl.nn": NN,
    "medssl.losses": LOSSES,
    "medssl.methods": METHODS,
    "medssl.engine": ENGINE, "medssl.export": ENGINE,
    "medssl.eval": EVAL,
    "medssl.api": API, "medssl.encoders": API, "medssl.export_formats": API, "medssl.embed": API,
    "medssl.export_onnx": API, "medssl.export_hub": API,
    "medssl.compare": API, "medssl.report": API,
    "medssl.cli": CLI, "medssl.cli_eval": CLI, "medssl.completion": CLI, "medssl.demo": CLI, "medssl.__main__": CLI,
}
REGISTRIES = ("medssl.methods.registry", "medssl.eval.registry", "medssl.data.registry")

#: (importing module or package, imported module) -> why this lazy, function-level upward import is allowed
LAZY_UPWARD = {
    ("medssl", "medssl.api"): "medssl.pretrain / medssl.evaluate are resolved on first use (import medssl stays light)",
    ("medssl.config", "medssl.methods"): "build_config validates the method: section through the method registry "
                                         "when it is called; config does not import methods at import time",
    ("medssl.engine", "medssl.eval.collapse"): "the trainer logs collapse statistics of the step's embeddings",
    ("medssl.engine", "medssl.eval.reconstruction"): "the trainer saves the methods' reconstruction figures",
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer: add it to LAYERS in {__file__}")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported medssl module, line, lazy)`` for every import in the file (``from a import b`` names module
    ``a.b`` when that is a module); ``lazy`` = inside a function."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, lazy)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, lazy) for a in child.names if a.name.split(".")[0] == "medssl")
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child)
                if target.split(".")[0] == "medssl":
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        found.append((sub if sub in modules else target, child.lineno, lazy))
            visit(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _lazy_allowed(importer: str, imported: str) -> bool:
    return any((importer == a or importer.startswith(a + ".")) and (imported == b or imported.startswith(b + "."))
               for a, b in LAZY_UPWARD)


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    modules = all_modules()
    names = set(modules)
    violations = []
    for module, path in modules.items():
        own = layer_of(module)
        for imported, line, lazy in imports_of(module, path, names):
            if imported == "medssl" or imported not in names and not any(m.startswith(imported + ".") for m in names):
                continue  # the root package (lazy by design) / a name that is not a module
            up = layer_of(imported)
            if up > own and not (lazy and _lazy_allowed(module, imported)):
                violations.append(f"{path.relative_to(SRC.parent)}:{line}: {module} ({LAYER_NAMES[own]}) imports "
                                  f"{imported} ({LAYER_NAMES[up]}){' inside a function' if lazy else ''}")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_registries_import_only_leaves():
    modules = all_modules()
    for registry in REGISTRIES:
        if registry in modules:
            for imported, line, _ in imports_of(registry, modules[registry], set(modules)):
                assert layer_of(imported) == LEAF, f"{registry}:{line} imports {imported}"


_RUNTIME_CHECK = r"""
import importlib, json, sys
order, layers = json.loads(sys.argv[1]), json.loads(sys.argv[2])
violations = []
for module in order:
    before = set(sys.modules)
    importlib.import_module(module)
    ancestors = {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1)}
    for new in sorted(set(sys.modules) - before):
        if new.split(".")[0] == "medssl" and new in layers and new not in ancestors and layers[new] > layers[module]:
            violations.append(f"import {module} (layer {layers[module]}) loads {new} (layer {layers[new]})")
print(json.dumps(violations))
"""


def test_importing_in_layer_order_never_loads_a_higher_layer():
    """A fresh interpreter imports every module, lowest layer first, and watches what each import loads."""
    modules = [m for m in all_modules() if m != "medssl.__main__"]  # (running it is the CLI)

    def runtime_layer(m: str) -> int:  # importing a registry imports its package first
        return layer_of(m.rsplit(".", 1)[0]) if m in REGISTRIES else layer_of(m)

    layers = {m: runtime_layer(m) for m in modules}
    order = sorted(modules, key=lambda m: (layers[m], m))
    proc = subprocess.run([sys.executable, "-c", _RUNTIME_CHECK, json.dumps(order), json.dumps(layers)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    violations = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not violations, "\n".join(violations)


def test_eval_reconstruction_does_not_load_the_methods():
    """Drawing a figure needs VisualPanel, not every method (issue 19, item 6)."""
    code = "import sys, medssl.eval.reconstruction; print(any(m.startswith('medssl.methods') for m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_importing_the_methods_package_registers_every_method_module():
    """A method is one file: ``import medssl.methods`` imports every module of the package."""
    plugins = sorted(p.stem for p in (PACKAGE / "methods").glob("*.py")
                     if p.stem not in ("__init__", "base", "registry") and not p.stem.startswith("_"))
    code = ("import json, sys, medssl.methods as m; "
            "print(json.dumps([sorted(k.rsplit('.', 1)[1] for k in sys.modules if k.startswith('medssl.methods.')), "
            "sorted(c.__module__.rsplit('.', 1)[1] for c in m.METHODS.values())]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, registering = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(plugins) <= set(loaded)
    assert set(registering) <= set(plugins)
