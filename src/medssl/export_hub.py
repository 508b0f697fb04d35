"""Hugging Face Hub folder of a trained encoder (``medssl export --format hf-hub --out DIR [--push ORG/NAME]``).

The folder is what timm's hub loader reads, so the encoder loads with no medssl installed:

* ``config.json`` -- timm's layout (written by :func:`timm.models._hub.save_config_for_hf`): ``architecture``,
  ``num_features``, ``model_args`` (``in_chans``, ``img_size`` / ``patch_size`` / ``global_pool`` of ViTs, ...)
  and a ``pretrained_cfg`` with the input size and medssl's normalisation (``mean = std = 0.5`` per channel of
  ``[0, 1]`` images), plus a ``medssl`` entry recording the encoder file's metadata;
* ``model.safetensors`` -- the backbone's ``state_dict`` in timm's key layout (``num_classes=0``: pooled features);
* ``README.md`` -- a model card: YAML front matter (``library_name: timm``, ``license``, tags), how to load it, the
  training config, a summary of the data spec, the metrics tables of the run's evaluations (``RUN/eval*``).

Loading::

    model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)            # after --push
    model = timm.create_model("local-dir:DIR", pretrained=True)               # the folder itself
    model = timm.create_model(ARCH, pretrained=True, num_classes=0, in_chans=C,
                              pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))

Only 2D timm backbones have a timm counterpart (3D encoders: ``--format onnx`` or ``--format monai``). A ResNet
trained with the CIFAR stem (``model.stem=cifar``) is written too, but timm cannot rebuild that stem from a
config: the model card gives the two lines that do. A Med-MoCo whitening layer is not part of the timm model; the
folder holds it as ``whitening.safetensors`` (an ``nn.Linear(d, d)``), named in the card.

``--push ORG/NAME`` uploads the folder with :mod:`huggingface_hub` (``HF_TOKEN`` or ``huggingface-cli login``);
without network or token it fails with one line (exit code 2) and leaves the folder in place.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import medssl
from medssl.encoders import load_tensors, meta_int, meta_value, read_metadata, require_medssl_metadata
from medssl.errors import CheckpointError, ConfigError, MedsslError
from medssl.export import write_safetensors
from medssl.export_formats import ExportedWeights, _source, owned_by
from medssl.fileio import atomic_write_text, ensure_output_dir
from medssl.transforms.intensity import MEAN, STD

HUB_FILES = ("config.json", "model.safetensors", "README.md", "whitening.safetensors")
"""What an hf-hub export writes (``whitening.safetensors`` only for whitened encoders)."""

#: ``pretrained_cfg`` fields that describe timm's own ImageNet weights, not these
_SOURCE_FIELDS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "origin_url", "paper_ids",
                  "paper_name", "notes", "state_dict", "license")
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PushError(MedsslError):
    """Uploading to the Hugging Face Hub failed (no network, no token, no permission)."""


def check_license(value: str) -> str:
    """A Hub license identifier (lower-case SPDX-like: ``apache-2.0``, ``cc-by-nc-4.0``, ``other``)."""
    if not isinstance(value, str) or not _LICENSE.match(value):
        raise ConfigError(f"--license {value!r}: expected a Hub license identifier such as apache-2.0, cc-by-4.0 "
                          "or other")
    return value


def check_repo_id(value: str) -> str:
    """``ORG/NAME`` of a Hub model repository."""
    if not isinstance(value, str) or not _REPO_ID.match(value) or len(value) > 96 or ".." in value:
        raise ConfigError(f"--push {value!r}: expected ORG/NAME (letters, digits, '.', '_', '-')")
    return value


def _timm_model(meta: dict[str, str], state: dict[str, Any], src: Path) -> Any:
    """The timm model of the encoder file, with its weights loaded strictly (proves timm can rebuild it)."""
    import timm

    from medssl.nn.backbones import apply_cifar_stem, timm_kwargs

    name = meta["model_name"]
    if not timm.is_model(name):
        raise ConfigError(f"--format hf-hub: {name} is not a timm model")
    kwargs = timm_kwargs(name, in_chans=int(meta["in_chans"]), image_size=meta_int(meta, "image_size"),
                         patch_size=meta_int(meta, "patch_size"), global_pool=meta_value(meta, "global_pool"))
    model = timm.create_model(name, **kwargs)
    if meta.get("stem") == "cifar":
        apply_cifar_stem(model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{src}: weights do not fit timm's {name}: {str(e).splitlines()[0]}") from None
    return model


def hub_config(model: Any, meta: dict[str, str], license: str) -> dict[str, Any]:
    """``config.json``: timm's own export of ``model``'s config with medssl's input size and normalisation."""
    from timm.models._hub import save_config_for_hf

    chans, size = int(meta["in_chans"]), meta_int(meta, "image_size")
    data_config: dict[str, Any] = {"mean": (MEAN,) * chans, "std": (STD,) * chans, "crop_pct": 1.0,
                                   "interpolation": "bilinear"}
    if size is not None:
        data_config["input_size"] = (chans, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        save_config_for_hf(model, str(path), data_config=data_config)
        cfg = json.loads(path.read_text())
    pre = cfg["pretrained_cfg"]
    for key in _SOURCE_FIELDS:
        pre.pop(key, None)
    pre["license"] = license
    cfg["medssl"] = {"version": medssl.__version__, "input": "images in [0, 1], normalised (x - 0.5) / 0.5",
                     **{k: v for k, v in meta.items() if k not in ("medssl_version", "whitening")}}
    return cfg


def _method_name(run_dir: Path | None) -> str:
    """The run's method (``method.name`` of its config.yaml), or ``self-supervised`` when unknown."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return "self-supervised"
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        return str((cfg.get("method") or {}).get("name") or "self-supervised")
    except (OSError, yaml.YAMLError, AttributeError):
        return "self-supervised"


def _yaml_block(text: str) -> str:
    return "```yaml\n" + text.rstrip("\n") + "\n```"


def _data_summary(run_dir: Path | None) -> str:
    """The data section of the run's config and the split sizes of its ``splits.csv``."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return "_The encoder file was exported outside a run directory: no data record._"
    import csv

    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    lines = [f"- **spec**: `{data.get('spec')}`", f"- **image size**: {data.get('image_size')}",
             f"- **split read for pretraining**: {data.get('split')}"]
    if data.get("task"):
        lines.append(f"- **task**: {data.get('task')}")
    splits = run_dir / "splits.csv"
    if splits.is_file():
        counts: dict[str, int] = {}
        with splits.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                counts[row.get("split", "?")] = counts.get(row.get("split", "?"), 0) + 1
        lines.append("- **items per split** (splits.csv): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def _metrics_tables(run_dir: Path | None) -> str:
    """Markdown tables of every evaluation under ``RUN/eval*`` (their ``results.json`` summaries)."""
    if run_dir is None:
        return "_No evaluation found._"
    from medssl.eval.results import format_table
    from medssl.report.html import find_eval_dirs

    parts = []
    for d in find_eval_dirs(run_dir):
        try:
            payload = json.loads((d / "results.json").read_text(encoding="utf-8"))
            meta = payload.get("meta") or {}
            head = f"**{d.relative_to(run_dir)}** — protocol {meta.get('protocol', '?')} on `{meta.get('data', '?')}`"
            parts.append(head + "\n\n" + format_table(payload.get("summary") or []))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            parts.append(f"_{d}: unreadable results.json ({type(e).__name__})_")
    return "\n\n".join(parts) if parts else ("_No evaluation found (`medssl evaluate --run RUN --out RUN/eval ...` "
                                             "adds one)._")


def model_card(cfg: dict[str, Any], meta: dict[str, str], run_dir: Path | None, license: str,
               repo_id: str | None) -> str:
    """``README.md``: front matter, loading, training config, data summary, metrics, limitations."""
    arch, chans = cfg["architecture"], int(meta["in_chans"])
    args = {k: v for k, v in (cfg.get("model_args") or {}).items() if k not in ("num_classes", "in_chans")}
    extra = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in args.items())
    hub_name = repo_id or "ORG/NAME"
    front = ["---", "library_name: timm", f"license: {license}", "tags:", "- image-feature-extraction", "- timm",
             "- medssl", "- self-supervised", "- medical-imaging", "pipeline_tag: image-feature-extraction", "---"]
    load = [f"model = timm.create_model('hf-hub:{hub_name}', pretrained=True)  # or 'local-dir:PATH/TO/FOLDER'",
            f"# or: timm.create_model({arch!r}, pretrained=True, num_classes=0, in_chans={chans}{extra},",
            "#                         pretrained_cfg_overlay=dict(file='model.safetensors'))"]
    if meta.get("stem") == "cifar":
        load = [f"model = timm.create_model({arch!r}, num_classes=0, in_chans={chans}{extra})",
                f"model.conv1 = torch.nn.Conv2d({chans}, model.conv1.out_channels, 3, 1, 1, bias=False)",
                "model.maxpool = torch.nn.Identity()  # the CIFAR stem, which timm cannot build from config.json",
                "model.load_state_dict(safetensors.torch.load_file('model.safetensors'))"]
    size = meta.get("image_size", "?")
    training = "_not recorded_"
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        training = _yaml_block((run_dir / "config.yaml").read_text(encoding="utf-8"))
    whitening = ""
    if meta.get("whitening"):
        whitening = ("\nThe encoder was trained with a whitening layer on the pooled features (Med-MoCo); it is not "
                     "part of the timm model. Apply it as `lin = torch.nn.Linear(d, d)` loaded from "
                     "`whitening.safetensors`: `features = lin(model(x))`.\n")
    lines = front + [
        "", f"# {arch} pretrained with medssl ({_method_name(run_dir)})", "",
        f"A {arch} image encoder ({chans} input channel{'s' if chans != 1 else ''}, {size} px) pretrained "
        "self-supervised with medssl; it returns pooled features "
        f"({cfg.get('num_features')} wide), no classifier.", "",
        "## How to load", "", "```python", "import timm, torch, safetensors.torch", *load,
        "model.eval()", f"x = torch.rand(2, {chans}, {size}, {size})   # images in [0, 1]",
        f"features = model((x - {MEAN}) / {STD})                    # (2, {cfg.get('num_features')})", "```", "",
        f"Inputs are images scaled to [0, 1] and normalised with mean {MEAN} and std {STD} per channel "
        "(`timm.data.resolve_data_config({}, model=model)` gives the same from config.json)." + whitening, "",
        "## Training data", "", _data_summary(run_dir), "",
        "## Evaluation", "", _metrics_tables(run_dir), "",
        "## Training configuration", "", training, "",
        "## License and limitations", "",
        f"Weights released under `{license}`. Check that the license of the training data allows it. This encoder is a "
        "research artefact, not a medical device: validate it on your own data before any use.",
    ]
    return "\n".join(lines) + "\n"


def _check_out_dir(out: Path, src: Path, run_dir: Path | None) -> None:
    if run_dir is not None and out.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out}: is the run directory itself; export to a folder of its own")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; --format hf-hub writes a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in HUB_FILES and p.name != ".gitattributes")
        if foreign:
            raise ConfigError(f"--out {out}: the folder holds other files ({', '.join(foreign[:4])}); export into an "
                              "empty or new folder")
    for name in HUB_FILES:
        if owned_by(out / name, src, run_dir) is not None:
            raise ConfigError(f"--out {out}: {name} would overwrite a file of the run; export outside the run")


