"""Random erasing on a batch, per image (timm ``RandomErasing`` semantics: probability ``p``; box area ``U(0.02, 1/3)``
of the image over ``count``; log-uniform aspect in ``[0.3, 1/0.3]``; up to 10 tries for a box that fits; ``'pixel'``
mode fills per-pixel normal noise, ``'rand'`` one normal colour per box, ``'const'`` zeros), batched because timm's
loops over images in Python with the global ``random`` module, so it cannot follow a ``torch.Generator``. timm erases
*normalized* tensors; the noise here is ``mean + std * N(0, 1)`` with ``mean=(0, 0, 0), std=(1, 1, 1)`` by default
(the reference recipe's un-normalized pipeline) and is clipped to ``[0, 1]``, so batches keep the [0, 1] contract
that attacks rely on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rat.augment.transform import BatchTransform, device_generator

__all__ = ["BatchRandomErasing"]


class BatchRandomErasing(BatchTransform):
    """timm ``RandomErasing`` semantics on a batch, per image, vectorized, seeded by a ``torch.Generator``.

    Args:
        probability: chance that an image is erased.
        mode: ``'pixel'`` (per-pixel noise), ``'rand'`` (one noise colour per box) or ``'const'`` (``mean``).
        min_area, max_area: box area range as a fraction of the image (divided by the box count).
        min_aspect, max_aspect: aspect ratio range (log-uniform); ``max_aspect`` defaults to ``1 / min_aspect``.
        min_count, max_count: number of boxes per erased image (uniform in the range).
        mean, std: noise is ``mean + std * N(0, 1)`` per channel, then clipped to [0, 1].
    """

    def __init__(self, probability: float = 0.25, mode: str = "pixel", *, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect: float | None = None,
                 min_count: int = 1, max_count: int | None = None, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0)):
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"random erasing mode={mode!r} must be 'pixel', 'rand' or 'const'")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"random erasing probability={probability} must be in [0, 1]")
        max_count = max_count or min_count
        if not 1 <= min_count <= max_count:
            raise ValueError(f"random erasing counts ({min_count}, {max_count}) must satisfy 1 <= min <= max")
        self.probability = probability
        self.mode = mode
        self.area = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1.0 / min_aspect))
        self.count = (min_count, max_count)
        self.mean = torch.tensor([float(v) for v in mean])
        self.std = torch.tensor([float(v) for v in std])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.probability}, mode={self.mode}, count={self.count})"

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Sample boxes: ``(n, max_count, 4)`` int64 ``(top, left, h, w)``, ``h == 0`` where no box is drawn."""
        erase = torch.rand(n, generator=generator) < self.probability
        count = torch.randint(self.count[0], self.count[1] + 1, (n,), generator=generator)
        out = torch.zeros(n, self.count[1], 4, dtype=torch.int64)
        tries = 10
        for slot in range(self.count[1]):
            area = torch.empty(n, tries, dtype=torch.float64).uniform_(*self.area, generator=generator)
            area = area * (height * width) / count.unsqueeze(1)
            aspect = torch.exp(torch.empty(n, tries, dtype=torch.float64).uniform_(*self.log_aspect,
                                                                                   generator=generator))
            h = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
            w = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
            fits = (w < width) & (h < height)
            first = torch.argmax(fits.to(torch.int64), dim=1, keepdim=True)  # first try that fits
            h = h.gather(1, first).squeeze(1)
            w = w.gather(1, first).squeeze(1)
            u_top = torch.rand(n, generator=generator, dtype=torch.float64)
            u_left = torch.rand(n, generator=generator, dtype=torch.float64)
            drawn = erase & (slot < count) & fits.any(dim=1)
            top = torch.floor(u_top * (height - h + 1)).to(torch.int64)
            left = torch.floor(u_left * (width - w + 1)).to(torch.int64)
            out[:, slot] = torch.stack([top, left, h, w], dim=1) * drawn.unsqueeze(1)
        return out

    def apply_(self, out: torch.Tensor, gen: torch.Generator) -> None:
        n, c, height, width = out.shape
        boxes = self.boxes(n, height, width, gen)
        dev_gen = device_generator(gen, out.device)
        rows = torch.nonzero((boxes[:, :, 2] > 0).any(dim=1)).flatten()
        if len(rows) == 0:
            return
        drawn = [(i, int(r), [box for box in boxes[r].tolist() if box[2] > 0]) for i, r in enumerate(rows.tolist())]
        mean = self.mean.to(device=out.device, dtype=out.dtype).view(c, 1)
        std = self.std.to(device=out.device, dtype=out.dtype).view(c, 1)
        # Only the boxes' pixels are drawn and written: per-pixel noise for every box pixel ('pixel'), one colour per
        # erased image ('rand'), or the mean ('const'); rows are painted in place, in any memory format.
        if self.mode == "pixel":
            total = sum(h * w for _, _, row_boxes in drawn for _, _, h, w in row_boxes)
            noise = torch.randn(c, total, generator=dev_gen, device=out.device, dtype=out.dtype)
        elif self.mode == "rand":
            noise = torch.randn(len(rows), c, generator=dev_gen, device=out.device, dtype=out.dtype).T
        else:
            noise = torch.zeros(c, len(rows), device=out.device, dtype=out.dtype)
        fill = (mean + std * noise).clamp_(0.0, 1.0)  # (c, pixels) or (c, erased images)
        offset = 0
        for i, row, row_boxes in drawn:
            for top, left, h, w in row_boxes:
                if self.mode == "pixel":
                    paint = fill[:, offset:offset + h * w].view(c, h, w)
                    offset += h * w
                else:
                    paint = fill[:, i].view(c, 1, 1)
                out[row, :, top:top + h, left:left + w] = paint

