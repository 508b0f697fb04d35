"""Datasets stored as one ``.npz`` file in the MedMNIST layout.

Keys ``train_images``, ``val_images``, ``test_images`` (uint8 or uint16) and ``train_labels``,
``val_labels``, ``test_labels`` (integers). Image arrays are ``(N, H, W)`` grayscale, ``(N, H, W, 3)``
RGB or ``(N, D, H, W)`` 3D volumes. Labels ``(N,)`` or ``(N, 1)`` are class indices (``K = max + 1``
classes); ``(N, K > 1)`` 0/1 matrices are multi-label. An npz without any ``*_labels`` key is read as
unlabelled (for pretraining). An optional ``class_names`` key (1-D str array of length K) names the
classes; otherwise they are ``"0"``, ``"1"``, ...

The splits come from the keys; every item is its own patient (MedMNIST ships no patient ids; its official
splits are patient-disjoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medssl.errors import DataError

from .base import MAX_CLASSES, ImageDataset, resize_image
from .readers import check_memory
from .splits import SPLIT_NAMES

_MAX_VALUE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class NpzDataset(ImageDataset):
    """A MedMNIST-layout ``.npz`` file as an :class:`ImageDataset`.

    The arrays stay in memory in their stored integer type; items are scaled to ``[0, 1]`` by bit depth
    and resized on access (bilinear with antialiasing in 2D, area / trilinear in 3D). Non-square images
    are resized to a square (the aspect ratio is not preserved).

    Args:
        path: The ``.npz`` file.
        image_size: Side length of the items; ``None`` keeps the stored size (the largest side).
        task: ``"label"`` (the only task) or ``None``.
        name: Spec string to record (defaults to ``npz:PATH``).

    Raises:
        DataError: If the file is missing or not an npz archive, a key is missing, arrays have the wrong
            dtype or shape, or image and label counts disagree (the message names the file and key).
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int | None = None,
        task: str | None = None,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        arrays = _read_npz(self.path)
        images = {s: arrays.get(f"{s}_images") for s in SPLIT_NAMES}
        label_keys = [f"{s}_labels" for s in SPLIT_NAMES]
        present = [k for k in label_keys if k in arrays]
        for s in SPLIT_NAMES:
            if images[s] is None:
                raise DataError(
                    f"{self.path}: missing key '{s}_images' (found: {', '.join(sorted(arrays)) or 'none'}); "
                    "expected train/val/test _images and _labels (MedMNIST layout)"
                )
        if present and len(present) != 3:
            missing = sorted(set(label_keys) - set(present))
            raise DataError(
                f"{self.path}: missing key {missing[0]!r}: give labels for all three splits or none"
            )

        geometry = None
        for s in SPLIT_NAMES:
            g = _geometry(self.path, f"{s}_images", images[s])
            if geometry is not None and g != geometry:
                raise DataError(
                    f"{self.path}: '{s}_images' has item shape {images[s].shape[1:]} / dtype {images[s].dtype}, "
                    f"unlike '{SPLIT_NAMES[0]}_images' "
                    f"({images[SPLIT_NAMES[0]].shape[1:]} / {images[SPLIT_NAMES[0]].dtype})"
                )
            geometry = g
        assert geometry is not None
        dims, chans, native = geometry

        labels: np.ndarray | None = None
        multilabel = False
        class_names: list[str] = []
        if present:
            parts = [
                _labels(self.path, f"{s}_labels", arrays[f"{s}_labels"], len(images[s])) for s in SPLIT_NAMES
            ]
            widths = {p.shape[1] for p in parts}
            if len(widths) != 1:
                raise DataError(
                    f"{self.path}: the *_labels arrays have different numbers of columns: {sorted(widths)}"
                )
            width = widths.pop()
            merged = np.concatenate(parts)
            if width == 1:
                labels = merged[:, 0]
                num_classes = int(labels.max()) + 1 if len(labels) else 1
                if num_classes > len(labels) and "class_names" not in arrays:
                    raise DataError(
                        f"{self.path}: the largest label is {num_classes - 1}, so {num_classes} classes for "
                        f"{len(labels)} images; labels must be class indices 0..K-1 (add a 'class_names' key "
                        "to declare K classes when some are absent)"
                    )
            else:
                if width > MAX_CLASSES:
                    raise DataError(f"{self.path}: the *_labels arrays have {width} columns; medssl takes at "
                                    f"most {MAX_CLASSES} multi-label classes")
                multilabel = True
                labels = merged
                if not np.isin(labels, (0, 1)).all():
                    raise DataError(
                        f"{self.path}: multi-label *_labels of width {width} must hold only 0 and 1"
                    )
                num_classes = width
            class_names = _class_names(self.path, arrays.get("class_names"), num_classes, multilabel)

        if task is not None and (not present or task != "label"):
            valid = "label" if present else "none (the file has no labels)"
            raise DataError(f"{self.path}: no task {task!r}; valid tasks: {valid}")

        self._arrays = [images[s] for s in SPLIT_NAMES]
        counts = [len(a) for a in self._arrays]
        self._offsets = np.cumsum([0] + counts)
        if self._offsets[-1] == 0:
            raise DataError(f"{self.path}: the file holds no images")
        self._scale = _MAX_VALUE[self._arrays[0].dtype]
        self._channels_last = dims == 2 and chans == 3
        split_names = np.repeat(np.array(SPLIT_NAMES), counts)
        local = np.concatenate([np.arange(c) for c in counts])
        patient_ids = np.char.add(np.char.add(split_names, "_"), np.char.zfill(local.astype(str), 6))
        sources = [f"{self.path}#{s}/{i}" for s, i in zip(split_names, local, strict=True)]
        size = native if image_size is None else int(image_size)
        if size < 1:
            raise DataError(f"{self.path}: image_size must be a positive integer, got {image_size!r}")
        self._set_metadata(
            name=name or f"npz:{self.path}",
            spatial_dims=dims,
            in_chans=chans,
            image_size=size,
            labels=labels,
            class_names=class_names,
            multilabel=multilabel,
            patient_ids=patient_ids,
            splits=split_names,
            sources=sources,
            task="label" if present else None,
            tasks=("label",) if present else (),
            has_masks=False,
        )

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        raw = self._arrays[part][index - self._offsets[part]]
        image = torch.from_numpy(raw.astype(np.float32) / self._scale)
        image = image.permute(2, 0, 1) if self._channels_last else image.unsqueeze(0)
        return resize_image(image.contiguous(), self.image_size), None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"npz file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: not a file (npz: expects a .npz archive)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, UnpicklingError ... for bad files
        raise DataError(f"{path}: cannot read as .npz ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, not an .npz archive of named arrays")
    with data:
        _check_members(path, data)
        out = {}
        for key in data.files:
            try:
                out[key] = data[key]
            except Exception as exc:  # corrupt member, object array without pickle, ...
                raise DataError(f"{path}: cannot read key {key!r} ({type(exc).__name__}: {exc})") from exc
    return out


