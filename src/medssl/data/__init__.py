"""Datasets, readers, phantoms and splits.

Entry point: :func:`open_dataset` turns a data spec string (``phantom2d``, ``npz:PATH``, ``folder:DIR``,
``csv:FILE.csv``, ``isic2017:ROOT`` ...) into an :class:`ImageDataset`, whose items are dicts of tensors (``image``,
``index`` and, where
available, ``label`` and ``mask``) and whose per-item metadata (patient ids, splits, sources) lives on
the dataset.
"""

from .base import ImageDataset, resize_image
from .folder import FolderDataset
from .inspect import InspectReport, format_report, inspect_data
from .isic import Isic2017Dataset
from .manifest import CsvDataset, SubsetDataset, drop_bad
from .npz import NpzDataset
from .phantoms import (
    LESION_NAMES,
    MARGIN_NAMES,
    PATHOLOGY_NAMES,
    PhantomDataset,
    phantom2d_params,
    phantom3d_params,
    render_phantom2d,
    render_phantom3d,
)
from .specs import SPEC_HELP, open_dataset
from .splits import SPLIT_NAMES, assign_patient_splits, stratified_fraction

__all__ = [
    "LESION_NAMES",
    "MARGIN_NAMES",
    "PATHOLOGY_NAMES",
    "SPEC_HELP",
    "SPLIT_NAMES",
    "CsvDataset",
    "FolderDataset",
    "ImageDataset",
    "InspectReport",
    "Isic2017Dataset",
    "NpzDataset",
    "PhantomDataset",
    "SubsetDataset",
    "assign_patient_splits",
    "drop_bad",
    "format_report",
    "inspect_data",
    "open_dataset",
    "phantom2d_params",
    "phantom3d_params",
    "render_phantom2d",
    "render_phantom3d",
    "resize_image",
    "stratified_fraction",
]
