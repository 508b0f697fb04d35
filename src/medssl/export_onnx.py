"""ONNX export of a trained encoder (``medssl export --format onnx --out encoder.onnx``).

The exported graph is medssl's whole :class:`~medssl.nn.backbones.Encoder`: ``[0, 1]`` images in (input
``image``, shape ``(batch, C, H, W)`` or ``(batch, C, D, H, W)``), the input normalisation, the backbone and, for
an encoder that ends with a whitening layer (Med-MoCo), the whitening; pooled features out (output ``features``,
``(batch, dim)``). The batch axis is dynamic; the other axes are the run's (``image_size`` of the encoder file),
because ViTs have position embeddings of that grid. 2D and 3D CNNs and ViTs export alike.

PyTorch's TorchScript-based exporter is used (``dynamo=False``, opset 17): it needs only the ``onnx`` package,
whereas the ``torch.export``-based one also needs ``onnxscript``. When ``onnxruntime`` is installed
(``pip install 'medssl[onnx]'``) the written file is run on a batch of random images and its features are
compared with PyTorch's; the largest difference is reported (and a difference above ``1e-3`` is an error).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

import medssl
from medssl.encoders import load_encoder, meta_int, read_metadata, require_medssl_metadata
from medssl.errors import ConfigError, MedsslError, StorageError
from medssl.export_formats import ExportedWeights, _source, owned_by
from medssl.fileio import atomic_write_bytes, check_output_file, ensure_output_dir

OPSET = 17
#: largest |onnxruntime − PyTorch| accepted by the self-check (the test asks for 1e-4)
CHECK_TOLERANCE = 1e-3


def input_shape(meta: dict[str, str], batch: int = 1) -> tuple[int, ...]:
    """``(batch, C, H, W)`` / ``(batch, C, D, H, W)`` of the encoder described by ``meta``.

    Raises:
        ConfigError: the file records no ``image_size`` (so the input grid is unknown).
    """
    size = meta_int(meta, "image_size")
    if size is None:
        raise ConfigError("--format onnx: the encoder file records no image_size, so the input shape is unknown")
    dims = int(meta.get("spatial_dims", 2))
    return (batch, int(meta["in_chans"]), *([size] * dims))


def _with_metadata(data: bytes, props: dict[str, str]) -> bytes:
    """The serialised ONNX model with ``props`` as its ``metadata_props``."""
    import onnx

    model = onnx.load_from_string(data)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return model.SerializeToString()


def onnxruntime_max_diff(path: str | Path, model: torch.nn.Module, shape: tuple[int, ...], seed: int = 0) -> float:
    """Run ``path`` with onnxruntime on random ``[0, 1]`` images of ``shape``; the largest absolute difference
    from ``model``'s features."""
    import numpy as np
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen)
    with torch.no_grad():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        raise MedsslError(f"{path}: onnxruntime returned features of shape {got.shape}, PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def export_onnx(out: str | Path, *, run: str | Path | None = None, encoder_file: str | Path | None = None,
                encoder: str | None = None, check: bool = True) -> ExportedWeights:
    """Write a run's (or an ``encoder.safetensors``'s) encoder as an ONNX model with a dynamic batch axis.

    Args:
        out: the ``.onnx`` file.
        run: run directory; or ``encoder_file``: an exported medssl encoder.
        encoder: which encoder of a multi-encoder run.
        check: when onnxruntime is installed, compare its features with PyTorch's (batch of 2).

    Raises:
        ConfigError: ``out`` is not an ``.onnx`` name or is a file of the source run; the exporter cannot trace
            the model; onnxruntime's features differ from PyTorch's by more than :data:`CHECK_TOLERANCE`.
        CheckpointError: missing or unreadable run / encoder file.
        StorageError: the disk refused the write.
    """
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("--format onnx needs the onnx package: pip install 'medssl[onnx]'")
    src, run_dir = _source(run, encoder_file, encoder)
    meta = read_metadata(src)
    require_medssl_metadata(meta, src)
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: expected a .onnx file name")
    if owned_by(out, src, run_dir) is not None:
        raise ConfigError(f"--out {out}: a file of run {run_dir or src} must not be overwritten; export to a path "
                          "outside the run directory")
    check_output_file(out)
    shape = input_shape(meta)
    ensure_output_dir(out.parent)
    model = load_encoder(src).eval()
    example = torch.rand((2, *shape[1:]))
    tmp = out.with_name(f".{out.name}.export")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["features"],
                              dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
        data = _with_metadata(tmp.read_bytes(), {"medssl_version": medssl.__version__, "source": str(src),
                                                  **{k: meta[k] for k in ("model_name", "in_chans", "image_size",
                                                                          "spatial_dims", "stem") if k in meta},
                                                  "input": "images in [0, 1], normalisation inside the graph"})
    except OSError as e:
        raise StorageError(f"cannot write {out}: {e}") from None
    except Exception as e:  # the exporter's errors have many types
        raise ConfigError(f"--format onnx: PyTorch cannot export {meta['model_name']} to ONNX "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_bytes(out, data)
    notes = []
    if check and importlib.util.find_spec("onnxruntime") is not None:
        diff = onnxruntime_max_diff(out, model, (2, *shape[1:]))
        if not diff <= CHECK_TOLERANCE:
            raise ConfigError(f"{out}: onnxruntime's features differ from PyTorch's by {diff:.3g} "
                              f"(> {CHECK_TOLERANCE:g}); the exported graph is not faithful")
        notes.append(f"checked with onnxruntime: max |onnx - torch| = {diff:.2e} on 2 random images")
    else:
        notes.append("not checked: pip install onnxruntime to compare the exported graph with PyTorch")
    if meta.get("whitening"):
        notes.append(f"the graph includes the encoder's whitening layer ({meta['whitening']})")
    dims = "batch x " + " x ".join(str(d) for d in shape[1:])
    snippet = (f"import onnxruntime as ort; s = ort.InferenceSession({str(out)!r}); "
               f"feats = s.run(None, {{'image': x}})[0]  # x: float32 [0, 1] images, {dims}")
    return ExportedWeights(out, "onnx", snippet, notes)


def describe_onnx(result: ExportedWeights) -> str:
    """What ``medssl export --format onnx`` prints."""
    lines = [f"wrote an ONNX model to {result.path}", "run with:", f"  {result.snippet}",
             "input 'image': images in [0, 1] (normalisation is inside the graph); output 'features': (batch, D)"]
    return "\n".join(lines + [f"note: {n}" for n in result.notes])
