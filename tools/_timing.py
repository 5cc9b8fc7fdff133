"""Wall-clock timing shared by the benchmark scripts: a device sync, and seconds per call after a warm-up call."""
from __future__ import annotations

import time
from collections.abc import Callable

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
