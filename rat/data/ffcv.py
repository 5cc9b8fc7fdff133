"""FFCV train and val loaders that yield ``(x, y)``: x float32 in [0, 1], NCHW channels_last, on the device; y int64.

Pipelines (the only shapes shipped; :func:`check_pipeline` validates every pipeline before ffcv sees it):

* image, train: ``SeededRandomResizedCrop(res)`` (crop + flip, reproducible) ``-> ToTensor [-> ToDevice]
  -> ToTorchImage(channels_last)``, then ``uint8 -> float / 255`` in torch on the device.
* image, val: ``CenterCropRGBImageDecoder(res, ratio=224/256) -> ToTensor [-> ToDevice] -> ToTorchImage``, same
  conversion.
* label: ``IntDecoder -> ToTensor [-> ToDevice]``, flattened to ``(B,)`` int64.

ffcv 1.0.2 hangs forever while building a ``Loader`` whose pipeline has a jitted op after a non-jitted one (e.g.
``NormalizeImage`` after ``ToTensor`` on CPU; libffcv/ffcv#396): its stage grouping re-queues the jitted node into the
set it is draining. :func:`check_pipeline` refuses such pipelines with a clear error instead.

Every batch is a fresh tensor owned by the caller: ffcv recycles its buffers, so the loaders copy out of them.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rat.data.writer import IMAGE_FIELD, LABEL_FIELD

__all__ = [
    "VAL_CROP_RATIO", "PipelineError", "TrainLoader", "ValLoader", "build_train_loader", "build_val_loader",
    "check_pipeline", "shard_indices",
]

_logger = logging.getLogger(__name__)

VAL_CROP_RATIO = 224 / 256

# The numba-compiled code of every loader built in this process, kept alive on purpose. When the cyclic garbage
# collector frees ffcv's compiled decoders, numba's dispatcher finalizer fails (KeyError on its overloads dict) and
# the "Exception ignored" report can fire inside another thread's or an outer ast.parse; on Python 3.11 the shared AST
# recursion counter then trips "SystemError: AST constructor recursion depth mismatch" (seen under pytest, cpython
# gh-106905). A few MiB per loader; loaders are built a handful of times per process.
_COMPILED_PIPELINES: list[Any] = []
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


class PipelineError(ValueError):
    """An ffcv pipeline that ffcv 1.0.2 cannot run (it would hang or fail inside the loader)."""


def _op_name(op: Any) -> str:
    return type(op).__name__


def check_pipeline(field: str, ops: Sequence[Any]) -> None:
    """Refuse an ffcv pipeline that would make ffcv 1.0.2's ``Loader`` hang: a jitted op after a non-jitted one.

    Each op's jit mode is what ffcv itself would compute: the state is propagated through the ops'
    ``declare_state_and_memory`` from a jitted decoder state, as ffcv's graph does.

    Args:
        field: the beton field the pipeline reads (for the message).
        ops: the pipeline: an optional decoder first, then ffcv Operations or torch Modules.

    Raises:
        PipelineError: an empty pipeline, an op that is neither an ffcv Operation nor a torch Module, or a jitted op
            after a non-jitted one.
    """
    from ffcv.fields.basics import BasicDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State
    from ffcv.transforms.module import ModuleWrapper

    ops = list(ops)
    if not ops:
        raise PipelineError(f"pipeline for field {field!r} is empty: give at least a decoder and ToTensor()")
    first = ops[0]
    if isinstance(first, BasicDecoder):
        state = State(jit_mode=True, device=torch.device("cpu"), shape=(1,), dtype=np.dtype(first.dtype))
        ops = ops[1:]
    else:
        state = State(jit_mode=True, device=torch.device("cpu"), shape=(8, 8, 3), dtype=np.dtype("u1"))
        if isinstance(first, SimpleRGBImageDecoder):
            ops = ops[1:]
    first_non_jitted: Any = None
    for position, op in enumerate(ops, start=1):
        as_op = ModuleWrapper(op) if isinstance(op, torch.nn.Module) else op
        if not isinstance(as_op, Operation):
            raise PipelineError(f"pipeline for field {field!r}: element {position} ({_op_name(op)}) is neither an "
                                "ffcv Operation nor a torch.nn.Module")
        try:
            state, _ = as_op.declare_state_and_memory(state)
        except (AssertionError, ValueError, TypeError) as exc:
            after = f" (it is jitted and follows the non-jitted {_op_name(first_non_jitted)})" \
                if first_non_jitted is not None else ""
            raise PipelineError(f"pipeline for field {field!r}: {_op_name(op)} cannot follow the ops before it"
                                f"{after}: {exc}. Put jitted ops before ToTensor, or do that work in torch after "
                                "the loader") from exc
        if state.jit_mode and first_non_jitted is not None:
            raise PipelineError(
                f"pipeline for field {field!r}: {_op_name(op)} runs jitted after the non-jitted "
                f"{_op_name(first_non_jitted)}; ffcv 1.0.2 hangs forever building such a Loader (libffcv/ffcv#396). "
                "Put jitted ops (flips, crops, Cutout, NormalizeImage on CPU) before ToTensor, or do that work in "
                "torch after the loader")
        if not state.jit_mode and first_non_jitted is None:
            first_non_jitted = op


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialized torch.distributed process group: launch with "
                           "torchrun and call torch.distributed.init_process_group() before building loaders")
    return dist.get_rank(), dist.get_world_size()


def shard_indices(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The val shard of ``rank``: the ``rank``-th of ``world_size`` contiguous, near-equal runs of ``indices``.

    Shards are disjoint, cover ``indices`` exactly (no padding, unlike DistributedSampler) and keep their order; their
    sizes differ by at most one.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return np.array_split(np.asarray(indices), world_size)[rank]


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


def _make_loader(path: str, *, batch_size: int, num_workers: int, order: Any, distributed: bool, seed: int,
                 indices: np.ndarray | None, pipelines: dict[str, list[Any]], drop_last: bool, os_cache: bool,
                 batches_ahead: int) -> Any:
    from ffcv.loader import Loader

    for name, ops in pipelines.items():
        check_pipeline(name, ops)
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers, os_cache=os_cache, order=order,
                    distributed=distributed, seed=seed, indices=indices, pipelines=pipelines, drop_last=drop_last,
                    batches_ahead=batches_ahead)
    _COMPILED_PIPELINES.append(loader.code)
    return loader


def _use_reproducible_quasi_random(loader: Any) -> None:
    """Make ffcv's quasi-random order a function of (seed, epoch) only.

    ffcv 1.0.2's ``QuasiRandom.sample_order`` shuffles its page table in place, so the order of an epoch depends on
    how often orders were drawn before (the Loader itself draws epoch 0 once when built). Drawing from a pristine copy
    every time restores the contract that a resumed run sees the same order.
    """
    from ffcv.traversal_order.quasi_random import QuasiRandom

    class _ReproducibleQuasiRandom(QuasiRandom):
        def __init__(self, inner_loader: Any):
            super().__init__(inner_loader)
            self._pristine = self.page_to_samples_array.copy()

        def sample_order(self, epoch: int) -> Sequence[int]:
            self.page_to_samples_array = self._pristine.copy()
            return super().sample_order(epoch)

    loader.traversal_order = _ReproducibleQuasiRandom(loader)
    loader.first_traversal_order = loader.traversal_order.sample_order(0)


def _splitmix64(h):
    """The splitmix64 finaliser (a bijective 64-bit mixer); compiled by numba inside the decoder."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


