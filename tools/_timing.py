"""Wall-clock timing shared by the benchmark scripts: a device sync, and seconds per call after a warm-up call."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean wall seconds of ``fn()`` over ``repeats`` calls, after one untimed warm-up call (kernels, allocator,
    grid caches)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


class OnDeviceBatches:
    """The same on-device batch ``n`` times: a loader for ``rat.train.engine.train_one_epoch`` with no data cost."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int):
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.x, self.y


def seconds_per_train_step(epoch: Callable[[int], object], device: torch.device, steps: int, warmup: int) -> float:
    """Wall seconds per step of ``epoch(n)`` (which takes ``n`` training steps), over ``steps`` steps after an untimed
    ``epoch(warmup)`` (compilation, cudnn autotuning, allocator)."""
    epoch(warmup)
    sync(device)
    start = time.perf_counter()
    epoch(steps)
    sync(device)
    return (time.perf_counter() - start) / steps


def images_per_second(batches: Callable[[], Iterable[int]], warmup_epochs: int, min_seconds: float) -> dict[str, float]:
    """Images/s over whole epochs (at least ``min_seconds`` of them) after ``warmup_epochs`` untimed ones; ``batches()``
    yields the batch sizes of one epoch (a loader's batches are ready when yielded: the loaders sync)."""
    for _ in range(warmup_epochs):
        for _ in batches():
            pass
    images, epochs = 0, 0
    start = time.perf_counter()
    while True:
        images += sum(batches())
        epochs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    return {"img_s": images / elapsed, "images": images, "epochs": epochs, "seconds": elapsed}
