"""FFCV train and val loaders that yield ``(x, y)``: x float32 in [0, 1], NCHW channels_last, on the device; y int64.

Pipelines (the only shapes shipped; every one goes through the libffcv/ffcv#396 guard of
:mod:`rat.data._ffcv_compat`, which also holds the reproducible crop decoder and quasi-random order used here):

* image, train: ``SeededRandomResizedCrop(res)`` (crop + flip, reproducible) ``-> ToTensor [-> ToDevice]
  -> ToTorchImage(channels_last)``, then ``uint8 -> float / 255`` in torch on the device.
* image, val: ``CenterCropRGBImageDecoder(res, ratio=224/256) -> ToTensor [-> ToDevice] -> ToTorchImage``, same
  conversion.
* label: ``IntDecoder -> ToTensor [-> ToDevice]``, flattened to ``(B,)`` int64.

Every batch is a fresh tensor owned by the caller: ffcv recycles its buffers, so the loaders copy out of them.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rat.data._ffcv_compat import make_loader, seeded_resized_crop_class, use_reproducible_quasi_random
from rat.data.crop import VAL_CROP_RATIO
from rat.data.meta import IMAGE_FIELD, LABEL_FIELD

__all__ = ["TrainLoader", "ValLoader", "build_train_loader", "build_val_loader"]

_logger = logging.getLogger(__name__)

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialized torch.distributed process group: launch with "
                           "torchrun and call torch.distributed.init_process_group() before building loaders")
    return dist.get_rank(), dist.get_world_size()


def _label_pipeline(device: torch.device) -> list[Any]:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToDevice, ToTensor

    ops: list[Any] = [IntDecoder(), ToTensor()]
    if device.type != "cpu":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


def _image_tail(device: torch.device) -> list[Any]:
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    ops: list[Any] = [ToTensor()]
    if device.type != "cpu":
        ops.append(ToDevice(device, non_blocking=True))
    ops.append(ToTorchImage(channels_last=True))
    return ops


def _check_beton(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"beton {path} does not exist: write it with tools/write_ffcv.py")
    return str(path)


def _convert(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies out of ffcv's recycled buffers: the batch belongs to the caller.
    x = images.to(torch.float32, memory_format=torch.channels_last).div_(255.0)
    y = labels.reshape(-1).to(torch.int64, copy=True)
    return x, y


def _check_common(batch_size: int, resolution: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if resolution < 8:
        raise ValueError(f"resolution={resolution} must be >= 8 pixels")
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 1 (ffcv decoding threads)")


class TrainLoader:
    """Shuffled, augmented training batches from a beton; see :func:`build_train_loader`.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``): the sample order, and the random crop
    and flip of every sample, are a function of ``(seed, epoch)`` only, so a resumed run sees the same batches.
    """

    def __init__(self, loader: Any, decoder: Any, device: torch.device, resolution: int):
        self._loader = loader
        self._decoder = decoder
        self.device = device
        self._resolution = resolution

    @property
    def resolution(self) -> int:
        """Side of the square crops of the next epoch."""
        return self._resolution

    @property
    def batch_size(self) -> int:
        return int(self._loader.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch whose order the next ``iter()`` yields."""
        return int(self._loader.next_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch ``epoch``'s order (deterministic in seed and epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self._loader.next_epoch = int(epoch)

    def set_resolution(self, resolution: int) -> None:
        """Crop size (square) from the next epoch on; an epoch in progress keeps its size (progressive resizing)."""
        if resolution < 8:
            raise ValueError(f"resolution={resolution} must be >= 8 pixels")
        self._decoder.output_size = (int(resolution), int(resolution))
        self._resolution = int(resolution)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._loader)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample ids this rank reads in ``epoch``, in order (what ``iter()`` yields after ``set_epoch(epoch)``)."""
        order = np.asarray(self._loader.traversal_order.sample_order(epoch))
        return order[:len(self) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._loader:
            yield _convert(images, labels)


class ValLoader:
    """Center-cropped batches in a fixed order; see :func:`build_val_loader`."""

    def __init__(self, loader: Any | None, indices: np.ndarray, resolution: int, batch_size: int):
        self._loader = loader
        self._batch_size = batch_size
        self.indices = indices
        self.resolution = resolution

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self._batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:  # an empty shard
            return
        for images, labels in self._loader:
            yield _convert(images, labels)


def build_train_loader(
        path: str | Path,
        *,
        batch_size: int,
        resolution: int,
        device: torch.device | str,
        num_workers: int,
        seed: int,
        distributed: bool = False,
        in_memory: bool = True,
        drop_last: bool = True,
        flip: bool = True,
        scale: tuple[float, float] = DEFAULT_SCALE,
        ratio: tuple[float, float] = DEFAULT_RATIO,
        indices: Sequence[int] | np.ndarray | None = None,
        batches_ahead: int = 3,
) -> TrainLoader:
    """Training loader: RandomResizedCrop at ``resolution`` + horizontal flip, shuffled each epoch.

    Order, crops and flips are reproducible functions of ``(seed, epoch)`` (see ``SeededRandomResizedCrop``).

    Args:
        path: a beton from :mod:`rat.data.writer` (fields ``image``, ``label``).
        batch_size: images per batch on this rank.
        resolution: crop side; change it between epochs with :meth:`TrainLoader.set_resolution`.
        device: where batches land (``'cpu'`` or a CUDA device).
        num_workers: ffcv decoding threads.
        seed: order and augmentation seed; the same on every rank (DistributedSampler semantics).
        distributed: shard with ``DistributedSampler(shuffle=True, seed=seed)`` over torch.distributed's
            rank/world size (each rank gets ``ceil(N / world)`` samples; the last ones are padded by wrapping).
        in_memory: ``True``: OS page cache + random order (the dataset fits in RAM); ``False``: ffcv's process cache
            with its page-local quasi-random order (non-distributed) to read less from disk.
        drop_last: drop the last partial batch.
        flip: random horizontal flip (p=0.5).
        scale, ratio: RandomResizedCrop area and aspect ranges.
        indices: train on this subset of samples only.
        batches_ahead: batches ffcv prepares in advance.
    """
    from ffcv.loader import OrderOption

    _check_common(batch_size, resolution, num_workers)
    path = _check_beton(path)
    device = torch.device(device)
    if distributed:
        _dist_rank_world()
    decoder = seeded_resized_crop_class()((resolution, resolution), scale=tuple(scale), ratio=tuple(ratio), seed=seed,
                                           flip=flip)
    image_ops: list[Any] = [decoder, *_image_tail(device)]
    if in_memory or distributed:
        order = OrderOption.RANDOM
    else:
        order = OrderOption.QUASI_RANDOM
    if not in_memory and distributed:
        _logger.info("in_memory=False with distributed=True: ffcv has no distributed quasi-random order; "
                     "using the random order with the process cache")
    loader = make_loader(path, batch_size=batch_size, num_workers=num_workers, order=order, distributed=distributed,
                          seed=seed, indices=None if indices is None else np.asarray(indices),
                          pipelines={IMAGE_FIELD: image_ops, LABEL_FIELD: _label_pipeline(device)},
                          drop_last=drop_last, os_cache=in_memory, batches_ahead=batches_ahead)
    if order == OrderOption.QUASI_RANDOM:
        use_reproducible_quasi_random(loader)
    if len(loader) == 0:
        raise ValueError(f"{path} gives no full batch of {batch_size} on this rank: lower batch_size or set "
                         "drop_last=False")
    return TrainLoader(loader, decoder, device, resolution)


def build_val_loader(
        path: str | Path,
        *,
        batch_size: int,
        resolution: int,
        device: torch.device | str,
        num_workers: int,
        distributed: bool = False,
        indices: Sequence[int] | np.ndarray | None = None,
        crop_ratio: float = VAL_CROP_RATIO,
        batches_ahead: int = 3,
) -> ValLoader:
    """Validation loader: the central ``crop_ratio`` square of each image resized to ``resolution``, fixed order.

    Order: the samples ``indices`` (default: all, ascending) in the given order, no shuffling, no dropped batch. With
    ``distributed=True`` (distributed evaluation: an initialized torch.distributed process group) rank ``r`` of ``w``
    gets the ``r``-th of ``w`` contiguous, near-equal runs of that order: disjoint shards covering every sample once,
    so metrics reduce exactly by summing counts (ranks may differ by one batch). The crop is ffcv's: side
    ``int(crop_ratio * min(h, w))``, offsets ``(h - side) // 2`` and ``(w - side) // 2``, area-resized to
    ``resolution``.
    """
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import OrderOption
    from ffcv.reader import Reader

    _check_common(batch_size, resolution, num_workers)
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio={crop_ratio} must be in (0, 1]")
    path = _check_beton(path)
    device = torch.device(device)
    num_samples = int(Reader(path).num_samples)
    order = np.arange(num_samples, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if order.ndim != 1 or (len(order) and (order.min() < 0 or order.max() >= num_samples)):
        raise ValueError(f"indices must be a 1-d array of sample ids in 0..{num_samples - 1}")
    if distributed:
        rank, world = _dist_rank_world()
        order = np.array_split(order, world)[rank]  # contiguous, sizes differ by at most one, no padding
    if len(order) == 0:
        return ValLoader(None, order, resolution, batch_size)
    image_ops = [CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio), *_image_tail(device)]
    loader = make_loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                          distributed=False, seed=0, indices=order,
                          pipelines={IMAGE_FIELD: image_ops, LABEL_FIELD: _label_pipeline(device)},
                          drop_last=False, os_cache=True, batches_ahead=batches_ahead)
    return ValLoader(loader, order, resolution, batch_size)


