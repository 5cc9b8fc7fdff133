"""rat data: FFCV beton writers, train/val loaders, and batched on-device augmentation.

Public API (see docs/data.md):

* writing: :func:`write_arrays_beton`, :func:`write_folder_beton`, :func:`write_cifar_beton`; reading back:
  :func:`read_classes`, :func:`read_beton_info`, :func:`read_beton_item`;
* loading: :func:`build_train_loader` (-> :class:`TrainLoader`), :func:`build_val_loader` (-> :class:`ValLoader`),
  :func:`check_pipeline` (the ffcv 1.0.2 hang guard);
* augmentation: :class:`BatchAugment` (per-sample RandAugment + random erasing on a batch, on its device),
  :func:`build_augment`, :func:`build_mixup` (timm ``Mixup``).

``rat.data.demo`` (the embedded demo dataset) builds on these and is imported on its own.
"""
from rat.data.augment import (
    BatchAugment,
    BatchRandAugment,
    BatchRandomErasing,
    RandAugmentSpec,
    build_augment,
    build_mixup,
    parse_rand_augment,
)
from rat.data.ffcv import (
    VAL_CROP_RATIO,
    PipelineError,
    TrainLoader,
    ValLoader,
    build_train_loader,
    build_val_loader,
    check_pipeline,
    shard_indices,
)
from rat.data.writer import (
    IMAGE_FIELD,
    LABEL_FIELD,
    BetonImages,
    BetonWriteError,
    WriteReport,
    classes_path,
    list_image_folder,
    load_cifar,
    read_beton_info,
    read_beton_item,
    read_classes,
    write_arrays_beton,
    write_cifar_beton,
    write_folder_beton,
)

__all__ = [
    "IMAGE_FIELD", "LABEL_FIELD", "VAL_CROP_RATIO", "BatchAugment", "BatchRandAugment", "BatchRandomErasing",
    "BetonWriteError", "PipelineError", "RandAugmentSpec", "TrainLoader", "ValLoader", "WriteReport", "build_augment",
    "build_mixup", "parse_rand_augment",
    "build_train_loader", "build_val_loader", "check_pipeline", "classes_path", "list_image_folder", "load_cifar",
    "BetonImages", "read_beton_info", "read_beton_item", "read_classes", "shard_indices", "write_arrays_beton",
    "write_cifar_beton", "write_folder_beton",
]
