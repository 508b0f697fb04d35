"""Start a backbone from existing weights: ``model.init_from`` (pretraining) and ``--init`` (evaluation).

Sources (:func:`resolve_init_source`):

* ``PATH`` — a local file: ``.safetensors`` (a medssl ``encoder*.safetensors``, or any state dict in timm's key
  layout) or a PyTorch checkpoint (``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``) read with
  ``torch.load(weights_only=True)``, so a file that asks the unpickler for Python objects is refused unread.
  A checkpoint that nests its weights under ``state_dict`` / ``model`` / ``module`` is unwrapped, and a
  ``module.`` (DDP) or ``backbone.`` / ``encoder.`` prefix is stripped when every key has it.
* ``timm:NAME`` — timm's pretrained weights of ``NAME`` (e.g. ``timm:resnet50.a1_in1k``,
  ``timm:vit_base_patch16_384.augreg_in21k_ft_in1k``), read from the local Hugging Face cache.
* ``hf-hub:ORG/NAME`` — the ``model.safetensors`` (or ``pytorch_model.bin``) of a Hugging Face repository,
  from the local cache.

Nothing is downloaded: a network source that is not in the local cache fails with a message that says what to
download and where to point ``model.init_from`` (medssl runs offline; set ``HF_HUB_OFFLINE=0`` **and** fetch the
file yourself, e.g. ``huggingface-cli download ORG/NAME``, to use the cache).

Loading (:func:`load_init_weights`): the classifier (``fc.*``, ``head.*``, ``classifier.*``) is dropped, every
remaining key must exist in the model with the same shape, and every model key must be given (a different
architecture is an error naming the keys, never a half-loaded model), with three adaptations:

* **input channels** (:func:`adapt_in_chans`): RGB weights for a 1-channel model are **summed** over the three
  input channels (``rule="sum"``, timm's ``adapt_input_conv`` rule: a grey image ``x`` replicated to RGB gives the
  same first-layer response as the summed filter on ``x``) or **averaged** (``rule="mean"``: the response to
  ``x`` equals the RGB model's response to ``x/3`` replicated; use it when the intensities were rescaled). For
  other channel counts the filters are tiled over the channels and scaled by ``3 / C`` (timm's rule).
* **ViT position embeddings** of another grid size are resampled (bicubic, ``timm.layers.resample_abs_pos_embed``),
  and a patch embedding of another patch size is resampled (``timm.layers.resample_patch_embed``).
* **2D → 3D inflation** (``inflate=True``, Carreira & Zisserman 2017, I3D): a 2D kernel ``(O, I, k, k)`` loaded into a
  3D convolution ``(O, I, t, k, k)`` is repeated ``t`` times along depth and divided by ``t``, so a volume of
  identical slices gives the 2D response. Without ``inflate`` such a mismatch is an error that suggests it.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from medssl.errors import CheckpointError, ConfigError

__all__ = ["ADAPT_RULES", "HUB_HOST", "adapt_in_chans", "inflate_2d_to_3d", "load_init_weights",
           "read_state_dict", "resolve_init_source"]

#: how RGB filters become the filters of another channel count (``model.init_adapt``)
ADAPT_RULES = ("sum", "mean")
#: the host a network source would be fetched from
HUB_HOST = "huggingface.co"
#: classifier keys a pretrained checkpoint may carry and a backbone (``num_classes=0``) does not have
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head_dist.", "last_linear.")
_WRAPPERS = ("state_dict", "model", "module", "teacher", "student")
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether ``host`` resolves and its HTTPS port answers (a quick offline check)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(repo: str, filenames: list[str]) -> str | None:
    """The first of ``filenames`` of the Hugging Face repository ``repo`` in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        return None
    for fname in filenames:
        try:
            found = try_to_load_from_cache(repo, fname)
        except Exception:  # an invalid repo id raises HFValidationError
            return None
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def _offline(spec: str, key: str, what: str) -> ConfigError:
    return ConfigError(
        f"{key} {spec}: {what} is not in the local Hugging Face cache and medssl does not download weights "
        f"(offline); fetch the file where there is network (e.g. huggingface-cli download) and set {key} to the "
        "local .safetensors / .pth file")


