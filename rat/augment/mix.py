"""Mixup/CutMix with label smoothing: timm's ``Mixup`` (:func:`build_mixup`), and :class:`GroupMixup`, the same
inside groups of a batch (the adversarial policy's: each policy's images mix only among themselves)."""
from __future__ import annotations

import torch

__all__ = ["GroupMixup", "build_mixup"]


def build_mixup(
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        *,
        num_classes: int,
        prob: float = 1.0,
        mode: str = "batch",
):
    """timm ``Mixup`` for the recipe (mixup 0.8, cutmix 1.0, switch 0.5, label smoothing 0.1), or ``None``.

    ``mixup_fn(x, y)`` mixes ``x`` in place on its device and returns soft targets ``(N, num_classes)`` (use
    ``timm.loss.SoftTargetCrossEntropy``). It needs an even batch size, and draws from numpy's global RNG (seed it).
    Returns ``None`` when both alphas are 0: label smoothing then belongs to the loss.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2")
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob, mode=mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)


class GroupMixup:
    """timm ``Mixup``/CutMix inside groups: a batch of ``groups`` equal groups (group-major, ``(G·K, C, H, W)``) is
    viewed as ``(G, K, ...)`` and mixed along ``K`` only, image ``k`` of a group with image ``K − 1 − k`` of the same
    group, with one λ (and one CutMix box) for the whole step, drawn by timm exactly as for a plain batch; so no
    image takes pixels from another group (the adversarial policy's groups: each policy's loss stays its own).

    ``mixup`` is a timm ``Mixup`` in ``'batch'`` mode (:func:`build_mixup`); ``K`` must be even. Each group's soft
    targets are timm's ``mixup_target`` of its labels at that λ. Returns ``(mixed images, soft targets (G·K,
    num_classes))``; ``x`` keeps its memory format.
    """

    def __init__(self, mixup, groups: int):
        if mixup.mode != "batch":
            raise ValueError(f"GroupMixup mixes with one lambda per batch: build the Mixup with mode='batch', not "
                             f"{mixup.mode!r}")
        self.mixup, self.groups = mixup, groups

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        n, c, h, w = x.shape
        k = n // self.groups
        if k * self.groups != n or k % 2:
            raise ValueError(f"GroupMixup: {n} images do not form {self.groups} groups of an even size")
        # Policies into channels: flipping dim 0 of (K, G·C, H, W) pairs images k and K - 1 - k of every group.
        by_position = x.view(self.groups, k, c, h, w).transpose(0, 1).reshape(k, self.groups * c, h, w)
        lam = self.mixup._mix_batch(by_position)  # timm's λ and box draw and in-place mix (the body of __call__)
        mixed = by_position.view(k, self.groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        soft = torch.cat([mixup_target(t, self.mixup.num_classes, lam, self.mixup.label_smoothing)
                          for t in target.view(self.groups, k)])
        return mixed, soft
