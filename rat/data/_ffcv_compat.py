"""Everything rat does around ffcv 1.0.2's behaviour, in one place, with the version it was written for.

The loaders (:mod:`rat.data.loaders`) and the writer (:mod:`rat.data.writer`) use ffcv through these:

* :func:`check_pipeline` (run by :func:`make_loader` on every pipeline): ffcv 1.0.2 hangs forever while building a
  ``Loader`` whose pipeline has a jitted op after a non-jitted one (e.g. ``NormalizeImage`` after ``ToTensor`` on CPU;
  libffcv/ffcv#396): its stage grouping re-queues the jitted node into the set it is draining. Such pipelines are
  refused with :class:`PipelineError` instead.
* :func:`make_loader` keeps the numba-compiled code of every loader alive (see ``_COMPILED_PIPELINES``).
* :func:`use_reproducible_quasi_random` swaps in a quasi-random order that depends on ``(seed, epoch)`` only.
* :func:`seeded_resized_crop_class`: RandomResizedCrop + flip with reproducible draws; its decode kernel is ffcv's
  ``RandomResizedCropRGBImageDecoder`` kernel with a seeding step (ffcv has no hook for it).
* :func:`make_writer_class`: ffcv's ``DatasetWriter`` with its private ``_write_common`` overridden so that a dead
  worker process fails the write (:class:`WriterProcessError`) instead of hanging it.

All of these touch ffcv internals, so importing this module checks the installed version (:func:`check_ffcv_version`)
and warns when it is not :data:`FFCV_VERSION`.
"""
from __future__ import annotations

import importlib.metadata
import os
import queue
import time
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from multiprocessing import Process
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FFCV_VERSION", "PipelineError", "WriterProcessError", "check_ffcv_version", "check_pipeline", "make_loader",
    "make_writer_class", "seeded_resized_crop_class", "use_reproducible_quasi_random",
]

FFCV_VERSION = "1.0.2"


def check_ffcv_version(installed: str | None = None) -> bool:
    """Whether ``installed`` (default: the installed ffcv's version) is the one these workarounds were written for;
    warns (``RuntimeWarning``) when it is not. Without ffcv installed it returns False quietly: importing ffcv then
    fails with its own error where it is used."""
    if installed is None:
        try:
            installed = importlib.metadata.version("ffcv")
        except importlib.metadata.PackageNotFoundError:
            return False
    if installed == FFCV_VERSION:
        return True
    warnings.warn(f"ffcv {installed} is installed, but rat's ffcv workarounds (rat/data/_ffcv_compat.py: a private "
                  f"DatasetWriter method, a copied decode kernel, the libffcv/ffcv#396 guard) were written for ffcv "
                  f"{FFCV_VERSION}: install ffcv=={FFCV_VERSION}, or check those workarounds against {installed}",
                  RuntimeWarning, stacklevel=2)
    return False


check_ffcv_version()

# The numba-compiled code of every loader built in this process, kept alive on purpose. When the cyclic garbage
# collector frees ffcv's compiled decoders, numba's dispatcher finalizer fails (KeyError on its overloads dict) and
# the "Exception ignored" report can fire inside another thread's or an outer ast.parse; on Python 3.11 the shared AST
# recursion counter then trips "SystemError: AST constructor recursion depth mismatch" (seen under pytest, cpython
# gh-106905). A few MiB per loader; loaders are built a handful of times per process.
_COMPILED_PIPELINES: list[Any] = []


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


def make_loader(path: str, *, batch_size: int, num_workers: int, order: Any, distributed: bool, seed: int,
                 indices: np.ndarray | None, pipelines: dict[str, list[Any]], drop_last: bool, os_cache: bool,
                 batches_ahead: int) -> Any:
    """An ffcv ``Loader`` (same arguments); every pipeline goes through :func:`check_pipeline` first, and the
    loader's compiled code is kept alive for the life of the process (``_COMPILED_PIPELINES``)."""
    from ffcv.loader import Loader

    for name, ops in pipelines.items():
        check_pipeline(name, ops)
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers, os_cache=os_cache, order=order,
                    distributed=distributed, seed=seed, indices=indices, pipelines=pipelines, drop_last=drop_last,
                    batches_ahead=batches_ahead)
    _COMPILED_PIPELINES.append(loader.code)
    return loader


def use_reproducible_quasi_random(loader: Any) -> None:
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
def seeded_resized_crop_class() -> type:
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



class WriterProcessError(RuntimeError):
    """An ffcv writer process died (its error message, and a hint for a full disk or a too small page)."""


def _guarded_worker(notes_dir: str, work_fn: Callable[..., None], *args: Any) -> None:
    """Run one ffcv writer worker; leave any failure's message for the parent instead of a traceback."""
    try:
        work_fn(*args)
    except BaseException as exc:  # reported to the parent, which raises one clear error
        try:
            with open(os.path.join(notes_dir, f"worker-{os.getpid()}.err"), "w") as fp:
                fp.write(f"{type(exc).__name__}: {exc}")
        except OSError:
            pass  # the disk may be the full one; the parent still sees the exit code
        os._exit(1)


def make_writer_class() -> type:
    """A ffcv ``DatasetWriter`` whose orchestration notices dead workers instead of waiting on them forever."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    from rat.logging import progress

    class _Writer(DatasetWriter):
        notes_dir: str = ""
        progress: str = "0"  # rat.logging.progress's setting
        target: str = ""

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            import ctypes
            from multiprocessing import Queue, Value

            self.num_samples = num_samples
            self.prepare()
            try:
                work_queue: Queue = Queue()
                for todo in queue_content:
                    work_queue.put(todo)
                for _ in range(self.num_workers):
                    work_queue.put(None)
                allocations_queue: Queue = Queue()
                done = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                worker_args = (work_queue, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                               allocations_queue, *extra_worker_args)
                procs = [Process(target=_guarded_worker, args=(self.notes_dir, work_fn, *worker_args))
                         for _ in range(self.num_workers)]
                for proc in procs:
                    proc.start()
                try:
                    allocations = self._wait(procs, done, allocations_queue)
                finally:
                    for proc in procs:
                        if proc.is_alive():
                            proc.terminate()
                        proc.join()
                self.finalize(allocations)
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _check_workers(self, procs: list[Process]) -> None:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if not dead:
                return
            messages = []
            for err in sorted(Path(self.notes_dir).glob("worker-*.err")):
                messages.append(err.read_text())
            detail = "; ".join(sorted(set(messages))) or f"exit codes {[p.exitcode for p in dead]}"
            hint = ""
            if "No space left" in detail or "File too large" in detail or "Errno 28" in detail:
                hint = " (the output disk is full: free space or write elsewhere)"
            elif "page size" in detail or "Not enough memory to fit" in detail:
                hint = " (an image is larger than a beton page: set max_resolution)"
            raise WriterProcessError(f"writing {self.target} failed in a writer process: {detail}{hint}")

        def _wait(self, procs: list[Process], done: Any, allocations_queue: Any) -> list:
            bar = progress(total=self.num_samples, setting=self.progress, desc=Path(self.target).name, unit="img",
                           mininterval=0.5)
            shown = 0
            try:
                while True:
                    value = int(done.value)
                    bar.update(value - shown)
                    shown = value
                    self._check_workers(procs)
                    if value >= self.num_samples:
                        break
                    time.sleep(0.05)
            finally:
                bar.close()
            allocations: list = []
            for _ in procs:
                while True:
                    try:
                        allocations.extend(allocations_queue.get(timeout=0.5))
                        break
                    except queue.Empty:
                        self._check_workers(procs)
            return allocations

    return _Writer