def resolve_init_source(spec: str, key: str = "model.init_from") -> Path:
    """The local weights file an ``init_from`` value names (see the module docstring).

    Raises:
        ConfigError: an empty value, a missing file or directory, a malformed ``timm:`` / ``hf-hub:`` name, or a
            network source that is not cached here (nothing is downloaded).
    """
    spec = str(spec).strip()
    if not spec:
        raise ConfigError(f"{key}: empty; expected a weights file, timm:NAME or hf-hub:ORG/NAME")
    if spec.startswith("timm:"):
        import timm

        name = spec[5:]
        arch = name.split(".")[0]
        if not name or not timm.is_model(arch):
            raise ConfigError(f"{key} {spec}: '{name}' is not a timm model name (e.g. timm:resnet50.a1_in1k)")
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:
            cfg = None
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id:
            raise ConfigError(f"{key} {spec}: timm has no pretrained weights named '{name}'")
        fname = getattr(cfg, "hf_hub_filename", None)
        found = _cached(hub_id, [fname] if fname else ["model.safetensors", "pytorch_model.bin"])
        if found is None:
            raise _offline(spec, key, f"timm's weights for '{name}' (Hugging Face repo {hub_id})")
        return Path(found)
    if spec.startswith("hf-hub:"):
        repo = spec[7:]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ConfigError(f"{key} {spec}: expected hf-hub:ORG/NAME")
        found = _cached(repo, ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"])
        if found is None:
            raise _offline(spec, key, f"the Hugging Face repo {repo}")
        return Path(found)
    if "://" in spec:
        raise ConfigError(f"{key} {spec}: URLs are not fetched (medssl runs offline); download the file and give "
                          "its local path")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"{key} {spec}: file not found (expected a weights file, timm:NAME or hf-hub:ORG/NAME)")
    if not path.is_file():
        raise ConfigError(f"{key} {spec}: not a file")
    return path


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping of a loaded checkpoint (nested ``state_dict`` / ``model`` unwrapped, prefixes stripped)."""
    for _ in range(3):
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"weights file {path}: holds no state dict of tensors")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"weights file {path}: holds no tensors")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, never unpickling Python objects (safetensors, or ``weights_only=True``).

    Raises:
        CheckpointError: an unreadable file, a pickle that asks for Python objects, or no tensors in it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        import safetensors.torch as st

        try:
            return _unwrap(st.load_file(str(path)), path)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"weights file {path}: not a readable safetensors file "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(f"weights file {path}: refused, it is a pickle that needs Python objects beyond "
                              f"tensors ({first}); medssl never unpickles code: save a state dict or safetensors"
                              ) from None
    except Exception as e:
        suffix = "" if path.suffix in _TORCH_SUFFIXES else " (expected .safetensors or a PyTorch .pth/.pt/.bin)"
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(f"weights file {path}: cannot be read ({type(e).__name__}: {first}){suffix}") from None
    return _unwrap(state, path)


def adapt_in_chans(weight: torch.Tensor, in_chans: int, rule: str = "sum") -> torch.Tensor:
    """First-layer weights ``(O, I, *k)`` for ``in_chans`` input channels (see the module docstring).

    ``I == in_chans``: unchanged. ``in_chans == 1``: the sum (``rule="sum"``) or mean (``"mean"``) over the
    ``I`` channels. Otherwise: the ``I`` filters tiled to ``in_chans`` and scaled by ``I / in_chans``.

    Raises:
        ConfigError: an unknown rule.
    """
    if rule not in ADAPT_RULES:
        raise ConfigError(f"model.init_adapt must be one of {', '.join(ADAPT_RULES)}, got '{rule}'")
    src = weight.shape[1]
    if src == in_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True) if rule == "sum" else w.mean(dim=1, keepdim=True)
    else:
        reps = math.ceil(in_chans / src)
        out = w.repeat(1, reps, *([1] * (w.ndim - 2)))[:, :in_chans] * (src / in_chans)
    return out.to(weight.dtype)


def inflate_2d_to_3d(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """A 2D kernel ``(O, I, kh, kw)`` as a 3D one ``(O, I, depth, kh, kw)``: repeated along depth, divided by
    ``depth`` (I3D), so a volume of identical slices gives the 2D response."""
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def _first_conv_keys(model: nn.Module) -> set[str]:
    """Weight keys of the model's input layers (every conv whose input is the image)."""
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d) and name in ("conv1", "patch_embed.proj", "stem.conv", "stem.0",
                                                                 "conv_stem", "stem.conv1", "features.0"):
            keys.add(f"{name}.weight")
    return keys


