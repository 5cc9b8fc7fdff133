"""Evaluation images: the fixed subset of the validation set, its shards, and batches at a given resolution.

Subsets (``--subset``), the same for every model, threat model and resolution, so numbers are comparable:

* ``robustbench``: RobustBench's fixed list of 5,000 ImageNet-1k val files (``assets/
  robustbench_imagenet_test_image_ids.txt``, see ``assets/NOTICE.md``), the first ``n_ex`` of it, as
  ``robustbench.data.load_imagenet(n_ex)`` evaluates — the paper's images. Files are found by name (``<wnid>/<file>``):
  a folder's relative paths, or the names a beton's writer recorded (``files`` in its classes file).
* ``seeded``: with ``N`` images in the validation set in its canonical order (a beton's sample order; for a folder,
  torchvision ``ImageFolder`` order: classes sorted by name, files sorted within a class), the images with indices
  ``sorted(numpy.random.default_rng(0).permutation(N)[:n_ex])``. The subset for a smaller ``n_ex`` is not a prefix of
  a larger one, but it is the same on every machine and for every model.
* ``auto`` (default): ``robustbench`` when the val set is ImageNet-1k (1000 classes, ILSVRC2012 val file names),
  ``seeded`` otherwise. A 1000-class beton that does not record its file names is refused (rewrite it with
  tools/write_ffcv.py, or pass ``--subset seeded``) rather than silently evaluated on other images.

Preprocessing is RobustBench's for ImageNet at resolution ``r`` (``AA_eval.py`` / ``load_imagenet``): the decoded image
as a PIL image, ``torchvision.transforms.Resize(floor(r / 0.875), BICUBIC)`` (short side; PIL's bicubic with its
antialiasing), ``CenterCrop(r)``, ``ToTensor()``. A folder is read as torchvision's ``ImageFolder`` reads it (PIL
decoding, ``convert('RGB')``), listed by real path (:func:`rat.data.list_image_folder`: symbolic link loops and files
reached twice refused). A beton is read sample by sample (:class:`rat.data.BetonImages`: the stored pixels, not the
FFCV loader's crop-and-resize) and goes through the same transform, so a beton that stores the original pixels
(``tools/write_ffcv.py --cfg.split=val``: raw, full size) gives exactly the folder's tensors. JPEG-compressed or
downscaled betons do not (the result records how the beton stores its images, and the log warns).
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rat.data import VAL_CROP_RATIO

__all__ = [
    "SUBSETS", "SUBSET_RULE", "ROBUSTBENCH_RULE", "dataset_size", "eval_subset", "iter_eval_batches",
    "preprocessing_info", "resize_size", "robustbench_image_ids", "select_subset", "shard_batches",
]

_logger = logging.getLogger(__name__)

SUBSET_SEED = 0
SUBSETS = ("auto", "robustbench", "seeded")
SUBSET_RULE = "sorted(numpy.random.default_rng(0).permutation(N)[:n_ex])"
ROBUSTBENCH_RULE = "RobustBench's ImageNet list (robustbench/helper_files/imagenet_test_image_ids.txt), first n_ex"
ROBUSTBENCH_IDS = Path(__file__).with_name("assets") / "robustbench_imagenet_test_image_ids.txt"
IMAGENET_CLASSES = 1000
_IMAGENET_VAL_NAME = re.compile(r"^n\d{8}/ILSVRC2012_val_\d{8}\.JPEG$")
TRANSFORM = "Resize(floor(r / 0.875), bicubic, PIL) + CenterCrop(r), RobustBench's ImageNet preprocessing"


def resize_size(resolution: int) -> int:
    """The short side an image is resized to before the center crop: ``floor(resolution / 0.875)``
    (``rat.data.VAL_CROP_RATIO``, the crop of the beton val loader)."""
    return math.floor(resolution / VAL_CROP_RATIO)  # 0.875 and 8r/7 are exact enough in binary: never off by one


def eval_subset(dataset_size: int, n_ex: int) -> np.ndarray:
    """The sorted indices of the ``n_ex`` images of the seeded subset of a validation set of ``dataset_size`` images.

    Raises:
        ValueError: ``n_ex`` is not in ``1..dataset_size``.
    """
    if not 1 <= n_ex <= dataset_size:
        raise ValueError(f"n_ex={n_ex} does not fit a validation set of {dataset_size} images: "
                         f"pass --n-ex between 1 and {dataset_size}")
    perm = np.random.default_rng(SUBSET_SEED).permutation(dataset_size)
    return np.sort(perm[:n_ex]).astype(np.int64)


@cache
def robustbench_image_ids() -> tuple[str, ...]:
    """RobustBench's 5,000 ImageNet val files, ``<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``, in RobustBench's order."""
    return tuple(line.strip() for line in ROBUSTBENCH_IDS.read_text().splitlines() if line.strip())


def _file_names(path: Path) -> list[str] | None:
    """Every sample's file name relative to the val folder (``<class>/<file>``), or None if a beton lacks them."""
    if _is_beton(path):
        from rat.data import read_beton_info

        files = read_beton_info(path).get("files")
        return [str(f) for f in files] if isinstance(files, list) else None
    dataset = _FolderDataset(path, None)
    return [Path(p).relative_to(path).as_posix() for p, _ in dataset.samples]


def _num_classes(path: Path) -> int:
    if _is_beton(path):
        from rat.data import read_classes

        return len(read_classes(path))
    return len(_FolderDataset(path, None).classes)


