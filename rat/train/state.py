"""The training state: everything a run changes as it trains, and the checkpoint that is its ``state_dict``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rat.augment import Augmentation
from rat.train.checkpoint import rng_state, set_rng_state
from rat.train.distributed import batchnorm_stats, check_replicas_in_sync, gather_objects, mean_over_ranks

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

    from rat.attacks import Attack

_logger = logging.getLogger(__name__)


@dataclass(eq=False)
class TrainState:
    """Model, EMA, optimizer, scaler, attack, augmentation and progress of one rank's run.

    ``epoch`` counts finished epochs (so it is also the 0-based index of the epoch in progress), ``batches_done`` the
    batches of that epoch already trained (non-zero only in a checkpoint written mid-epoch, on SIGTERM), ``step`` the
    optimizer updates of the whole run; :func:`rat.train.engine.train_one_epoch` advances ``step`` and
    ``batches_done``. ``best`` is the best robust accuracy so far (-1 before any), ``metrics`` those of the last epoch
    this process finished. ``arch``, ``model_kwargs`` and ``config`` describe the run; the checkpoint records them so
    that it rebuilds the model (``rat.models.create_model_from_checkpoint``) and so that a resume can refuse a changed
    configuration. ``local_bn``: every rank normalizes its own batch (BatchNorm without SyncBatchNorm on more than one
    process), so the BatchNorm running statistics differ between ranks until :meth:`average_batchnorm`;
    ``global_batch`` (per-rank batch × gradient accumulation × world size) is a record. ``augmentation`` (none by
    default) is saved as its ``state_dict`` (the adversarial policy's, under ``augment_policy``) and its generator
    (per rank, with the other RNG states).
    """

    module: nn.Module  # the unwrapped model (no DDP, not compiled): what the checkpoint holds
    optimizer: torch.optim.Optimizer
    attack: Attack
    ema: ModelEmaV3 | None = None
    scaler: torch.amp.GradScaler | None = None
    augmentation: Augmentation = field(default_factory=Augmentation)
    epoch: int = 0
    step: int = 0
    batches_done: int = 0
    best: float = -1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    arch: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    local_bn: bool = False
    global_batch: int = 0

    def _bn_holders(self) -> list[tuple[str, nn.Module]]:
        """The checkpoint keys and modules whose BatchNorm statistics are per rank (the model and its EMA)."""
        if not self.local_bn:
            return []
        return [("model", self.module)] + ([("model_ema", self.ema.module)] if self.ema is not None else [])

    def average_batchnorm(self) -> None:
        """Collective under DDP: with ``local_bn``, replace the BatchNorm running statistics of the model and its EMA
        by their mean over the ranks (timm's ``distribute_bn`` in reduce mode); a no-op otherwise. The trainer calls
        it at every epoch end, before validation and the checkpoint."""
        device = next(self.module.parameters()).device
        for _, module in self._bn_holders():
            stats = batchnorm_stats(module)
            for name, mean in mean_over_ranks(stats, device).items():
                stats[name].copy_(mean)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: ``model, model_ema, optimizer, scaler, epoch, step, batches_done, arch, attack,
        replicas_in_sync, model_kwargs, config, rng, metrics, best_robust, augment_policy, batchnorm_ranks,
        global_batch``.

        Collective under DDP: every rank calls it. It first checks that the model, its EMA and the policy's
        controller are the same on every rank (``replicas_in_sync``: the number of ranks compared) and gathers every
        rank's RNG states (``rng``, in rank order); rank 0 then writes the result. With ``local_bn`` the model's and
        the EMA's BatchNorm statistics are the mean over the ranks (the only tensors the replica check then leaves
        out), and ``batchnorm_ranks`` holds each rank's own (in rank order), so that a run resumed mid-epoch continues
        exactly; the live statistics are left as they are.

        Raises:
            RuntimeError: the replicas diverged (naming the first tensor that differs).
        """
        weights = {"model": self.module.state_dict(),
                   "model_ema": self.ema.module.state_dict() if self.ema is not None else None}
        own: dict[str, dict[str, torch.Tensor]] = {}
        device = next(self.module.parameters()).device
        for key, module in self._bn_holders():
            stats = batchnorm_stats(module)
            own[key] = {name: t.detach().to("cpu", copy=True) for name, t in stats.items()}
            weights[key].update(mean_over_ranks(stats, device))
        in_sync = check_replicas_in_sync(self.module, exclude=own.get("model", {}))
        if self.ema is not None:
            check_replicas_in_sync(self.ema.module, exclude=own.get("model_ema", {}))
        for module in self.augmentation.replicated_modules():
            check_replicas_in_sync(module)
        rngs = gather_objects(rng_state(self.augmentation.generator))
        bn_ranks = gather_objects(own) if self.local_bn else None
        return {"model": weights["model"], "model_ema": weights["model_ema"],
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "step": self.step, "batches_done": self.batches_done, "arch": self.arch,
                "attack": self.attack.state_dict(), "replicas_in_sync": in_sync, "model_kwargs": self.model_kwargs,
                "config": self.config, "rng": rngs, "metrics": self.metrics, "best_robust": self.best,
                "augment_policy": self.augmentation.state_dict(),
                "batchnorm_ranks": bn_ranks, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint of :meth:`state_dict` (also one that an earlier rat version wrote: a missing
        ``batches_done``, ``best_robust``, ``scaler``, ``model_ema``, ``augment_policy`` or ``rng`` is a fresh start
        of that part, with a warning where it changes the run).

        ``arch``, ``model_kwargs`` and ``config`` describe the checkpoint and are checked before (the model is built
        from the current configuration); ``metrics``, ``replicas_in_sync`` and ``global_batch`` are records, not
        state. This rank takes its own RNG states, and with ``local_bn`` its own BatchNorm statistics, when the
        checkpoint has one per rank of this run (otherwise every rank continues from the mean).

        Raises:
            ValueError: the checkpoint's policy does not fit this run's search space.
            RuntimeError: weights that do not fit the model (strict loading).
        """
        self.module.load_state_dict(state["model"])
        if self.ema is not None and state.get("model_ema") is not None:
            self.ema.module.load_state_dict(state["model_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.batches_done = state["epoch"], state["step"], state.get("batches_done", 0)
        self.best = state.get("best_robust", -1.0)
        self.attack.load_state_dict(state["attack"])
        self.augmentation.load_state_dict(state.get("augment_policy"))
        bn_ranks = state.get("batchnorm_ranks") or []
        if len(bn_ranks) == self.world_size:
            for key, module in self._bn_holders():
                stats = batchnorm_stats(module)
                for name, value in bn_ranks[self.rank].get(key, {}).items():
                    stats[name].copy_(value)
        rngs = state.get("rng") or []
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank], self.augmentation.generator)
        else:
            _logger.warning("checkpoint has RNG states for %d ranks, this run has %d: continuing with fresh seeds",
                            len(rngs), self.world_size)
