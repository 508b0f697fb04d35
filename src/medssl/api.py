"""The library entry points: :func:`pretrain` and :func:`evaluate`. The CLI is a thin wrapper over them.

:data:`PRETRAIN_FLAGS` is the one table of named pretraining options: it builds the ``medssl pretrain`` options and
the explicit layer of :func:`make_config`. Encoders are found by :mod:`medssl.encoders`, protocols by
:mod:`medssl.eval.registry`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medssl.config import ACCELERATORS, PRECISIONS, PretrainConfig, build_config, load_yaml, parse_set
from medssl.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from medssl.eval.registry import ProtocolEntry

RECIPES_DIR = Path(__file__).parent / "recipes"


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe path, or the name of a bundled recipe (``demo_mocov2_phantom2d``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = RECIPES_DIR / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe {name_or_path}: file not found (bundled recipes: {names})")


def positive_int(text: str) -> int:
    """A command-line integer >= 1 (an ``argparse`` type)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return v


@dataclass(frozen=True)
class Flag:
    """A named pretraining option: the keyword of :func:`pretrain` / :func:`make_config`, its command-line form and
    the config key it sets. :data:`PRETRAIN_FLAGS` builds both the ``medssl pretrain`` options and the layer of
    explicit values in :func:`make_config`.

    Attributes:
        name: keyword (``image_size``); the option is ``--image-size`` unless ``option`` says otherwise.
        key: dotted config path it sets (``data.image_size``).
        help: command-line help.
        type: converter of the command-line string (``None``: the string as is).
        choices: the allowed values, the constant where they are defined.
        const: a switch: the option takes no value and sets the key to ``const`` (``--skip-bad``, ``--no-cache``).
        cli: the option string when it is not ``--name`` with dashes.
        exclusive: options with the same group name cannot be given together.
        clears: config keys set to ``None`` when this option is given (``--epochs`` clears ``train.max_steps``).
        metavar: the value's name in the help.
    """

    name: str
    key: str
    help: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    const: Any = None
    cli: str | None = None
    exclusive: str | None = None
    clears: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def option(self) -> str:
        """The command-line option string."""
        return self.cli or "--" + self.name.replace("_", "-")


PRETRAIN_FLAGS: tuple[Flag, ...] = (
    Flag("backbone", "model.backbone", "timm model name (default resnet18); resnet18_3d etc. for volumes"),
    Flag("image_size", "data.image_size", "side length fed to the model (default: the dataset's)", positive_int),
    Flag("batch_size", "train.batch_size", "images per step per device", positive_int),
    Flag("epochs", "train.epochs", "passes over the data", positive_int, exclusive="length",
         clears=("train.max_steps",)),
    Flag("max_steps", "train.max_steps", "optimiser steps (instead of --epochs)", positive_int, exclusive="length"),
    Flag("lr", "optim.lr", "peak learning rate (default: the method's)", float),
    Flag("seed", "train.seed", "seed of data order, augmentations and initialisation", int),
    Flag("devices", "train.devices", "devices (GPUs, or CPU processes); >1 uses DDP", positive_int),
    Flag("num_nodes", "train.num_nodes", "nodes of a multi-node DDP run (torchrun / SLURM start one process per "
         "device)", positive_int),
    Flag("accelerator", "train.accelerator", "auto (default), cpu, cuda, gpu or mps", choices=ACCELERATORS),
    Flag("precision", "train.precision", "numeric precision (bf16-mixed: bf16 autocast on GPU)",
         choices=PRECISIONS),
    Flag("splits", "data.splits", "split manifest (splits.csv of an earlier run) to reuse", metavar="FILE"),
    Flag("cache", "data.cache", "do not cache decoded files (data.cache=false)", const=False, cli="--no-cache"),
    Flag("skip_bad", "data.skip_bad", "read every image once first and skip unreadable ones (listed in "
         "RUN/skipped.csv)", const=True),
)
"""Every named ``medssl pretrain`` option and the config key it sets: a new option is one line here."""


def _put(layer: dict[str, Any], key: str, value: Any) -> None:
    *sections, last = key.split(".")
    node = layer
    for sec in sections:
        node = node.setdefault(sec, {})
    node[last] = value