def export_hf_hub(out: str | Path, *, run: str | Path | None = None, encoder_file: str | Path | None = None,
                  encoder: str | None = None, license: str = "other", push: str | None = None) -> ExportedWeights:
    """Write the Hub folder of a run's (or an ``encoder.safetensors``'s) encoder; optionally upload it.

    Args:
        out: the folder (created; may hold an earlier hf-hub export, nothing else).
        run: run directory; or ``encoder_file``: an exported medssl encoder.
        encoder: which encoder of a multi-encoder run.
        license: the card's ``license`` (a Hub identifier; default ``other``: the data's terms decide).
        push: ``ORG/NAME``: upload the folder to that Hub model repository afterwards.

    Raises:
        ConfigError: a 3D or non-timm encoder, a bad ``out`` / ``license`` / ``push``.
        CheckpointError: missing or unreadable run / encoder file.
        PushError: the upload failed (the folder is written all the same).
        StorageError: the disk refused a write.
    """
    check_license(license)
    if push is not None:
        check_repo_id(push)
    src, run_dir = _source(run, encoder_file, encoder)
    meta = read_metadata(src)
    require_medssl_metadata(meta, src)
    if int(meta.get("spatial_dims", 2)) != 2:
        raise ConfigError(f"--format hf-hub: {meta['model_name']} is a 3D encoder and timm has no 3D models; use "
                          "--format onnx (any encoder) or --format monai (3D ResNets)")
    out = Path(out)
    _check_out_dir(out, src, run_dir)
    state = load_tensors(src)
    model = _timm_model(meta, state, src)
    cfg = hub_config(model, meta, license)
    ensure_output_dir(out)
    write_safetensors(out / "model.safetensors", state, {"format": "pt", "medssl_version": medssl.__version__,
                                                          "model_name": meta["model_name"]})
    notes = []
    if meta.get("whitening"):
        wsrc = src.parent / meta["whitening"]
        if not wsrc.is_file():
            raise CheckpointError(f"{src}: names the whitening file {meta['whitening']}, which is missing")
        write_safetensors(out / "whitening.safetensors", load_tensors(wsrc), read_metadata(wsrc))
        notes.append("the whitening layer is in whitening.safetensors (not part of the timm model; see README.md)")
    else:
        (out / "whitening.safetensors").unlink(missing_ok=True)
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    atomic_write_text(out / "README.md", model_card(cfg, meta, run_dir, license, push))
    if meta.get("stem") == "cifar":
        notes.append("CIFAR stem: timm cannot rebuild it from config.json; README.md shows the two lines that do")
    snippet = f"timm.create_model('local-dir:{out}', pretrained=True)"
    if push is not None:
        url = push_folder(out, push)
        notes.append(f"uploaded to {url}")
        snippet = f"timm.create_model('hf-hub:{push}', pretrained=True)"
    return ExportedWeights(out, "hf-hub", snippet, notes)


def push_folder(folder: Path, repo_id: str) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if missing); returns its URL.

    Raises:
        PushError: huggingface_hub is missing, or the Hub cannot be reached / refuses (one line, the cause named).
    """
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise PushError("--push needs huggingface_hub: pip install 'medssl[hub]'") from None
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"medssl {medssl.__version__} export")
    except Exception as e:  # network, auth and HTTP errors come in many types
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise PushError(f"--push {repo_id}: upload to the Hugging Face Hub failed ({type(e).__name__}: {first}); the "
                        f"folder {folder} is complete: upload it later with `huggingface-cli upload {repo_id} "
                        f"{folder}`") from None
    return f"https://huggingface.co/{repo_id}"


def describe_hub(result: ExportedWeights) -> str:
    """What ``medssl export --format hf-hub`` prints."""
    lines = [f"wrote a Hugging Face Hub folder to {result.path} ({', '.join(HUB_FILES[:3])})", "load with:",
             f"  import timm; model = {result.snippet}",
             "input: images in [0, 1] normalised as (x - 0.5) / 0.5; output: pooled features (B, D)"]
    return "\n".join(lines + [f"note: {n}" for n in result.notes])
