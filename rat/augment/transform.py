"""The base of the batch augmentations (:class:`BatchTransform`) and how they draw their random parameters: from a CPU
``torch.Generator`` (noise on the batch's device from a seed it gives), on one CPU thread."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["BatchTransform", "device_generator"]


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, 3, H, W) batch in [0, 1], got {x.dtype} {tuple(x.shape)}")


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator to draw noise on ``device`` from: the CPU ``generator`` itself on the CPU, else a generator on
    ``device`` seeded by one draw from it."""
    if device.type == "cpu":
        return generator
    dev_gen = torch.Generator(device=device)
    dev_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return dev_gen


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError("pass a CPU torch.Generator: the per-image parameters are drawn on the CPU (the noise "
                             "is drawn on the batch's device from a seed it gives)")
        return generator
    fresh = torch.Generator()
    fresh.manual_seed(int(torch.randint(0, 2**62, (1,))))  # follows torch.manual_seed
    return fresh


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the batch ops on one intra-op thread. They are small (the few rows that drew one op) and many,
    so OpenMP's wake-ups cost more than its threads save: RandAugment + random erasing on 64 images of 160 px take
    0.47 ms per image on one thread against 0.62 on two (2-core machine), and the loader's decoding threads keep the
    other cores. It also makes the CPU result independent of the machine's thread count (reductions such as
    Contrast's mean are summed in one order). Other devices are left alone."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchTransform:
    """Base of the batch augmentations: ``transform(x, generator)`` checks the batch, augments a private copy in
    ``x``'s memory format in place with :meth:`apply_` (no autograd), and returns it; ``x`` is untouched.

    The ops work on NCHW and channels_last batches alike (rows are gathered in the batch's own layout), so a
    channels_last batch from the loaders is never transposed as a whole.

    The per-image parameters come from the CPU ``generator`` (without one they follow ``torch.manual_seed``), so the
    same generator state gives the same batch on a given device.
    """

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        gen = _cpu_generator(generator)
        with torch.no_grad(), _one_cpu_thread(x.device):
            out = x.clone()  # preserves x's memory format
            self.apply_(out, gen)
        return out

    def apply_(self, out: torch.Tensor, gen: torch.Generator) -> None:
        """Augment ``out`` (a float (N, 3, H, W) batch, any memory format) in place, drawing the parameters from the
        CPU generator ``gen``."""
        raise NotImplementedError


