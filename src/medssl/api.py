"""The library entry points: :func:`pretrain` and :func:`evaluate`. The CLI is a thin wrapper over them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from medssl.config import PretrainConfig, build_config, load_yaml, parse_set
from medssl.errors import CheckpointError, ConfigError

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

    ``flags`` are the CLI's named options: backbone, image_size, batch_size, epochs, max_steps, lr, seed,
    devices, precision, skip_bad, splits, cache (``None`` = not given).
    """
    layers: list[dict[str, Any]] = [base or {}]
    if config is not None:
        layers.append(load_yaml(resolve_recipe(config)))
    explicit: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            explicit.setdefault(section, {})[key] = value

    if method is not None:
        explicit["method"] = {"name": method}
    put("data", "spec", data)
    put("model", "backbone", flags.pop("backbone", None))
    put("data", "image_size", flags.pop("image_size", None))
    put("train", "batch_size", flags.pop("batch_size", None))
    epochs = flags.pop("epochs", None)
    max_steps = flags.pop("max_steps", None)
    if epochs is not None and max_steps is not None:
        raise ConfigError("give either --epochs or --max-steps, not both")
    if epochs is not None:
        put("train", "epochs", epochs)
        explicit.setdefault("train", {})["max_steps"] = None
    put("train", "max_steps", max_steps)
    put("optim", "lr", flags.pop("lr", None))
    put("train", "seed", flags.pop("seed", None))
    put("train", "devices", flags.pop("devices", None))
    put("train", "precision", flags.pop("precision", None))
    put("data", "skip_bad", flags.pop("skip_bad", None) or None)
    put("data", "splits", flags.pop("splits", None))
    put("data", "cache", flags.pop("cache", None))
    if flags:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(flags))}")
    layers.append(explicit)
    layers.append(parse_set(overrides))
    # A method chosen explicitly replaces the recipe's method section only when the name differs.
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
    return build_config(*cleaned)


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
        **flags: backbone, image_size, batch_size, epochs, max_steps, lr, seed, devices, precision, skip_bad.
    """
    from medssl.engine.trainer import pretrain as _pretrain

    base: dict[str, Any] | None = None
    saved = Path(out) / "config.yaml"
    if resume and saved.is_file():
        base = load_yaml(saved)
    if base is None and method is None and config is None:
        raise ConfigError("no method given (--method NAME or a --config recipe)")
    cfg = make_config(method=method, data=data, config=config, overrides=overrides, base=base, **flags)
    return _pretrain(cfg, out, resume=resume, force=force, progress=progress)


def _run_encoders(run: Path, which: str | None) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    from medssl.export import load_encoder

    if not run.is_dir():
        raise CheckpointError(f"run directory {run}: not found")
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    method_name = (cfg.get("method") or {}).get("name", run.name)
    files = sorted(run.glob("encoder*.safetensors"))
    if not files:
        raise CheckpointError(f"run directory {run}: no encoder*.safetensors (did the run finish?)")
    out = []
    for f in files:
        enc_name = f.stem.removeprefix("encoder").lstrip("_") or "backbone"
        if which not in (None, "both", "all") and enc_name != which:
            continue
        label = method_name if len(files) == 1 else f"{method_name}:{enc_name}"
        out.append((label, load_encoder(f)))
    if not out:
        raise ConfigError(f"run {run} has no encoder '{which}' (has: {', '.join(f.stem for f in files)})")
    return out, cfg


def _checkpoint_encoders(path: Path) -> list[tuple[str, Any]]:
    from medssl.export import load_encoder

    if path.suffix == ".safetensors":
        return [(path.stem, load_encoder(path))]
    if path.suffix == ".ckpt":
        from medssl.data.specs import open_from_config
        from medssl.engine.checkpoint import load_checkpoint
        from medssl.engine.trainer import pretrain_indices
        from medssl.methods import DataInfo, build_method
        from medssl.nn.backbones import Encoder

        ckpt = load_checkpoint(path)
        cfg = build_config(ckpt["config"])
        ds = open_from_config(cfg.data, cache=False)
        if cfg.data.skip_bad:
            from medssl.data.manifest import drop_bad

            ds = drop_bad(ds)
        info = DataInfo(in_chans=ds.in_chans, spatial_dims=ds.spatial_dims,
                        image_size=int(cfg.data.image_size or ds.image_size),
                        num_samples=len(pretrain_indices(ds, cfg.data.split)))
        method = build_method(cfg, info)
        try:
            method.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}: does not fit its own config: {e}") from None
        encs = method.encoders()
        return [(f"{cfg.method_name}@{ckpt['step']}" + (f":{n}" if len(encs) > 1 else ""), Encoder(m).eval())
                for n, m in encs.items()]
    raise ConfigError(f"--checkpoint {path}: expected an encoder .safetensors or a training .ckpt")


INITS = ("random", "imagenet")
"""Baseline initialisations ``evaluate(init=...)`` accepts."""


def _init_encoders(inits: Sequence[str], ds: Any, backbone: str, stem: str,
                   model_cfg: dict[str, Any]) -> tuple[list[tuple[str, Any]], list[str]]:
    """The ``random-init`` / ``imagenet-init`` baseline encoders, and a skip message for each one that cannot be
    built here (ImageNet weights offline, or for a 3D backbone); skips are also logged to stderr."""
    import logging

    from medssl.export import WeightsUnavailable, imagenet_encoder, random_encoder

    out: list[tuple[str, Any]] = []
    skipped: list[str] = []
    for name in dict.fromkeys(inits):
        if name == "random":
            out.append(("random-init", random_encoder(
                backbone, in_chans=ds.in_chans, image_size=ds.image_size, stem=stem, spatial_dims=ds.spatial_dims,
                seed=0, patch_size=model_cfg.get("patch_size"), global_pool=model_cfg.get("global_pool"))))
            continue
        try:
            out.append(("imagenet-init", imagenet_encoder(
                backbone, in_chans=ds.in_chans, image_size=ds.image_size, spatial_dims=ds.spatial_dims,
                patch_size=model_cfg.get("patch_size"), global_pool=model_cfg.get("global_pool"))))
        except WeightsUnavailable as e:
            skipped.append(f"imagenet-init: {e}; skipped")
            logging.getLogger("medssl").warning("%s; skipped", e)
    return out, skipped


TRAINING_PROTOCOLS = ("finetune", "segment")
"""Protocols that train on images (``--epochs`` sets their length); the others work on frozen features."""


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
) -> dict[str, Any]:
    """Evaluate encoders on a labelled dataset at several label fractions and seeds.

    ``finetune`` and ``segment`` train on the images (a fresh copy of each encoder per fraction and seed);
    ``epochs`` (``--epochs``) is their training length and ``protocol_options`` any other option of the
    protocol (e.g. ``{"lr": 1e-4, "layer_decay": 0.75}``).

    The train/val/test assignment and every label-fraction subset used are written to ``out/splits.csv``;
    ``splits_file`` (``--splits``) makes the dataset use the splits of such a file (or of a run's
    ``splits.csv``). The run's data settings (intensity, cache) apply when a run is given.

    Encoders come from a run directory, an exported ``encoder.safetensors`` / training checkpoint, and/or a
    random initialisation (``init="random"``); several sources in one call give one comparison table.

    Returns:
        ``{"rows": [...], "summary": [...], "table": markdown}``; also writes ``results.json`` and
        ``results.md`` into ``out``.
    """
    import numpy as np
    import torch

    from medssl.config import DataConfig, build_dataclass
    from medssl.data.specs import open_from_config
    from medssl.data.splits import stratified_fraction, write_split_manifest
    from medssl.eval.features import extract_features
    from medssl.eval.protocol import FeatureSet, run_protocol
    from medssl.eval.results import format_table, summarize, write_results

    t0 = time.perf_counter()
    inits = [init] if isinstance(init, str) else list(init or [])
    for i in inits:
        if i not in INITS:
            raise ConfigError(f"--init {i}: expected one of {', '.join(INITS)}")
    if run is None and checkpoint is None and not inits:
        raise ConfigError("nothing to evaluate: give --run DIR, --checkpoint FILE or --init random")
    encoders: list[tuple[str, Any]] = []
    run_cfg: dict[str, Any] = {}
    if run is not None:
        found, run_cfg = _run_encoders(Path(run), encoder)
        encoders += found
    if checkpoint is not None:
        encoders += _checkpoint_encoders(Path(checkpoint))
    model_cfg = run_cfg.get("model", {})
    size = image_size or (run_cfg.get("data", {}) or {}).get("image_size")
    data_section = {k: v for k, v in (run_cfg.get("data", {}) or {}).items() if k in ("intensity", "cache", "cache_dir")}
    dcfg = build_dataclass(DataConfig, {**data_section, "spec": data, "image_size": size, "task": task,
                                        "splits": str(splits_file) if splits_file else None}, where="data")
    ds = open_from_config(dcfg)
    if ds.labels is None and protocol not in ("collapse", "segment"):
        raise ConfigError(f"data {data}: has no labels; evaluation needs a labelled dataset")
    image_protocol = protocol in TRAINING_PROTOCOLS
    if epochs is not None and not image_protocol:
        raise ConfigError(f"--epochs applies to --protocol finetune / segment, not {protocol}")
    options = {**(protocol_options or {}), **({"epochs": int(epochs)} if epochs is not None else {})}
    found_inits, skipped = _init_encoders(inits, ds, backbone or model_cfg.get("backbone", "resnet18"),
                                          stem or model_cfg.get("stem", "default"), model_cfg)
    encoders += found_inits
    if not encoders:
        raise ConfigError("nothing to evaluate: " + "; ".join(skipped))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if protocol == "collapse":  # spectrum, effective rank and std of the features of every image; no labels
        from medssl.eval.collapse import evaluate_collapse

        meta = {"data": data, "encoders": [e for e, _ in encoders], "run": str(run) if run else None,
                "checkpoint": str(checkpoint) if checkpoint else None}
        return evaluate_collapse(encoders, ds, out, batch_size=batch_size, device=dev, meta=meta, progress=progress)
    splits = {s: ds.indices(s) for s in ("train", "val", "test")}
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise ConfigError(f"data {data}: needs non-empty train and test splits")
    rows: list[dict[str, Any]] = []
    # test labels and scores of every fraction x seed, for ROC / PR curves (medssl report) and the user's own analysis
    predictions_dir = Path(out) / "predictions"
    for label, enc in encoders:
        enc = enc.to(dev)
        if image_protocol:  # trains on the images: no frozen features
            from medssl.eval.images import ImageTask

            image_task = ImageTask.from_dataset(ds, enc, device=dev, splits=splits)
            for row in run_protocol(image_task, protocol, list(label_fractions), list(seeds), encoder_name=label,
                                    predictions_dir=predictions_dir, **options):
                rows.append({"encoder": label, **row})
            if progress:
                print(f"evaluated {label}: {protocol} on {len(splits['train'])} train / {len(splits['test'])} test "
                      "images", flush=True)
            continue
        feats = {s: extract_features(enc, ds, idx, batch_size=batch_size, device=dev) if len(idx) else None
                 for s, idx in splits.items()}
        fs = FeatureSet(
            train_x=feats["train"], train_y=ds.labels[splits["train"]],
            test_x=feats["test"], test_y=ds.labels[splits["test"]],
            val_x=feats["val"], val_y=ds.labels[splits["val"]] if feats["val"] is not None else None,
            multilabel=ds.multilabel, num_classes=ds.num_classes,
            test_groups=ds.patient_ids[splits["test"]],
        )
        for row in run_protocol(fs, protocol, list(label_fractions), list(seeds), encoder_name=label,
                                predictions_dir=predictions_dir, **options):
            rows.append({"encoder": label, **row})
        if progress:
            print(f"evaluated {label}: {protocol} probe on {len(splits['train'])} train / {len(splits['test'])} test images",
                  flush=True)
    meta = {
        "data": data, "task": ds.task, "protocol": protocol, "label_fractions": list(label_fractions),
        "seeds": list(seeds), "encoders": [e for e, _ in encoders], "run": str(run) if run else None,
        "checkpoint": str(checkpoint) if checkpoint else None, "seconds": round(time.perf_counter() - t0, 1),
    }
    if skipped:
        meta["skipped"] = "; ".join(skipped)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out, meta=meta)
    strat = ds.labels[splits["train"]] if ds.labels is not None else np.zeros(len(splits["train"]), dtype=np.int64)
    subsets = {f"subset:{f:g}:seed{sd}": splits["train"][np.asarray(stratified_fraction(strat, f, sd, 1))]
               for f in label_fractions for sd in seeds}
    write_split_manifest(ds, out / "splits.csv", subsets)
    summary = summarize(rows)
    return {"rows": rows, "summary": summary, "table": format_table(summary)}