def flags_layer(flags: dict[str, Any]) -> dict[str, Any]:
    """The config layer of the named options that were given (not ``None``), through :data:`PRETRAIN_FLAGS`.

    Raises:
        ConfigError: an unknown option, or two options of one exclusive group (``--epochs`` and ``--max-steps``).
    """
    known = {f.name: f for f in PRETRAIN_FLAGS}
    unknown = sorted(set(flags) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
    given = [f for f in PRETRAIN_FLAGS if flags.get(f.name) is not None]
    for group in dict.fromkeys(f.exclusive for f in given if f.exclusive):
        clash = [f.option for f in given if f.exclusive == group]
        if len(clash) > 1:
            raise ConfigError(f"give either {' or '.join(clash)}, not both")
    layer: dict[str, Any] = {}
    for f in given:
        _put(layer, f.key, flags[f.name])
        for key in f.clears:
            _put(layer, key, None)
    return layer


def _merge_method_sections(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The layers with their ``method`` sections merged into one last layer.

    A method chosen in a later layer replaces the earlier method section only when the name differs (its
    hyper-parameters then start from that method's defaults); the same name merges the keys.
    """
    merged_method = None
    for layer in layers:
        if "method" in layer:
            sec = layer["method"] if isinstance(layer["method"], dict) else {"name": layer["method"]}
            if merged_method is not None and sec.get("name") not in (None, merged_method.get("name")):
                merged_method = dict(sec)
            else:
                merged_method = {**(merged_method or {}), **sec}
    cleaned = [{k: v for k, v in layer.items() if k != "method"} for layer in layers]
    if merged_method is not None:
        cleaned.append({"method": merged_method})
    return cleaned


def make_config(
    *,
    method: str | None = None,
    data: str | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: dict[str, Any] | None = None,
    **flags: Any,
) -> PretrainConfig:
    """Build a resolved config from a recipe, explicit arguments and ``key=value`` overrides (in that order).

    ``flags`` are the named options of :data:`PRETRAIN_FLAGS` (backbone, image_size, batch_size, epochs,
    max_steps, lr, seed, devices, precision, splits, cache, skip_bad; ``None`` = not given).
    """
    layers: list[dict[str, Any]] = [base or {}]
    if config is not None:
        layers.append(load_yaml(resolve_recipe(config)))
    explicit = flags_layer(flags)
    if method is not None:
        explicit["method"] = {"name": method}
    if data is not None:
        _put(explicit, "data.spec", data)
    layers.append(explicit)
    layers.append(parse_set(overrides))
    return build_config(*_merge_method_sections(layers))


def pretrain(
    method: str | None = None,
    data: str | None = None,
    out: str | Path = "runs/pretrain",
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    **flags: Any,
) -> Path:
    """Pretrain an encoder with a self-supervised method; returns the run directory.

    Example::

        run = medssl.pretrain("mocov2", "phantom2d", "runs/moco", max_steps=200, batch_size=64)

    Args:
        method: registry name (``medssl methods`` lists them).
        data: data spec (``phantom2d``, ``npz:FILE``, ``folder:DIR``, ...).
        out: run directory.
        config: a YAML recipe path or bundled recipe name.
        overrides: ``section.key=value`` strings, applied last.
        resume: continue the run in ``out`` from its last checkpoint.
        force: accept config changes on resume.
        progress: show progress.
        **flags: the named options of :data:`PRETRAIN_FLAGS` (backbone, image_size, batch_size, epochs, max_steps,
            lr, seed, devices, precision, splits, cache, skip_bad).

    Raises:
        CheckpointError: ``resume`` on a directory that holds no run (nothing to resume).
        ConfigError: no method, or an invalid option / config value.
    """
    base: dict[str, Any] | None = None
    saved = Path(out) / "config.yaml"
    if resume and saved.is_file():
        base = load_yaml(saved)
    if base is None and method is None and config is None:
        if resume:
            what = "does not exist" if not Path(out).exists() else "holds no config.yaml"
            raise CheckpointError(f"--resume: nothing to resume in {out} (the directory {what})")
        raise ConfigError("no method given (--method NAME or a --config recipe)")
    cfg = make_config(method=method, data=data, config=config, overrides=overrides, base=base, **flags)
    from medssl.engine.trainer import pretrain as _pretrain

    return _pretrain(cfg, out, resume=resume, force=force, progress=progress)


def prepare(
    data: str,
    out: str | Path,
    *,
    image_size: int | None = None,
    task: str | None = None,
    workers: int = 1,
    chunk_mb: float | None = None,
    fail_on_bad: bool = False,
    spacing: Any = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> Any:
    """Read ``data`` once and write its preprocessed items as shards in ``out`` (``medssl prepare``).

    ``spacing`` is ``data.spacing`` (3D: ``[z, y, x]`` mm, one number or ``"native"``); ``overrides`` are
    ``data.KEY=VALUE`` strings (``data.intensity.mode=window`` ...), validated by :class:`~medssl.config.DataConfig`.
    Returns a :class:`medssl.data.prepare.PrepareResult`.

    Raises:
        ConfigError: an override outside ``data.`` or an invalid value.
        DataError: see :func:`medssl.data.prepare.prepare`.
    """
    from medssl.config import DataConfig, build_dataclass, deep_merge
    from medssl.data.prepare import DEFAULT_CHUNK_MB
    from medssl.data.prepare import prepare as _prepare

    sets = parse_set(overrides)
    other = sorted(k for k in sets if k != "data")
    if other:
        raise ConfigError(f"medssl prepare: --set takes data.* keys only, got '{other[0]}'")
    explicit: dict[str, Any] = {"spec": data}
    if image_size is not None:
        explicit["image_size"] = image_size
    if task is not None:
        explicit["task"] = task
    if spacing is not None:
        explicit["spacing"] = spacing
    cfg = build_dataclass(DataConfig, deep_merge(explicit, sets.get("data") or {}), "data")
    if cfg.splits:
        raise ConfigError("medssl prepare: data.splits is applied when the shards are read (--splits FILE of "
                          "pretrain / evaluate), not when they are written")
    return _prepare(cfg, out, workers=workers, chunk_mb=DEFAULT_CHUNK_MB if chunk_mb is None else chunk_mb,
                    fail_on_bad=fail_on_bad, progress=progress)


def evaluate(
    data: str,
    out: str | Path,
    *,
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    init: str | Sequence[str] | None = None,
    protocol: str = "linear",
    label_fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    task: str | None = None,
    encoder: str | None = None,
    backbone: str | None = None,
    stem: str | None = None,
    image_size: int | None = None,
    batch_size: int = 256,
    device: str | None = None,
    progress: bool = True,
    splits_file: str | Path | None = None,
    epochs: int | None = None,
    protocol_options: dict[str, Any] | None = None,
    window: int | None = None,
    overlap: float | None = None,
) -> dict[str, Any]:
    """Evaluate encoders on a labelled dataset at several label fractions and seeds.

    Protocols that train (``finetune``, ``segment``: registered with ``trains=True``) train a fresh copy of each
    encoder per fraction and seed; ``epochs`` (``--epochs``) is their training length and ``protocol_options`` any
    other option of the protocol (e.g. ``{"lr": 1e-4, "layer_decay": 0.75}``).

    The train/val/test assignment and every label-fraction subset used are written to ``out/splits.csv``;
    ``splits_file`` (``--splits``) makes the dataset use the splits of such a file (or of a run's
    ``splits.csv``). The run's data settings (intensity, cache) apply when a run is given.

    3D volumes: ``window`` (``--window``, a cube side in voxels, e.g. the run's sub-volume size) makes the encoder
    see windows sliding over each whole (resampled, ``image_size``) volume, ``overlap`` (default 0.25) apart: the
    feature protocols average the windows' features (:func:`medssl.eval.sliding.sliding_features`), ``segment``
    predicts each test volume window by window.

    Encoders come from a run directory, an exported ``encoder.safetensors`` / training checkpoint, and/or a
    random initialisation (``init="random"``); several sources in one call give one comparison table.

    Returns:
        ``{"rows": [...], "summary": [...], "table": markdown}``; also writes ``results.json`` and
        ``results.md`` into ``out``.

    Raises:
        ConfigError: an unknown protocol, option, initialisation or device, bad fractions / seeds, nothing to
            evaluate, or a dataset the protocol cannot use. CheckpointError, DataError, StorageError: an unreadable
            encoder source, dataset or ``out``.
    """
    from medssl.data.specs import open_from_config
    from medssl.encoders import check_inits, data_config, resolve_device, source_encoders
    from medssl.fileio import ensure_output_dir

    t0 = time.perf_counter()
    entry = _protocol_entry(protocol)
    inits = check_inits([init] if isinstance(init, str) else list(init or []))
    if run is None and checkpoint is None and not inits:
        raise ConfigError("nothing to evaluate: give --run DIR, --checkpoint FILE or --init random")
    sw = _check_window(entry, window, overlap)
    if sw is not None and entry.inputs == "images":  # the protocol slides the window itself (segment)
        protocol_options = {**(protocol_options or {}), **sw}
    options = _protocol_options(entry, epochs, protocol_options, label_fractions, seeds)
    dev = resolve_device(device)
    out = ensure_output_dir(out)
    encoders, run_cfg = source_encoders(run, checkpoint, encoder)
    ds = open_from_config(data_config(data, run_cfg, image_size=image_size, task=task, splits=splits_file))
    if ds.labels is None and entry.needs_labels:
        raise ConfigError(f"data {data}: has no labels; evaluation needs a labelled dataset")
    if sw is not None:  # the data first: a 2D dataset fails here, not on a 3D backbone
        _check_window_fits(ds, data, sw["window"], int(_eval_splits(ds, data)["test"][0]))
    skipped = _add_inits(encoders, inits, ds, run_cfg, backbone, stem)
    sources = {"run": str(run) if run else None, "checkpoint": str(checkpoint) if checkpoint else None}
    if entry.whole_dataset is not None:  # every image once, no label fractions x seeds (collapse)
        meta = {"data": data, "encoders": [e for e, _ in encoders], **sources}
        return entry.whole_dataset(encoders, ds, out, batch_size=batch_size, device=dev, meta=meta,
                                   progress=progress)
    splits = _eval_splits(ds, data)
    rows = [row for label, enc in encoders
            for row in _evaluate_encoder(entry, label, enc, ds, splits, list(label_fractions), list(seeds),
                                         out / "predictions", batch_size, dev, progress, options,
                                         sw if entry.inputs == "features" else None)]
    meta = {"data": data, "task": ds.task, "protocol": protocol, "label_fractions": list(label_fractions),
            "seeds": list(seeds), "encoders": [e for e, _ in encoders], **sources, **(sw or {}),
            "seconds": round(time.perf_counter() - t0, 1)}
    if skipped:
        meta["skipped"] = "; ".join(skipped)
    return _write_evaluation(out, rows, meta, ds, splits, label_fractions, seeds)


def _protocol_entry(name: str) -> ProtocolEntry:
    """The registry entry of an evaluation protocol (importing :mod:`medssl.eval` registers the built-in ones)."""
    from medssl.eval.registry import protocol_entry

    return protocol_entry(name)


def _check_window(entry: ProtocolEntry, window: int | None, overlap: float | None) -> dict[str, Any] | None:
    """``{"window", "overlap"}`` for 3D sliding-window evaluation, or ``None`` without ``window``.

    Raises:
        ConfigError: ``overlap`` without ``window``, a window side below 2, an overlap outside ``[0, 1)``, or a
            protocol that evaluates whole images once (``collapse``).
    """
    if window is None:
        if overlap is not None:
            raise ConfigError("--overlap applies with --window (3D sliding-window evaluation)")
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"--window must be a window side of at least 2 voxels, got {window!r}")
    ov = 0.25 if overlap is None else overlap
    if isinstance(ov, bool) or not isinstance(ov, int | float) or not 0.0 <= float(ov) < 1.0:
        raise ConfigError(f"--overlap must be in [0, 1), got {overlap!r}")
    if entry.whole_dataset is not None:
        raise ConfigError(f"--window does not apply to --protocol {entry.name} (it reads every image whole)")
    return {"window": int(window), "overlap": float(ov)}


def _check_window_fits(ds: Any, data: str, window: int, index: int) -> None:
    """A sliding window needs 3D volumes (item ``index`` read as the example) at least ``window`` voxels along
    every axis."""
    shape = tuple(int(s) for s in ds[index]["image"].shape[1:])
    if len(shape) != 3:
        raise ConfigError(f"--window is for 3D volumes; data {data} is 2D")
    if window > min(shape):
        raise ConfigError(f"--window {window} is larger than the volumes ({'x'.join(map(str, shape))} voxels; "
                          "raise --image-size or lower --window)")


def _protocol_options(entry: ProtocolEntry, epochs: int | None, protocol_options: dict[str, Any] | None,
                      label_fractions: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """The protocol's options (``epochs`` among them), checked against the protocol with the fractions and seeds
    before any encoder is loaded."""
    from medssl.eval.protocol import check_fractions_and_seeds, check_options
    from medssl.eval.registry import PROTOCOLS

    if epochs is not None and not entry.trains:
        trainers = " / ".join(e.name for e in PROTOCOLS.entries() if e.trains)
        raise ConfigError(f"--epochs applies to --protocol {trainers}, not {entry.name}")
    options = {**(protocol_options or {}), **({"epochs": int(epochs)} if epochs is not None else {})}
    if entry.whole_dataset is None:
        check_fractions_and_seeds(label_fractions, seeds)
        check_options(entry.name, options)
    return options


def _add_inits(encoders: list[Any], inits: Sequence[str], ds: Any, run_cfg: dict[str, Any], backbone: str | None,
               stem: str | None) -> list[str]:
    """Append the baseline initialisations to ``encoders`` (the run's backbone unless ``backbone`` is given);
    returns the skip notes. Raises ConfigError when nothing at all is left to evaluate."""
    from medssl.encoders import init_encoders

    model_cfg = run_cfg.get("model", {}) or {}
    found, skipped = init_encoders(inits, ds, backbone or model_cfg.get("backbone", "resnet18"),
                                   stem or model_cfg.get("stem", "default"), model_cfg)
    encoders += found
    if not encoders:
        raise ConfigError("nothing to evaluate: " + "; ".join(skipped))
    return skipped


def _eval_splits(ds: Any, data: str) -> dict[str, Any]:
    """``{"train", "val", "test"}`` -> dataset indices; train and test must not be empty."""
    splits = {s: ds.indices(s) for s in ("train", "val", "test")}
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise ConfigError(f"data {data}: needs non-empty train and test splits")
    return splits


def _evaluate_encoder(entry: ProtocolEntry, label: str, enc: Any, ds: Any, splits: dict[str, Any],
                      fractions: list[float], seeds: list[int], predictions_dir: Path, batch_size: int, dev: Any,
                      progress: bool, options: dict[str, Any],
                      sliding: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One encoder's rows: the protocol over fractions x seeds on frozen features (``inputs="features"``: a
    :class:`~medssl.eval.protocol.FeatureSet` with class names and patient ids) or on the images
    (``inputs="images"``: an :class:`~medssl.eval.images.ImageTask`). Test labels and scores of every fraction x
    seed go to ``predictions_dir`` (for ROC / PR curves). ``sliding`` (``window``, ``overlap``): 3D features are
    the mean over sliding windows."""
    from medssl.eval.protocol import features_from_dataset, run_protocol

    enc = enc.to(dev)
    if entry.inputs == "images":  # trains on the images: no frozen features
        from medssl.eval.images import ImageTask

        task: Any = ImageTask.from_dataset(ds, enc, device=dev, splits=splits)
    else:
        sw = {} if sliding is None else {"window": (sliding["window"],) * 3, "overlap": sliding["overlap"]}
        task = features_from_dataset(enc, ds, batch_size=batch_size, device=dev, splits=splits, progress=progress,
                                     **sw)
    rows = [{"encoder": label, **row} for row in run_protocol(task, entry.name, fractions, seeds, encoder_name=label,
                                                              predictions_dir=predictions_dir, progress=progress,
                                                              **options)]
    if progress:
        what = "" if entry.inputs == "images" else " probe"
        print(f"evaluated {label}: {entry.name}{what} on {len(splits['train'])} train / {len(splits['test'])} test "
              "images", flush=True)
    return rows


def _write_evaluation(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], ds: Any, splits: dict[str, Any],
                      label_fractions: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """Write ``results.json`` / ``.md`` / ``.csv`` and ``splits.csv`` (train/val/test and every label-fraction subset
    used); returns ``{"rows", "summary", "table"}``."""
    import numpy as np

    from medssl.data.splits import stratified_fraction, write_split_manifest
    from medssl.eval.results import format_table, summarize, write_results

    write_results(rows, out, meta=meta)
    strat = ds.labels[splits["train"]] if ds.labels is not None else np.zeros(len(splits["train"]), dtype=np.int64)
    subsets = {f"subset:{f:g}:seed{sd}": splits["train"][np.asarray(stratified_fraction(strat, f, sd, 1))]
               for f in label_fractions for sd in seeds}
    write_split_manifest(ds, out / "splits.csv", subsets)
    summary = summarize(rows)
    return {"rows": rows, "summary": summary, "table": format_table(summary)}
