"""The trainer's one interface to augmentation: :class:`Augmentation` (a fixed per-sample transform, or none, then
Mixup/CutMix), which :class:`rat.augment.adversarial.AdversarialAugment` extends with a policy that learns."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Augmentation"]


class Augmentation:
    """What happens to a training batch before the attack, the loss that matches it, and what the augmentation learns
    from each step. The trainer's engine calls only these methods, the same way for every kind of augmentation:

    * :meth:`apply` for each (micro-)batch: the images and targets to train on;
    * :meth:`observe` after each (micro-)batch's loss, :meth:`end_epoch` after an epoch that ran to its end;
    * :meth:`epoch_stats` for metrics.jsonl, :meth:`state_dict` / :meth:`load_state_dict` for the checkpoint (which
      saves :attr:`generator` with this rank's other RNG states), :meth:`replicated_modules` for its replica check.

    This class is the fixed augmentation, which learns nothing: ``transform(x, generator)`` per sample (e.g.
    :class:`rat.augment.randaugment.BatchAugment`; ``None``: the batch as it is), then ``mixup`` (timm ``Mixup``,
    :func:`rat.augment.mix.build_mixup`; ``None``: hard labels).

    Args:
        transform: the per-sample augmentation, ``transform(x, generator) -> x``.
        mixup: ``mixup(x, y) -> (x, soft targets)``.
        generator: the seeded CPU generator of the random augmentation parameters (per rank).
        label_smoothing: of the cross-entropy without mixup (with mixup, timm folds it into the soft targets).

    Attributes:
        criterion: the loss of (logits, targets) that :meth:`apply`'s targets call for: timm
            ``SoftTargetCrossEntropy`` for mixup's soft targets, else cross-entropy with ``label_smoothing``.
    """

    def __init__(self, transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 mixup: Callable | None = None, *, generator: torch.Generator | None = None,
                 label_smoothing: float = 0.0):
        self.transform, self.mixup, self.generator = transform, mixup, generator
        if mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, mixup={self.mixup is not None})"

    def expand(self, x: torch.Tensor, y: torch.Tensor, *, new_step: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images and labels before mixup: here ``transform(x, generator)`` and ``y``."""
        return (x if self.transform is None else self.transform(x, self.generator)), y

    def apply(self, x: torch.Tensor, y: torch.Tensor, *, new_step: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and targets to train on: :meth:`expand`, then mixup (soft targets) if any.

        ``new_step=False``: another micro-batch of the same optimizer step (gradient accumulation)."""
        x, y = self.expand(x, y, new_step=new_step)
        return (x, y) if self.mixup is None else self.mixup(x, y)

    def observe(self, output: torch.Tensor, target: torch.Tensor, clean_output: torch.Tensor | None = None,
                clean_weight: float = 0.0, *, step_end: bool = True) -> None:
        """Learn from a (micro-)batch's logits on :meth:`apply`'s images (``clean_output``: on the clean images,
        weighted ``clean_weight`` in the loss); ``step_end``: the optimizer step's last micro-batch. Called on every
        rank alike, after the finite-loss check. A fixed augmentation learns nothing."""

    def end_epoch(self) -> None:
        """The end of a training epoch that was not stopped. Nothing to do here."""

    def epoch_stats(self) -> dict[str, Any]:
        """What the augmentation learnt in the epoch, for metrics.jsonl (then reset): nothing here."""
        return {}

    def replicated_modules(self) -> tuple[nn.Module, ...]:
        """Modules that every rank holds identically without DDP (checked at each checkpoint): none here."""
        return ()

    def state_dict(self) -> dict[str, Any] | None:
        """The state a resume needs beyond :attr:`generator`: ``None`` here (a checkpoint's ``augment_policy``)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output (``None`` from a checkpoint without one): nothing to restore here."""