def _check_members(path: Path, data: np.lib.npyio.NpzFile) -> None:
    """Read every member's ``.npy`` header (a literal, parsed without evaluating code) before any array.

    Refuses object arrays (they are pickles: medssl never unpickles a data file) and archives whose arrays,
    decompressed, need more bytes than the machine has memory (a few MB of zeros compress into tens of GB).
    """
    total = 0
    for member in data.zip.namelist():
        if not member.endswith(".npy"):
            continue
        key = member[: -len(".npy")]
        try:
            with data.zip.open(member) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    continue  # other versions: np.load checks them when the key is read
        except Exception as exc:
            raise DataError(f"{path}: cannot read the header of key {key!r} ({type(exc).__name__}: {exc})") from exc
        if dtype.hasobject:
            raise DataError(f"{path}: key {key!r} holds Python objects (a pickled object array); medssl never "
                            "unpickles data files — store numeric arrays")
        total += int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
    check_memory(path, (total,), 1)


def _geometry(path: Path, key: str, arr: np.ndarray) -> tuple[int, int, int]:
    """Returns ``(spatial_dims, in_chans, native_size)`` of an image array, or raises DataError."""
    if arr.dtype not in _MAX_VALUE:
        raise DataError(f"{path}: '{key}' has dtype {arr.dtype}; expected uint8 (or uint16)")
    if arr.ndim == 3:
        dims, chans, spatial = 2, 1, arr.shape[1:]
    elif arr.ndim == 4 and arr.shape[-1] == 3:
        dims, chans, spatial = 2, 3, arr.shape[1:3]
    elif arr.ndim == 4:
        dims, chans, spatial = 3, 1, arr.shape[1:]
    else:
        raise DataError(
            f"{path}: '{key}' has shape {arr.shape}; expected (N, H, W), (N, H, W, 3) or (N, D, H, W)"
        )
    if min(spatial) < 1:
        raise DataError(f"{path}: '{key}' has an empty spatial dimension: {arr.shape}")
    return dims, chans, int(max(spatial))


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def _labels(path: Path, key: str, arr: np.ndarray, n: int) -> np.ndarray:
    """Validates one ``*_labels`` array and returns it as int64 ``(N, K)``.

    Checked before anything is sized by the labels: integer values (float arrays must hold whole numbers,
    NaN / inf are refused), ``0 <= label < MAX_CLASSES`` — a label of ``2**40`` would otherwise make a list of
    ``2**40`` class names — and one row per image. Values are range-checked before the int64 cast, so a huge
    ``uint64`` cannot wrap to a negative index.
    """
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise DataError(f"{path}: '{key}' has shape {arr.shape}; expected (N,), (N, 1) or (N, K)")
    if len(arr) != n:
        images_key = key.replace("_labels", "_images")
        raise DataError(f"{path}: '{key}' has {len(arr)} rows but '{images_key}' has {n} images")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            row = _first_row(~finite)
            raise DataError(f"{path}: '{key}' has dtype {arr.dtype} with {int((~finite).sum())} NaN / inf label(s) "
                            f"(first at row {row}); labels are integer class indices")
        whole = arr == np.floor(arr)
        if not whole.all():
            row = _first_row(~whole)
            raise DataError(f"{path}: '{key}' has dtype {arr.dtype} with non-integer labels (e.g. "
                            f"{arr[row].tolist()} at row {row}); labels are integer class indices")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: '{key}' has dtype {arr.dtype}; expected integer class labels")
    if arr.size and arr.min() < 0:
        row = _first_row(arr < 0)
        raise DataError(f"{path}: '{key}' holds negative labels (min {arr.min()}, first at row {row})")
    if arr.size and arr.max() >= MAX_CLASSES:
        row = _first_row(arr >= MAX_CLASSES)
        raise DataError(f"{path}: '{key}' holds label {arr.max()} (first large one at row {row}); medssl takes class "
                        f"indices below {MAX_CLASSES} — are these ids rather than classes?")
    return arr.astype(np.int64)


def _class_names(path: Path, names: np.ndarray | None, num_classes: int, multilabel: bool) -> list[str]:
    """Class names from the optional ``class_names`` key (may name classes absent from the labels)."""
    if names is None:
        return [str(i) for i in range(num_classes)]
    names = np.asarray(names)
    ok = names.ndim == 1 and np.issubdtype(names.dtype, np.str_)
    ok = ok and (len(names) == num_classes if multilabel else len(names) >= num_classes)
    if not ok:
        need = f"exactly {num_classes}" if multilabel else f"at least {num_classes}"
        raise DataError(
            f"{path}: 'class_names' must be a 1-D string array with {need} names, "
            f"got shape {names.shape} dtype {names.dtype}"
        )
    return [str(x) for x in names]