@cache
def _seeded_resized_crop_class() -> type:
    """Build (lazily, as ffcv is imported lazily) the decoder class below."""
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
        """RandomResizedCrop + horizontal flip whose random draws are reproducible.

        ffcv draws crops and flips from numba's per-thread RNG, seeded from the OS: two runs (or a run and its
        resumed continuation) see different crops. Here, before drawing, each sample seeds its decoding thread's RNG
        from ``(seed, sample id, the first sample id of its batch, its position in the batch)``. The batch
        composition is a function of (order seed, epoch), so the crops are a function of (seed, epoch, sample),
        whatever the number of decoding threads, and differ from epoch to epoch. ffcv has no hook for this, hence
        this decoder; the decoding and resizing themselves are ffcv's compiled kernels.
        """

        def __init__(self, output_size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                     seed: int, flip: bool):
            super().__init__(output_size, scale=scale, ratio=ratio)
            self.seed = seed
            self.flip = flip

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            random_crop_c = Compiler.compile(get_random_crop)
            mix = Compiler.compile(_splitmix64)
            scale = np.array(self.scale, dtype=np.float64)
            ratio = np.array(self.ratio, dtype=np.float64)
            key = np.uint64(self.seed % (1 << 63))
            golden = np.uint64(0x9E3779B97F4A7C15)
            flip = self.flip

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                first = np.uint64(batch_indices[0])
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    h = mix(key + np.uint64(source_ix) * golden)
                    h = mix((h ^ (first * golden)) + np.uint64(dst_ix))
                    np.random.seed(np.uint32(h >> np.uint64(32)))
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        image = image_data.reshape(height, width, 3)
                    top, left, crop_h, crop_w = random_crop_c(height, width, scale, ratio)
                    out = destination[dst_ix]
                    resize_crop_c(image, top, top + crop_h, left, left + crop_w, out)
                    if flip and np.random.rand() < 0.5:
                        out[:] = out[:, ::-1].copy()
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCrop


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
    decoder = _seeded_resized_crop_class()((resolution, resolution), scale=tuple(scale), ratio=tuple(ratio), seed=seed,
                                           flip=flip)
    image_ops: list[Any] = [decoder, *_image_tail(device)]
    if in_memory or distributed:
        order = OrderOption.RANDOM
    else:
        order = OrderOption.QUASI_RANDOM
    if not in_memory and distributed:
        _logger.info("in_memory=False with distributed=True: ffcv has no distributed quasi-random order; "
                     "using the random order with the process cache")
    loader = _make_loader(path, batch_size=batch_size, num_workers=num_workers, order=order, distributed=distributed,
                          seed=seed, indices=None if indices is None else np.asarray(indices),
                          pipelines={IMAGE_FIELD: image_ops, LABEL_FIELD: _label_pipeline(device)},
                          drop_last=drop_last, os_cache=in_memory, batches_ahead=batches_ahead)
    if order == OrderOption.QUASI_RANDOM:
        _use_reproducible_quasi_random(loader)
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
    ``distributed=True`` rank ``r`` of ``w`` gets the ``r``-th of ``w`` contiguous, near-equal runs of that order
    (:func:`shard_indices`): disjoint shards covering every sample once, so metrics reduce exactly by summing counts
    (ranks may differ by one batch). The crop is ffcv's: side ``int(crop_ratio * min(h, w))``, offsets
    ``(h - side) // 2`` and ``(w - side) // 2``, area-resized to ``resolution``.
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
        order = shard_indices(order, rank, world)
    if len(order) == 0:
        return ValLoader(None, order, resolution, batch_size)
    image_ops = [CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio), *_image_tail(device)]
    loader = _make_loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                          distributed=False, seed=0, indices=order,
                          pipelines={IMAGE_FIELD: image_ops, LABEL_FIELD: _label_pipeline(device)},
                          drop_last=False, os_cache=True, batches_ahead=batches_ahead)
    return ValLoader(loader, order, resolution, batch_size)