def load_init_weights(model: nn.Module, spec: str, *, key: str = "model.init_from", adapt: str = "sum",
                      inflate: bool = False) -> Path:
    """Load the weights ``spec`` names into ``model`` (a medssl backbone), adapting what the module docstring lists.

    Returns:
        The file the weights came from.

    Raises:
        ConfigError: an unusable ``spec`` (missing file, uncached network source).
        CheckpointError: an unreadable or pickled file, or weights of another architecture (missing / unexpected
            keys, shapes that no adaptation explains), naming the file and the first keys.
    """
    path = resolve_init_source(spec, key)
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    own = model.state_dict()
    first = _first_conv_keys(model)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) of the model missing from the file (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) of the file not in the model (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{key} {spec}: weights of another architecture than {type(model).__name__}: "
                              + "; ".join(parts))
    out: dict[str, torch.Tensor] = {}
    for k, target in own.items():
        if k not in state:
            continue
        v = state[k]
        if v.shape != target.shape:
            v = _fit(k, v, target, model, first, adapt=adapt, inflate=inflate, spec=spec, key=key)
        out[k] = v.to(target.dtype)
    model.load_state_dict(out, strict=False)
    return path


def _fit(k: str, v: torch.Tensor, target: torch.Tensor, model: nn.Module, first: set[str], *, adapt: str,
         inflate: bool, spec: str, key: str) -> torch.Tensor:
    """``v`` reshaped to ``target``'s shape by the adaptation that explains the difference, else an error."""
    if k == "pos_embed" and v.ndim == 3 and target.ndim == 3 and v.shape[-1] == target.shape[-1]:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        old = int(math.isqrt(v.shape[1] - prefix))
        if grid is not None and len(grid) == 2 and old * old == v.shape[1] - prefix:
            return resample_abs_pos_embed(v.float(), new_size=list(grid), old_size=[old, old],
                                          num_prefix_tokens=prefix)
    if inflate and v.ndim == 4 and target.ndim == 5 and v.shape[:2] == target.shape[:2] \
            and v.shape[2:] == target.shape[3:]:
        return inflate_2d_to_3d(v, target.shape[2])
    if k in first and v.ndim == target.ndim and v.shape[0] == target.shape[0]:
        w = adapt_in_chans(v, target.shape[1], adapt) if v.shape[1] != target.shape[1] else v
        if inflate and w.ndim == 4 and target.ndim == 5:
            w = inflate_2d_to_3d(w, target.shape[2])
        if w.shape[2:] != target.shape[2:] and k == "patch_embed.proj.weight" and w.ndim == 4:
            from timm.layers import resample_patch_embed

            w = resample_patch_embed(w.float(), list(target.shape[2:]))
        if w.shape == target.shape:
            return w
    if k in first and v.ndim == 4 and target.ndim == 5 and v.shape[0] == target.shape[0]:
        w = adapt_in_chans(v, target.shape[1], adapt)
        if inflate:
            return inflate_2d_to_3d(w, target.shape[2])
    hint = (" (2D weights for a 3D model: add model.init_inflate=true to inflate them)"
            if v.ndim == 4 and target.ndim == 5 and not inflate else "")
    raise CheckpointError(f"{key} {spec}: shape mismatch for '{k}': file {tuple(v.shape)}, model "
                          f"{tuple(target.shape)}{hint}")