def select_subset(path: str | Path, n_ex: int, subset: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """The sorted dataset indices of the evaluation images and the subset's identity (for the result JSON).

    Args:
        path: a val ``.beton`` or an ImageNet-style folder.
        n_ex: number of images.
        subset: ``auto``, ``robustbench`` or ``seeded`` (see the module docstring).

    Raises:
        ValueError: unknown subset, bad ``n_ex``, or a RobustBench subset that the data cannot provide.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}: use one of {', '.join(SUBSETS)}")
    path = Path(path)
    n_total = dataset_size(path)
    names = None
    if subset in ("auto", "robustbench"):
        names = _file_names(path)
        imagenet = _num_classes(path) == IMAGENET_CLASSES
        looks_like_val = names is not None and all(_IMAGENET_VAL_NAME.match(n) for n in names)
        if subset == "auto":
            if imagenet and names is None:
                raise ValueError(f"{path} has 1000 classes but does not record its file names, so RobustBench's "
                                 "ImageNet subset cannot be found in it: rewrite it with tools/write_ffcv.py (it "
                                 "records them), or pass --subset seeded")
            subset = "robustbench" if imagenet and looks_like_val else "seeded"
    if subset == "seeded":
        indices = eval_subset(n_total, n_ex)
        info: dict[str, Any] = {"rule": SUBSET_RULE}
    else:
        ids = robustbench_image_ids()
        if not 1 <= n_ex <= len(ids):
            raise ValueError(f"n_ex={n_ex}: RobustBench's ImageNet subset has {len(ids)} images; pass --n-ex between "
                             f"1 and {len(ids)}")
        if names is None:
            raise ValueError(f"{path} does not record its file names: rewrite it with tools/write_ffcv.py, or pass "
                             "--subset seeded")
        where = {name: i for i, name in enumerate(names)}
        missing = [name for name in ids[:n_ex] if name not in where]
        if missing:
            raise ValueError(f"{len(missing)} of RobustBench's ImageNet images are not in {path} (e.g. {missing[0]}): "
                             "evaluate the full ImageNet-1k val set, or pass --subset seeded")
        indices = np.sort(np.array([where[name] for name in ids[:n_ex]], dtype=np.int64))
        info = {"rule": ROBUSTBENCH_RULE,
                "list_sha256": hashlib.sha256(ROBUSTBENCH_IDS.read_bytes()).hexdigest()}
    info.update({"name": subset, "dataset_size": n_total,
                 "indices_sha256": hashlib.sha256(indices.tobytes()).hexdigest()})
    return indices, info


def preprocessing_info(path: str | Path) -> dict[str, Any]:
    """How the evaluation images are made, for the result JSON: the transform, the source and whether its pixels are
    the original ones (a folder; a beton written raw at full size) or not (JPEG-compressed or downscaled samples)."""
    path = Path(path)
    if not _is_beton(path):
        return {"transform": TRANSFORM, "source": "image folder (PIL decoding)", "original_pixels": True}
    from rat.data import read_beton_info

    options = read_beton_info(path).get("options", {})
    original = options.get("write_mode") == "raw" and options.get("max_resolution") is None
    info = {"transform": TRANSFORM, "source": "beton", "write_mode": options.get("write_mode"),
            "max_resolution": options.get("max_resolution"), "original_pixels": original}
    if not original:
        _logger.warning("%s stores %s images%s: the evaluation images are not pixel-identical to RobustBench's; "
                        "write val betons with tools/write_ffcv.py --cfg.split=val (raw, full size, see docs/eval.md)",
                        path, options.get("write_mode"),
                        f" resized to at most {options.get('max_resolution')} px" if options.get("max_resolution")
                        else "")
    return info


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


def _eval_transform(resolution: int):
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resize_size(resolution), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
    ])


class _FolderDataset(torch.utils.data.Dataset):
    """An ImageNet-style val folder as ``torchvision.datasets.ImageFolder`` reads it (same samples, order, classes and
    PIL decoding, ``convert('RGB')``), listed by :func:`rat.data.list_image_folder`: by real path, so a symbolic link
    loop or one file reached twice is refused, as when the folder is written to a beton."""

    def __init__(self, path: Path, resolution: int | None):
        from rat.data import list_image_folder

        try:
            self.samples, self.classes = list_image_folder(path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc} (an ImageNet-style val folder holds one subfolder of images per class): "
                                    "pass --data such a folder or a val .beton") from exc
        self.transform = None if resolution is None else _eval_transform(resolution)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import default_loader

        file, label = self.samples[index]
        image = default_loader(file)
        return (image if self.transform is None else self.transform(image)), label


class _BetonDataset(torch.utils.data.Dataset):
    """A beton's stored images through the evaluation transform (PIL, as for a folder)."""

    def __init__(self, path: Path, resolution: int):
        from rat.data import BetonImages

        self.images = BetonImages(path)
        self.transform = _eval_transform(resolution)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image, label = self.images[index]
        return self.transform(Image.fromarray(image)), label


def dataset_size(path: str | Path) -> int:
    """Number of images in a val beton or an ImageNet-style folder."""
    path = Path(path)
    _check_source(path)
    if _is_beton(path):
        from rat.data.meta import check_beton

        return check_beton(path)
    return len(_FolderDataset(path, None))


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
    from torch.utils.data import DataLoader, Subset

    dataset = _BetonDataset(path, resolution) if _is_beton(path) else _FolderDataset(path, resolution)
    loader = DataLoader(Subset(dataset, [int(i) for i in indices]), batch_size=max(sizes), shuffle=False,
                        num_workers=num_workers)
    stream = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()) for x, y in loader)
    yield from _rechunk(stream, sizes)
