"""Evaluation images: the fixed subset of the validation set, its shards, and batches at a given resolution.

The subset rule (the same for every model, threat model and resolution, so numbers are comparable): with ``N``
images in the validation set in its canonical order (a beton's sample order; for a folder, torchvision
``ImageFolder`` order: classes sorted by name, files sorted within a class), the evaluation uses the images with
indices ``sorted(numpy.random.default_rng(0).permutation(N)[:n_ex])``. The first ``n`` of a permutation are a uniform
random subset, so the subset for a smaller ``n_ex`` is not a prefix of a larger one, but it is the same on every
machine and for every model.

Preprocessing is RobustBench's for ImageNet at resolution ``r``: resize the short side to ``floor(r / 0.875)`` with
bicubic interpolation, then center-crop ``r``. For an ImageNet-style folder that is exactly what happens (PIL,
torchvision transforms). For a beton, ``rat.data.build_val_loader`` center-crops a square of 0.875 of the short side
and resizes it to ``r``: the same region of the image, resampled in one step.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from rat.data import VAL_CROP_RATIO

__all__ = [
    "SUBSET_RULE", "dataset_size", "eval_subset", "iter_eval_batches", "resize_size", "shard_batches",
]

_logger = logging.getLogger(__name__)

SUBSET_SEED = 0
SUBSET_RULE = "sorted(numpy.random.default_rng(0).permutation(N)[:n_ex])"


def resize_size(resolution: int) -> int:
    """The short side an image is resized to before the center crop: ``floor(resolution / 0.875)``
    (``rat.data.VAL_CROP_RATIO``, the crop of the beton val loader)."""
    return math.floor(resolution / VAL_CROP_RATIO)  # 0.875 and 8r/7 are exact enough in binary: never off by one


def eval_subset(dataset_size: int, n_ex: int) -> np.ndarray:
    """The sorted indices of the ``n_ex`` evaluation images of a validation set of ``dataset_size`` images.

    Raises:
        ValueError: ``n_ex`` is not in ``1..dataset_size``.
    """
    if not 1 <= n_ex <= dataset_size:
        raise ValueError(f"n_ex={n_ex} does not fit a validation set of {dataset_size} images: "
                         f"pass --n-ex between 1 and {dataset_size}")
    perm = np.random.default_rng(SUBSET_SEED).permutation(dataset_size)
    return np.sort(perm[:n_ex]).astype(np.int64)


def shard_batches(n_batches: int, shard_index: int, shard_count: int) -> range:
    """The batch ids of one shard: ``shard_count`` contiguous, near-equal runs of the ``n_batches`` batches.

    Shards split on batch boundaries, so every batch holds the same images as in an unsharded run and merged shards
    equal the unsharded result exactly.

    Raises:
        ValueError: bad shard numbers, or more shards than batches.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index}/{shard_count}: the index must be in 0..{shard_count - 1}")
    if shard_count > n_batches:
        raise ValueError(f"{shard_count} shards for only {n_batches} batches: use at most {n_batches} shards, "
                         "or a smaller --batch-size")
    bounds = [round(i * n_batches / shard_count) for i in range(shard_count + 1)]
    return range(bounds[shard_index], bounds[shard_index + 1])


def _is_beton(path: Path) -> bool:
    return path.is_file()


def _check_source(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"validation data {path} does not exist: pass --data a val .beton or an "
                                "ImageNet-style val folder (one subfolder per class)")


def _image_folder(path: Path, resolution: int | None):
    from torchvision import datasets, transforms

    transform = None
    if resolution is not None:
        transform = transforms.Compose([
            transforms.Resize(resize_size(resolution), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
        ])
    return datasets.ImageFolder(str(path), transform=transform)


def dataset_size(path: str | Path) -> int:
    """Number of images in a val beton or an ImageNet-style folder."""
    path = Path(path)
    _check_source(path)
    if _is_beton(path):
        from ffcv.reader import Reader

        return int(Reader(str(path)).num_samples)
    return len(_image_folder(path, None))


def _rechunk(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             sizes: Sequence[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Regroup a stream of batches into batches of exactly ``sizes``; the stream must hold ``sum(sizes)`` images."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    buffered = 0
    pending = list(sizes)
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        buffered += x.shape[0]
        while pending and buffered >= pending[0]:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            size = pending.pop(0)
            yield x_all[:size], y_all[:size]
            xs, ys = [x_all[size:]], [y_all[size:]]
            buffered -= size
    if pending or buffered:
        raise RuntimeError(f"the data loader gave {sum(sizes) - sum(pending) + buffered} images where "
                           f"{sum(sizes)} were asked for")


def iter_eval_batches(
        path: str | Path,
        indices: np.ndarray,
        sizes: Sequence[int],
        *,
        resolution: int,
        device: torch.device,
        num_workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the images ``indices`` (in that order) as batches of ``sizes``: float32 [0,1] NCHW and int64 labels.

    Args:
        path: a val ``.beton`` or an ImageNet-style folder.
        indices: dataset indices, sorted.
        sizes: batch sizes, summing to ``len(indices)``.
        resolution: side of the square crop.
        device: where the batches go.
        num_workers: loader workers.
    """
    path = Path(path)
    _check_source(path)
    if sum(sizes) != len(indices):
        raise ValueError(f"batch sizes sum to {sum(sizes)} but {len(indices)} indices were given")
    if len(indices) == 0:
        return
    loader_batch = max(sizes)
    if _is_beton(path):
        from rat.data import build_val_loader

        loader: Iterable = build_val_loader(str(path), batch_size=loader_batch, resolution=resolution, device=device,
                                            num_workers=num_workers, indices=np.asarray(indices))
        stream = ((x.float(), y.long().reshape(-1)) for x, y in loader)
    else:
        from torch.utils.data import DataLoader, Subset

        dataset = Subset(_image_folder(path, resolution), [int(i) for i in indices])
        loader = DataLoader(dataset, batch_size=loader_batch, shuffle=False, num_workers=num_workers)
        stream = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
    yield from _rechunk(stream, sizes)
