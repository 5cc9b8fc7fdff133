"""rat data: FFCV beton writers, train/val loaders, and batched on-device augmentation.

Public API (see docs/data.md):

* writing: :func:`write_arrays_beton`, :func:`write_folder_beton` (over :func:`list_image_folder`),
  :func:`write_cifar_beton` (-> :class:`WriteReport`, :class:`BetonWriteError`); reading back: :func:`read_classes`,
  :func:`read_beton_info`, :func:`read_beton_item`;
* loading: :func:`build_train_loader`, :func:`build_val_loader` (central crop :data:`VAL_CROP_RATIO`);
* augmentation: :class:`BatchAugment` (per-sample RandAugment + random erasing on a batch, on its device),
  :func:`build_augment`, :func:`build_mixup` (timm ``Mixup``).

The building blocks stay in their modules (``rat.data.augment``, ``rat.data.ffcv``, ``rat.data.writer``);
``rat.data.demo`` (the embedded demo dataset) builds on these and is imported on its own.
"""
from rat.data.augment import BatchAugment, build_augment, build_mixup
from rat.data.ffcv import VAL_CROP_RATIO, build_train_loader, build_val_loader
from rat.data.writer import (
    BetonImages,
    BetonWriteError,
    WriteReport,
    list_image_folder,
    read_beton_info,
    read_beton_item,
    read_classes,
    write_arrays_beton,
    write_cifar_beton,
    write_folder_beton,
)

__all__ = [
    "VAL_CROP_RATIO", "BatchAugment", "BetonImages", "BetonWriteError", "WriteReport", "build_augment", "build_mixup",
    "build_train_loader", "build_val_loader", "list_image_folder", "read_beton_info", "read_beton_item",
    "read_classes", "write_arrays_beton", "write_cifar_beton", "write_folder_beton",
]
