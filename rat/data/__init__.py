"""rat data: FFCV beton writers and train/val loaders (augmentation is :mod:`rat.augment`).

Public API (see docs/data.md):

* writing: :func:`write_arrays_beton`, :func:`write_folder_beton` (over :func:`list_image_folder`),
  :func:`write_cifar_beton` (-> :class:`WriteReport`, :class:`BetonWriteError`); reading back: :func:`read_classes`,
  :func:`read_beton_info`, :func:`read_beton_item`, :class:`BetonImages`;
* loading: :func:`build_train_loader`, :func:`build_val_loader` (central crop :data:`VAL_CROP_RATIO`; with
  ``distributed=True`` each rank evaluates its own contiguous shard).

The modules, one job each, in the order data flows: ``sources`` (ImageFolder listing, CIFAR archives, the indexable
sources the writer reads), ``meta`` (a beton's fields and classes file, reading samples back), ``writer`` (the atomic
write), ``crop`` (the evaluation crop ratio), ``loaders`` (the FFCV loaders); ``_ffcv_compat`` holds every
workaround for ffcv 1.0.2's internals and checks the installed version. ``rat.data.demo`` (the embedded demo dataset)
builds on these and loads on its own.
"""
from __future__ import annotations

import importlib
from typing import Any

from rat.data.crop import VAL_CROP_RATIO

# The loaders and writers import ffcv (and numba), which takes seconds and a compiled extension. Importing any
# rat.data module runs this file first, and the models (rat.data.crop's VAL_CROP_RATIO), rat.eval on image folders
# and the readers of a beton's classes need no ffcv: they must not pay for it, nor fail without it (e.g. on a GPU
# machine without ffcv). So every name here but VAL_CROP_RATIO loads its module on first use (PEP 562).
_FFCV_NAMES = {
    "build_train_loader": "rat.data.loaders", "build_val_loader": "rat.data.loaders",
    "list_image_folder": "rat.data.sources",
    **{name: "rat.data.meta" for name in ("BetonImages", "read_beton_info", "read_beton_item", "read_classes")},
    **{name: "rat.data.writer" for name in (
        "BetonWriteError", "WriteReport", "write_arrays_beton", "write_cifar_beton", "write_folder_beton")},
}


def __getattr__(name: str) -> Any:
    if name in _FFCV_NAMES:
        return getattr(importlib.import_module(_FFCV_NAMES[name]), name)
    raise AttributeError(f"module 'rat.data' has no attribute {name!r}")


__all__ = ["VAL_CROP_RATIO", *_FFCV_NAMES]
