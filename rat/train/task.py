"""The adversarial training step's loss as one object (timm ``task/classification.py`` spirit)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from rat.attacks import Attack, adversarial_loss

if TYPE_CHECKING:
    from rat.attacks.training import AdversarialLoss


class AdversarialTask:
    """Model, attack and criterion → the training loss of a batch.

    Calling the task on ``(x, target)`` attacks the batch on the unwrapped module (in eval mode, the previous mode
    restored after), then computes ``(1 − mixed_loss)·L(model(x_adv), target) + mixed_loss·L(model(x), target)``
    through ``model`` as the trainer holds it (DDP-wrapped, compiled, ...), so that the gradient all-reduce happens
    once, in the trainer's ``backward``; see :func:`rat.attacks.adversarial_loss`, which it wraps.

    Args:
        model: the training model (possibly DDP-wrapped or compiled).
        attack: the training attack, built on the same (unwrapped) model; ``NoAttack`` for clean training.
        criterion: loss of (logits, targets), e.g. timm ``SoftTargetCrossEntropy`` for mixup targets.
        mixed_loss: weight in [0, 1] of the clean loss (``adv.mixed_loss``; 0 = adversarial only).
    """

    def __init__(self, model: nn.Module, attack: Attack, criterion: Callable[[Tensor, Tensor], Tensor],
                 mixed_loss: float = 0.0) -> None:
        if not 0.0 <= mixed_loss <= 1.0:
            raise ValueError(f"mixed_loss must lie in [0, 1], got {mixed_loss}")
        self.model = model
        self.attack = attack
        self.criterion = criterion
        self.mixed_loss = mixed_loss

    def __call__(self, x: Tensor, target: Tensor) -> AdversarialLoss:
        """``AdversarialLoss(loss, output, x_adv, clean_output)`` of the batch (``clean_output`` only when
        ``mixed_loss > 0``)."""
        return adversarial_loss(self.model, self.attack, self.criterion, x, target, clean_weight=self.mixed_loss)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attack={self.attack!r}, criterion={self.criterion!r}, " \
               f"mixed_loss={self.mixed_loss})"
