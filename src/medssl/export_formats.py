"""Export a trained encoder in another library's key layout (``medssl export --format timm|torchvision|monai``).

Each format writes the backbone's weights as safetensors whose keys are exactly the ``state_dict`` of the
target library's model, and returns the one line of Python that rebuilds that model and loads the file with
``load_state_dict`` (strict). The rebuilt model takes *normalised* images, ``(x - 0.5) / 0.5`` of ``[0, 1]``
inputs (what :class:`medssl.nn.backbones.Encoder` does before calling the backbone), and returns the same
pooled features as medssl's encoder.

Supported pairs:

* ``timm`` -- every 2D timm backbone (``timm.create_model(name, num_classes=0, in_chans=C, ...)``); the
  CIFAR stem is rebuilt in the snippet.
* ``torchvision`` -- 2D ``resnet18/34/50/101/152`` (timm and torchvision name ResNet modules alike: ``conv1``,
  ``bn1``, ``layer1.0.conv1`` ...; the classifier ``fc`` is replaced by ``Identity``); ``conv1`` is rebuilt for
  1-channel inputs and for the CIFAR stem.
* ``monai`` -- the 3D ResNets ``resnet10_3d/resnet18_3d/resnet34_3d`` onto ``monai.networks.nets.resnet10/18/34``
  (``spatial_dims=3``, ``feed_forward=False``, ``bias_downsample=False``, stride-2 7³ stem or the CIFAR stem).
  medssl's arrays are ``(S, A, R)``, MONAI's ``(R, A, S)``: every 3D kernel's spatial axes are reversed
  (:func:`to_monai_axes`) and the printed MONAI transforms (``Orientation("RAS")``, ``Spacing`` to the recorded
  spacing) give the same features on a volume loaded the MONAI way. The 3D ViT has no faithful one-line MONAI
  counterpart (MONAI's ``ViT`` returns its classification head's output rather than the class token, and its key
  set differs between MONAI versions), so it is refused.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import medssl
from medssl.encoders import (
    load_tensors,
    meta_int,
    meta_value,
    read_metadata,
    require_medssl_metadata,
    run_encoder_file,
)
from medssl.errors import CheckpointError, ConfigError
from medssl.export import write_safetensors
from medssl.fileio import check_output_file

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MONAI_RESNETS = {"resnet10_3d": "resnet10", "resnet18_3d": "resnet18", "resnet34_3d": "resnet34"}
SUPPORTED = ("timm: any 2D timm backbone; torchvision: 2D " + "/".join(TORCHVISION_RESNETS)
             + "; monai: 3D " + "/".join(MONAI_RESNETS))


@dataclass
class ExportedWeights:
    """What :func:`export_weights` wrote: the file, its format, the load snippet and caveats."""

    path: Path
    format: str
    snippet: str
    notes: list[str] = field(default_factory=list)
    preprocess: str | None = None


def _timm_call(meta: dict[str, str]) -> str:
    from medssl.nn.backbones import timm_kwargs

    kwargs = timm_kwargs(meta["model_name"], in_chans=int(meta["in_chans"]), image_size=meta_int(meta, "image_size"),
                         patch_size=meta_int(meta, "patch_size"), global_pool=meta_value(meta, "global_pool"))
    args = ", ".join([repr(meta["model_name"])] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return f"timm.create_model({args})"


def _load_tail(path: Path) -> str:
    return f"model.load_state_dict(st.load_file({str(path)!r})); model.eval()"


State = dict[str, torch.Tensor]


def _to_timm(meta: dict[str, str], state: State, path: Path) -> tuple[State, str]:
    if int(meta.get("spatial_dims", 2)) != 2:
        raise ConfigError(f"--format timm: {meta['model_name']} is a 3D backbone and timm has no 3D models; "
                          f"supported pairs: {SUPPORTED}")
    parts = ["import timm, torch, safetensors.torch as st", f"model = {_timm_call(meta)}"]
    if meta.get("stem") == "cifar":
        out_ch = state["conv1.weight"].shape[0]
        parts += [f"model.conv1 = torch.nn.Conv2d({int(meta['in_chans'])}, {out_ch}, 3, 1, 1, bias=False)",
                  "model.maxpool = torch.nn.Identity()"]
    return state, "; ".join(parts + [_load_tail(path)])


def _to_torchvision(meta: dict[str, str], state: State, path: Path) -> tuple[State, str]:
    name = meta["model_name"]
    if int(meta.get("spatial_dims", 2)) != 2 or name not in TORCHVISION_RESNETS:
        raise ConfigError(f"--format torchvision: no torchvision counterpart for {name} "
                          f"({meta.get('spatial_dims', 2)}D); supported pairs: {SUPPORTED}")
    import torchvision

    # timm's ResNet uses torchvision's module names, so the mapping is the identity on the keys; check it.
    reference = set(getattr(torchvision.models, name)(weights=None).state_dict()) - {"fc.weight", "fc.bias"}
    if set(state) != reference:
        diff = sorted(set(state) ^ reference)[:6]
        raise CheckpointError(f"--format torchvision: the weights of {name} do not match torchvision's keys ({diff})")
    conv = state["conv1.weight"]
    in_ch, out_ch, k = conv.shape[1], conv.shape[0], conv.shape[-1]
    parts = ["import torch, torchvision, safetensors.torch as st", f"model = torchvision.models.{name}()",
             "model.fc = torch.nn.Identity()"]
    if meta.get("stem") == "cifar":
        parts += [f"model.conv1 = torch.nn.Conv2d({in_ch}, {out_ch}, 3, 1, 1, bias=False)",
                  "model.maxpool = torch.nn.Identity()"]
    elif in_ch != 3 or k != 7:
        parts.append(f"model.conv1 = torch.nn.Conv2d({in_ch}, {out_ch}, 7, 2, 3, bias=False)")
    return state, "; ".join(parts + [_load_tail(path)])


def _to_monai(meta: dict[str, str], state: State, path: Path) -> tuple[State, str]:
    name = meta["model_name"]
    if int(meta.get("spatial_dims", 2)) == 3 and name not in MONAI_RESNETS and f"{name}_3d" in MONAI_RESNETS:
        name = f"{name}_3d"
    if int(meta.get("spatial_dims", 2)) != 3 or name not in MONAI_RESNETS:
        raise ConfigError(f"--format monai: no faithful MONAI counterpart for {meta['model_name']} "
                          f"({meta.get('spatial_dims', 2)}D); supported pairs: {SUPPORTED}")
    # medssl's ResNet3d uses the module names of MONAI's ResNet (conv1, bn1, layerN.i.conv1/bn1/conv2/bn2,
    # downsample.0/1); MONAI's downsample conv has a bias unless bias_downsample=False.
    stem = ("conv1_t_size=3, conv1_t_stride=1, no_max_pool=True" if meta.get("stem") == "cifar"
            else "conv1_t_size=7, conv1_t_stride=2")
    call = (f"monai.networks.nets.{MONAI_RESNETS[name]}(spatial_dims=3, n_input_channels={int(meta['in_chans'])}, "
            f"feed_forward=False, bias_downsample=False, {stem})")
    return to_monai_axes(state), "; ".join(["import monai, safetensors.torch as st", f"model = {call}",
                                            _load_tail(path)])


def to_monai_axes(state: State) -> State:
    """medssl's 3D kernels act on ``(D, H, W) = (S, A, R)`` arrays, MONAI's (after ``Orientation("RAS")``) on
    ``(R, A, S)``: every 3D convolution kernel gets its three spatial axes reversed, so that the MONAI model on a
    MONAI-loaded volume computes exactly medssl's features (the 3D ResNets are otherwise symmetric in their axes:
    cubic kernels, equal strides and padding, global average pooling). Other tensors are unchanged."""
    return {k: (v.permute(0, 1, 4, 3, 2).contiguous() if v.ndim == 5 else v) for k, v in state.items()}


def monai_transforms(meta: dict[str, str], intensity: dict | None = None) -> str:
    """The MONAI loading line that gives a 3D encoder exported with ``--format monai`` the input it was trained
    on: ``LoadImage`` + ``EnsureChannelFirst`` + ``Orientation("RAS")`` (medssl's canonical frame with MONAI's
    axis order), ``Spacing`` to the recorded spacing (reversed to MONAI's ``x, y, z``), an intensity map to
    ``[0, 1]`` and the ``(x - 0.5) / 0.5`` normalisation."""
    steps = ["LoadImage(image_only=True)", "EnsureChannelFirst()", 'Orientation(axcodes="RAS")']
    spacing = meta.get("spacing", "native")
    if spacing and spacing != "native":
        zyx = [float(v) for v in spacing.split(",")]
        steps.append(f"Spacing(pixdim=({zyx[2]:g}, {zyx[1]:g}, {zyx[0]:g}), mode=\"bilinear\", "
                     "padding_mode=\"border\")")
    mode = (intensity or {}).get("mode", "auto")
    lo, hi = (intensity or {}).get("percentiles", (0.5, 99.5))
    if mode in ("auto", "percentile"):
        steps.append(f"ScaleIntensityRangePercentiles({float(lo):g}, {float(hi):g}, 0.0, 1.0, clip=True)")
    elif mode == "minmax":
        steps.append("ScaleIntensity(0.0, 1.0)")
    else:
        steps.append(f"Lambda(lambda v: v)  # map to [0, 1] like medssl's data.intensity mode {mode!r}")
    return ("from monai.transforms import Compose, LoadImage, EnsureChannelFirst, Orientation, Spacing, "
            "ScaleIntensityRangePercentiles, ScaleIntensity, Lambda; "
            f"load = Compose([{', '.join(steps)}]); "
            "x = (load(path)[None].float() - 0.5) / 0.5  # (1, C, R, A, S); features = model(x)")


_CONVERTERS: dict[str, Callable[[dict[str, str], State, Path], tuple[State, str]]] = {
    "timm": _to_timm, "torchvision": _to_torchvision, "monai": _to_monai}

FORMATS = tuple(_CONVERTERS)
"""The layouts ``medssl export --format`` writes."""

RUN_FILES = ("encoder*.safetensors", "whitening*.safetensors", "config.yaml", "metrics.csv", "splits.csv",
             "skipped.csv", "report.html", "checkpoints/*", "reconstructions/*", "events*")
"""Names (globs, relative to a run directory) of the files a run writes, existing or not yet."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def owned_by(out: str | Path, source: Path, run: Path | None) -> Path | None:
    """The file of the export's source that writing ``out`` would overwrite, or ``None``.

    ``out`` is such a file when it resolves (``..`` and symbolic links followed) to the source encoder file, to
    any existing file inside the run directory ``run``, or to a name a run writes there (:data:`RUN_FILES`). The
    file is returned as ``run / relative path`` (or ``source``).
    """
    target = Path(out).resolve()
    if target == source.resolve():
        return source
    if run is None:
        return None
    root = run.resolve()
    if not _inside(target, root):
        return None
    rel = target.relative_to(root)
    if target.exists() or any(fnmatch.fnmatchcase(rel.as_posix(), pattern) for pattern in RUN_FILES):
        return run / rel
    return None


def _source(run: str | Path | None, encoder_file: str | Path | None, encoder: str | None) -> tuple[Path, Path | None]:
    """The encoder file to export and the run directory it belongs to (``None`` for a file outside a run)."""
    if (run is None) == (encoder_file is None):
        raise ConfigError("export needs exactly one of --run DIR or --checkpoint encoder.safetensors")
    if run is not None:
        return run_encoder_file(run, encoder), Path(run)
    src = Path(encoder_file)  # type: ignore[arg-type]
    return src, (src.parent if (src.parent / "config.yaml").is_file() else None)


def export_weights(
    out: str | Path, fmt: str, *, run: str | Path | None = None, encoder_file: str | Path | None = None,
    encoder: str | None = None,
) -> ExportedWeights:
    """Write a run's (or an ``encoder.safetensors``'s) backbone in ``fmt``'s key layout to ``out``.

    Args:
        out: output ``.safetensors`` file.
        fmt: ``timm``, ``torchvision`` or ``monai``.
        run: run directory (its ``encoder*.safetensors``).
        encoder_file: an exported medssl encoder file instead of a run.
        encoder: which encoder of a multi-encoder run (``cnn``, ``vit`` ...).

    Returns:
        The file written and the one-line snippet that loads it (strict) into the target library's model.

    Raises:
        ConfigError: unknown format, an unsupported (backbone, format) pair (naming the supported ones), or an
            ``out`` that is a file of the source run (its encoder, config, checkpoints ..., see :func:`owned_by`).
        CheckpointError: missing or unreadable run / encoder file.
        StorageError: the disk refused the write.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    src, run_dir = _source(run, encoder_file, encoder)
    meta = read_metadata(src)
    require_medssl_metadata(meta, src)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: expected a .safetensors file name")
    owned = owned_by(out, src, run_dir)
    if owned is not None:
        where = f"of run {run_dir}" if run_dir is not None else "being exported"
        same = "" if str(owned) == str(out) else f" (that is {owned})"
        raise ConfigError(f"--out {out}{same}: a file {where} must not be overwritten; export to a path outside "
                          "the run directory")
    check_output_file(out)
    state, snippet = _CONVERTERS[fmt](meta, load_tensors(src), out)
    notes = []
    if meta.get("whitening"):
        notes.append(f"the encoder ends with a whitening layer ({meta['whitening']} next to {src.name}); it is not "
                     "part of the exported backbone: apply it as torch.nn.Linear(d, d) loaded from that file")
    metadata = {"format": fmt, "source": str(src), "medssl_version": medssl.__version__,
                "model_name": meta["model_name"], "in_chans": meta["in_chans"],
                "input": "normalised images: (x - 0.5) / 0.5 of [0, 1] inputs", "load": snippet}
    preprocess = None
    if fmt == "monai":
        intensity = _run_intensity(run_dir)
        preprocess = monai_transforms(meta, intensity)
        spacing = meta.get("spacing", "native")
        metadata.update({
            "axis_order": "RAS",
            "axis_note": "spatial axes (R, A, S) as MONAI LoadImage + Orientation('RAS') gives; the kernels are "
                         "medssl's (S, A, R) kernels with their spatial axes reversed",
            "medssl_axis_order": meta.get("axis_order", "SAR"),
            "orientation": "RAS",
            "spacing_xyz": spacing if spacing == "native" else ",".join(reversed(spacing.split(","))),
            "transforms": preprocess})
        notes.append("3D axes: MONAI arrays are (R, A, S), medssl's (S, A, R); the kernels were permuted, so load "
                     "volumes with the transforms above (not medssl's arrays) to get medssl's features")
    write_safetensors(out, state, metadata)
    return ExportedWeights(out, fmt, snippet, notes, preprocess)


def _run_intensity(run_dir: Path | None) -> dict | None:
    """The ``data.intensity`` section of the run's config.yaml, if there is one."""
    if run_dir is None:
        return None
    from medssl.encoders import run_config

    data = run_config(run_dir).get("data")
    intensity = data.get("intensity") if isinstance(data, dict) else None
    return intensity if isinstance(intensity, dict) else None


def describe(result: ExportedWeights) -> str:
    """What ``medssl export`` prints: the file, the load snippet and the input convention."""
    lines = [f"wrote {result.format} weights to {result.path}", "load with:", f"  {result.snippet}",
             "input: images in [0, 1] normalised as (x - 0.5) / 0.5; output: pooled features (B, D)"]
    if result.preprocess:
        lines += ["volumes, loaded the MONAI way (path = your NIfTI file):", f"  {result.preprocess}"]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
