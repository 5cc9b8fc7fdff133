"""Adversarial AutoAugment (Zhang et al., ICLR 2020): a learned augmentation policy that raises the training loss.

A *policy* is ``S`` sub-policies (5) of ``L`` operations (2); an operation is a type from
:data:`rat.augment.policy.AAA_OPS` and a magnitude from ``PolicySpace.magnitudes`` (10 levels); the search space and
its ops are :mod:`rat.augment.policy`'s. An LSTM controller (:class:`rat.augment.controller.PolicyController`) samples
``M`` policies (8); the batch is augmented once per policy, each image under one of its policy's sub-policies drawn
at random, and the target network trains on all ``M·K`` images (``K`` = the batch, or a share of it, see
``batch_fraction``). A policy's training loss is its reward; :class:`AdversarialAugment` updates the controller by
REINFORCE with an entropy bonus, by default as the paper and the seed implementation do: policies sampled once per
epoch, rewards the epoch's mean losses normalized across the M policies (``schedule='epoch'``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rat.augment.augmentation import Augmentation
from rat.augment.controller import PolicyController
from rat.augment.erasing import BatchRandomErasing
from rat.augment.mix import GroupMixup
from rat.augment.policy import CUTOUT_FILLS, PolicyAugment, PolicySpace, images_per_policy

__all__ = ["AdversarialAugment", "policy_from_state", "space_from_state"]

_logger = logging.getLogger(__name__)

SCHEDULES = ("epoch", "step")
LSTM_STATES = ("sub_policy", "policy")
# What a checkpoint of a rat before these rules were options was trained with.
LEGACY_RULES = {"schedule": "step", "lstm_state": "policy", "magnitude_map": "autoaugment", "cutout_fill": "black"}


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values


class AdversarialAugment(Augmentation):
    """The adversarial policy inside the trainer: sample M policies, expand the batch, learn from the losses.

    :meth:`expand` augments each batch under the current M policies (sampled with the controller on the CPU, from
    :attr:`sample_generator`, which starts from the same seed on every rank, so every rank samples the same policies)
    and returns the ``M·K`` augmented images and their labels; :meth:`rewards` splits the step's loss by policy;
    :meth:`record` averages it over ranks (``reduce_mean``) and records it. As the trainer's :class:`Augmentation`,
    :meth:`apply` is :meth:`expand` then mixup within each policy's images, and :meth:`observe` takes each
    micro-batch's :meth:`rewards` and records their mean at the optimizer step's end. The ``schedule`` says when
    policies are sampled and the controller learns:

    * ``'epoch'`` (the paper's and the seed implementation's): the M policies are sampled at the first step of an
      epoch and kept for the whole epoch; each policy's reward is its training loss averaged over the epoch's steps,
      normalized across the M policies, ``A = (R − mean(R)) / (std(R) + 1e-5)`` (std with Bessel's correction, 0 for
      one policy); :meth:`end_epoch` then takes one REINFORCE step,
      ``loss = −mean(A·log π(policy)) − entropy_weight · mean(H)``.
    * ``'step'``: new policies every step; every ``update_every`` steps one REINFORCE step on those steps' samples with
      the raw one-step reward minus ``b``, a moving average (``baseline_decay``) of the mean reward.

    Identical rewards and tokens on every rank keep the controllers identical without broadcasting parameters.

    Args:
        space: the search space.
        num_policies: M, the policies sampled at a time.
        schedule: ``'epoch'`` or ``'step'`` (above).
        lstm_state: ``'sub_policy'`` (the seed's: the controller's LSTM state starts afresh for each sub-policy) or
            ``'policy'`` (one state through all of a policy's ops).
        magnitude_map: ``'seed'`` or ``'autoaugment'``, how a level becomes an op's argument (:func:`timm_magnitudes`).
        lr: the controller's Adam learning rate (0 = a frozen, uniformly random controller).
        entropy_weight: weight of the entropy bonus.
        baseline_decay: decay of the moving-average baseline (``'step'`` only).
        update_every: steps between controller updates (``'step'`` only; the samples of those steps form one batch).
        batch_fraction: share of the batch each policy augments: 1 = the whole batch under every policy (the paper,
            M·B images); below 1, ``K = max(1, round(fraction · B))`` images per policy, policy m taking images
            ``m·K .. m·K + K − 1`` modulo the batch (M·K images: the cost control; ``1/M`` costs what RandAugment
            does).
        seed: seed of the controller's initialisation and sampling (the same on every rank).
        augment_generator: the CPU generator of the per-image draws (sub-policy choice, signs, Cutout centres;
            per rank, saved with the trainer's RNG state): :attr:`generator`.
        random_erasing: applied after the policy (``None``: none).
        mixup: timm ``Mixup`` in ``'batch'`` mode (``None``: none), applied within each policy's images
            (:class:`rat.augment.mix.GroupMixup`), so that each policy's loss stays its own.
        label_smoothing: of the cross-entropy without mixup (:class:`Augmentation`).
        reduce_mean: mean of a tensor over ranks (identity on one process).
        hidden_size: controller LSTM width.
        cutout_fill: Cutout's colour, ``'seed'`` (the seed's ``(125, 123, 114)``) or ``'black'``.
        fill, interpolation: as for RandAugment's geometric ops.
    """

    def __init__(self, space: PolicySpace, *, num_policies: int = 8, schedule: str = "epoch",
                 lstm_state: str = "sub_policy", magnitude_map: str = "seed", lr: float = 0.00035,
                 entropy_weight: float = 1e-5, baseline_decay: float = 0.95, update_every: int = 1,
                 batch_fraction: float = 1.0, seed: int = 0, augment_generator: torch.Generator | None = None,
                 random_erasing: BatchRandomErasing | None = None, mixup: Any = None, label_smoothing: float = 0.0,
                 reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity, hidden_size: int = 100,
                 fill: Sequence[float] = (0.0, 0.0, 0.0), cutout_fill: str = "seed", interpolation: str = "bicubic"):
        if num_policies < 1:
            raise ValueError(f"num_policies={num_policies}: sample at least one policy per step")
        if update_every < 1 or not 0.0 < batch_fraction <= 1.0 or lr < 0 or entropy_weight < 0:
            raise ValueError("update_every must be >= 1, batch_fraction in (0, 1], lr and entropy_weight >= 0")
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay={baseline_decay} must be in [0, 1)")
        if schedule not in SCHEDULES or lstm_state not in LSTM_STATES:
            raise ValueError(f"schedule={schedule!r}, lstm_state={lstm_state!r}: choose the schedule from "
                             f"{', '.join(SCHEDULES)} and the LSTM state rule from {', '.join(LSTM_STATES)}")
        if cutout_fill not in CUTOUT_FILLS:
            raise ValueError(f"cutout_fill={cutout_fill!r}: choose from {', '.join(CUTOUT_FILLS)}")
        if schedule == "epoch" and update_every != 1:
            raise ValueError(f"update_every={update_every} applies to the step schedule: the epoch schedule "
                             "updates the controller once per epoch")
        generator = torch.Generator().manual_seed(seed)
        super().__init__(mixup=GroupMixup(mixup, num_policies) if mixup is not None else None,
                         generator=augment_generator if augment_generator is not None else
                         torch.Generator().manual_seed(seed), label_smoothing=label_smoothing)
        self.space = space
        self.rules = {"schedule": schedule, "lstm_state": lstm_state, "magnitude_map": magnitude_map,
                      "cutout_fill": cutout_fill}
        self.num_policies, self.batch_fraction, self.schedule = num_policies, batch_fraction, schedule
        self.entropy_weight, self.baseline_decay, self.update_every = entropy_weight, baseline_decay, update_every
        self.reduce_mean = reduce_mean
        self.sample_generator = generator
        reset_every = space.ops_per_sub_policy if lstm_state == "sub_policy" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.controller = PolicyController(len(space.ops), len(space.magnitudes),
                                               space.num_sub_policies * space.ops_per_sub_policy, hidden_size,
                                               reset_every=reset_every)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=lr)
        self.augment = PolicyAugment(space, magnitude_map=magnitude_map, fill=fill,
                                     cutout_fill=CUTOUT_FILLS[cutout_fill], interpolation=interpolation)
        self.random_erasing = random_erasing
        self.baseline: float | None = None
        self.updates = 0
        self.tokens: torch.Tensor | None = None  # (M, S, L, 2): this step's (this epoch's) policies
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # step schedule: (tokens, rewards) to learn from
        self.loss_sum = torch.zeros(num_policies, dtype=torch.float64)  # epoch schedule: the epoch's reward sums
        self.loss_steps = 0
        self._step_rewards: tuple[torch.Tensor, int] | None = None  # the step's reward sum over its micro-batches
        self._epoch: dict[str, list] = {}
        self._reset_epoch()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(M={self.num_policies}, schedule={self.schedule}, "
                f"ops={len(self.space.ops)}, magnitudes={self.space.magnitudes}, "
                f"lr={self.optimizer.param_groups[0]['lr']}, entropy_weight={self.entropy_weight}, "
                f"update_every={self.update_every}, batch_fraction={self.batch_fraction})")

    def _reset_epoch(self) -> None:
        self._epoch = {"rewards": [], "entropy": [], "op_probs": [], "magnitude_probs": []}

    # -- the step ----------------------------------------------------------------------------------------------

    def sample(self, num_policies: int | None = None) -> torch.Tensor:
        """Sample policies with the controller: ``(M, S, L, 2)`` int64 tokens (op index, magnitude index)."""
        space = self.space
        with torch.no_grad():
            flat = self.controller(num_policies or self.num_policies, generator=self.sample_generator)["tokens"]
        return flat.view(flat.shape[0], space.num_sub_policies, space.ops_per_sub_policy, 2)

    def rows(self, batch_size: int) -> torch.Tensor:
        """``(M, K)`` indices of the images each policy augments."""
        if self.batch_fraction == 1.0:
            return torch.arange(batch_size).repeat(self.num_policies, 1)
        k = images_per_policy(batch_size, self.batch_fraction)
        return (torch.arange(self.num_policies)[:, None] * k + torch.arange(k)[None]) % batch_size

    def expand(self, x: torch.Tensor, y: torch.Tensor, *, new_step: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment under the current M policies (sampling them first under the step schedule, and at the first
        step of an epoch under the epoch schedule): ``(M·K images, M·K labels)``, policy-major.

        ``new_step=False``: another micro-batch of the same optimizer step (gradient accumulation), augmented under
        the step's policies; the trainer calls :meth:`observe` once per optimizer step, with the rewards averaged
        over its micro-batches, so every count of steps here is in optimizer steps."""
        if new_step:
            self._step_rewards = None
        if (new_step and self.schedule == "step") or self.tokens is None:
            self.tokens = self.sample()
        rows = self.rows(x.shape[0])
        gen = self.generator
        sub = torch.randint(self.space.num_sub_policies, rows.shape, generator=gen)
        self.augment.tokens = self.tokens[torch.arange(self.num_policies)[:, None], sub].flatten(0, 1)
        index = rows.flatten().to(x.device)
        out = self.augment(x.index_select(0, index), gen)
        if self.random_erasing is not None:
            out = self.random_erasing(out, gen)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out, y.index_select(0, index)

    def rewards(self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], output: torch.Tensor,
                target: torch.Tensor, clean_output: torch.Tensor | None = None,
                clean_weight: float = 0.0) -> torch.Tensor:
        """Each policy's share of the step's training loss: the loss of its images (the same mix of adversarial and
        clean loss; ``target`` labels or soft targets)."""
        def per_policy(logits: torch.Tensor) -> torch.Tensor:
            chunks = zip(logits.detach().float().chunk(self.num_policies), target.chunk(self.num_policies))
            return torch.stack([criterion(o, t) for o, t in chunks])

        reward = per_policy(output)
        if clean_output is not None and clean_weight > 0:
            reward = (1.0 - clean_weight) * reward + clean_weight * per_policy(clean_output)
        return reward

    def observe(self, output: torch.Tensor, target: torch.Tensor, clean_output: torch.Tensor | None = None,
                clean_weight: float = 0.0, *, step_end: bool = True) -> None:
        """A micro-batch's :meth:`rewards` (under :attr:`criterion`); at the optimizer step's end, :meth:`record` their
        mean over the step's micro-batches."""
        reward = self.rewards(self.criterion, output, target, clean_output, clean_weight)
        if self._step_rewards is not None:
            total, count = self._step_rewards
            reward, micro = total + reward, count + 1
        else:
            micro = 1
        self._step_rewards = None if step_end else (reward, micro)
        if step_end:
            self.record(reward / micro)

    def record(self, rewards: torch.Tensor) -> None:
        """Record this step's per-policy losses (mean over ranks): added to the epoch's sums (epoch schedule), or
        a pending sample, learnt from every ``update_every`` steps (step schedule)."""
        if self.tokens is None:
            raise RuntimeError("record() without expand(): no policies were sampled this step")
        rewards = self.reduce_mean(rewards.detach()).to("cpu", torch.float64)
        if self.schedule == "epoch":
            self.loss_sum += rewards
            self.loss_steps += 1
            return
        self.pending.append((self.tokens, rewards))
        self.tokens = None
        if len(self.pending) >= self.update_every:
            self.update()

    def end_epoch(self) -> None:
        """The end of a training epoch: under the epoch schedule, learn from the epoch's mean losses (normalized
        across the policies) and let the next epoch sample new policies; nothing under the step schedule."""
        if self.schedule != "epoch" or self.loss_steps == 0:
            return
        rewards = self.loss_sum / self.loss_steps
        spread = float(rewards.std()) if rewards.numel() > 1 else 0.0
        self._learn(self.tokens.flatten(1, 2), rewards, (rewards - rewards.mean()) / (spread + 1e-5))
        self.tokens, self.loss_steps = None, 0
        self.loss_sum = torch.zeros_like(self.loss_sum)

    def update(self) -> None:
        """One REINFORCE step on the pending samples of the step schedule (reward minus the moving baseline)."""
        tokens = torch.cat([t for t, _ in self.pending]).flatten(1, 2)
        rewards = torch.cat([r for _, r in self.pending])
        self.pending = []
        mean = float(rewards.mean())
        self.baseline = mean if self.baseline is None else \
            self.baseline_decay * self.baseline + (1.0 - self.baseline_decay) * mean
        self._learn(tokens, rewards, rewards - self.baseline)

    def _learn(self, tokens: torch.Tensor, rewards: torch.Tensor, advantage: torch.Tensor) -> None:
        """The REINFORCE step: the controller is re-run on ``tokens`` (``(n, D, 2)``) with gradients."""
        result = self.controller(tokens=tokens)
        advantage = advantage.to(result["log_prob"].dtype)
        loss = -(advantage * result["log_prob"]).mean() - self.entropy_weight * result["entropy"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        stats = self._epoch
        stats["rewards"].append(rewards)
        stats["entropy"].append(float(result["entropy"].detach().mean()) / (2 * tokens.shape[1]))
        stats["op_probs"].append(result["op_probs"].detach())
        stats["magnitude_probs"].append(result["magnitude_probs"].detach())

    # -- what it learned ---------------------------------------------------------------------------------------

    def epoch_stats(self) -> dict[str, Any]:
        """Controller statistics since the last call (then reset), for metrics.jsonl.

        ``aaa_reward_mean/std`` over all policies of the epoch's updates (under the epoch schedule also
        ``aaa_rewards``, each policy's epoch-mean loss), ``aaa_entropy`` (mean entropy per choice, nats; uniform =
        ``(log n_ops + log n_magnitudes) / 2``), ``aaa_baseline`` (step schedule), ``aaa_updates`` (total), and
        ``aaa_op_probs`` / ``aaa_magnitude_probs``: the controller's choice probabilities averaged over the epoch.
        Logs the controller's three most frequent sub-policies.
        """
        _logger.info("controller's top sub-policies: %s", ", ".join(
            f"{self.space.describe(tokens)} {share:.1%}" for tokens, share in self.top_sub_policies(3)))
        stats = self._epoch
        if not stats["rewards"]:
            return {"aaa_updates": self.updates}
        rewards = torch.cat(stats["rewards"])
        op_probs = torch.stack(stats["op_probs"]).mean(0).tolist()
        magnitude_probs = torch.stack(stats["magnitude_probs"]).mean(0).tolist()
        result = {
            "aaa_reward_mean": float(rewards.mean()),
            "aaa_reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            **({"aaa_rewards": [round(float(r), 5) for r in rewards]} if self.schedule == "epoch" else {}),
            "aaa_entropy": sum(stats["entropy"]) / len(stats["entropy"]),
            "aaa_baseline": self.baseline, "aaa_updates": self.updates,
            "aaa_op_probs": {op: round(p, 5) for op, p in zip(self.space.ops, op_probs)},
            "aaa_magnitude_probs": {str(m): round(p, 5) for m, p in zip(self.space.magnitudes, magnitude_probs)},
        }
        self._reset_epoch()
        return result

    def top_sub_policies(self, k: int = 10, num_samples: int = 512, seed: int = 0) -> list[tuple[torch.Tensor, float]]:
        """The ``k`` most frequent sub-policies (``(L, 2)`` tokens; :meth:`PolicySpace.describe` names them) among
        ``num_samples`` sampled policies, with their share of all sampled sub-policies."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            flat = self.controller(num_samples, generator=generator)["tokens"]
        subs = flat.view(-1, self.space.ops_per_sub_policy, 2)
        unique, counts = torch.unique(subs, dim=0, return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)[:k]
        return [(unique[i], float(counts[i]) / subs.shape[0]) for i in order.tolist()]

    def uniform_entropy(self) -> float:
        """Entropy per choice of a uniform controller (the ceiling of ``aaa_entropy``)."""
        return (math.log(len(self.space.ops)) + math.log(len(self.space.magnitudes))) / 2

    # -- training state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Controller, its optimizer, baseline, sampling RNG, the current policies, the epoch's per-policy loss sums
        and pending samples (everything for an exact resume, also mid-epoch; the per-image augmentation generator is
        the trainer's and is saved with its RNG state), and the rules and search space they belong to."""
        return {"controller": self.controller.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline, "updates": self.updates, "generator": self.sample_generator.get_state(),
                "pending_tokens": [t for t, _ in self.pending], "pending_rewards": [r for _, r in self.pending],
                "tokens": self.tokens, "loss_sum": self.loss_sum.clone(), "loss_steps": self.loss_steps,
                "rules": dict(self.rules),
                "space": {"ops": list(self.space.ops), "magnitudes": list(self.space.magnitudes),
                          "num_sub_policies": self.space.num_sub_policies,
                          "ops_per_sub_policy": self.space.ops_per_sub_policy}}

    def replicated_modules(self) -> tuple[nn.Module, ...]:
        """The controller: every rank's learns from the same rewards and tokens, so it must stay the same."""
        return (self.controller,)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output (a checkpoint of a rat before the rules were recorded followed
        :data:`LEGACY_RULES`; ``None``, a checkpoint without a policy: the controller starts fresh, with a warning).

        Raises:
            ValueError: the checkpoint's search space, rules or number of policies differ from this one's.
        """
        if state is None:
            _logger.warning("checkpoint has no adversarial policy state: the controller starts fresh")
            return
        space = state["space"]
        if (tuple(space["ops"]), tuple(space["magnitudes"]), space["num_sub_policies"],
                space["ops_per_sub_policy"]) != (self.space.ops, self.space.magnitudes, self.space.num_sub_policies,
                                                 self.space.ops_per_sub_policy):
            raise ValueError(f"the checkpoint's policy search space ({space}) differs from the configured one: use "
                             "the same aaa.ops and aaa.magnitudes to resume")
        rules = state.get("rules", LEGACY_RULES)
        if rules != self.rules:
            raise ValueError("the checkpoint's policy was trained with " + " ".join(
                f"--aaa.{k} {v}" for k, v in rules.items()) + ": resume with those settings")
        loss_sum = state.get("loss_sum", torch.zeros_like(self.loss_sum))
        if loss_sum.shape != self.loss_sum.shape:
            raise ValueError(f"the checkpoint's policy sampled {loss_sum.numel()} policies at a time: resume with "
                             f"--aaa.num_policies {loss_sum.numel()}")
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline, self.updates = state["baseline"], state["updates"]
        self.sample_generator.set_state(state["generator"])
        self.pending = list(zip(state["pending_tokens"], state["pending_rewards"]))
        self.tokens, self.loss_sum = state.get("tokens"), loss_sum.clone()
        self.loss_steps = state.get("loss_steps", 0)


def space_from_state(state: dict[str, Any]) -> PolicySpace:
    """The :class:`PolicySpace` recorded in an :meth:`AdversarialAugment.state_dict`."""
    space = state["space"]
    return PolicySpace(tuple(space["ops"]), tuple(space["magnitudes"]), space["num_sub_policies"],
                       space["ops_per_sub_policy"])


def policy_from_state(state: dict[str, Any]) -> AdversarialAugment:
    """The :class:`AdversarialAugment` that wrote ``state`` (its search space, rules, M and controller width),
    restored."""
    policy = AdversarialAugment(space_from_state(state), num_policies=state.get("loss_sum", torch.zeros(8)).numel(),
                                hidden_size=state["controller"]["cell.weight_hh"].shape[1],
                                **state.get("rules", LEGACY_RULES))
    policy.load_state_dict(state)
    return policy
