"""Multi-norm adversarial training at the cost of one norm (E-AT, Croce & Hein 2022): alternate norms per batch."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .base import Attack

_logger = logging.getLogger(__name__)


class MultiNormAttack(Attack):
    """Round-robin over several attacks, one per batch: call k uses ``attacks[(k // calls_per_norm) % len(attacks)]``.

    Each attack keeps its own norm, ε and number of steps (e.g. Linf 4/255 with 2 steps and L1 75 with 2 steps),
    so a training step costs as much as a single-norm step. The call counter is part of :meth:`state_dict`, so a
    resumed run continues with the right norm.

    Args:
        attacks: the attacks to alternate (at least one).
        calls_per_norm: consecutive calls per attack: the micro-batches of one optimizer step under gradient
            accumulation, so that the norm alternates per optimizer step as it does without accumulation.
    """

    name = "multi"

    def __init__(self, attacks: Sequence[Attack], calls_per_norm: int = 1) -> None:
        attacks = list(attacks)
        if not attacks:
            raise ValueError("MultiNormAttack needs at least one attack")
        for attack in attacks:
            if not isinstance(attack, Attack):
                raise TypeError(f"MultiNormAttack takes Attack objects, got {type(attack).__name__}")
        if calls_per_norm < 1:
            raise ValueError(f"calls_per_norm={calls_per_norm} must be >= 1")
        super().__init__(attacks[0].model)
        self.attacks = attacks
        self.calls_per_norm = calls_per_norm
        self._calls = 0

    @property
    def norms(self) -> list[str]:
        """The norm of every attack, in order."""
        return [getattr(attack, "norm", "none") for attack in self.attacks]

    @property
    def next_attack(self) -> Attack:
        """The attack the next ``perturb`` call will use."""
        return self.attacks[self._calls // self.calls_per_norm % len(self.attacks)]

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Attack the batch with the next attack in the rotation."""
        attack = self.next_attack
        self._calls += 1
        return attack.perturb(x, y)

    def set_eps_scale(self, scale: float) -> None:
        """Scale the radius of every attack (ε warm-up)."""
        for attack in self.attacks:
            attack.set_eps_scale(scale)

    def state_dict(self) -> dict[str, Any]:
        """The rotation counter and every attack's state."""
        return {"calls": self._calls, "attacks": [attack.state_dict() for attack in self.attacks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if len(state["attacks"]) != len(self.attacks):
            raise ValueError(f"checkpoint holds {len(state['attacks'])} attack states, this MultiNormAttack has "
                             f"{len(self.attacks)}: build it with the same norms as the checkpointed run")
        self._calls = int(state["calls"])
        for attack, attack_state in zip(self.attacks, state["attacks"]):
            attack.load_state_dict(attack_state)

    def __repr__(self) -> str:
        return f"MultiNormAttack([{', '.join(repr(a) for a in self.attacks)}])"
