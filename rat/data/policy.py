"""Adversarial AutoAugment (Zhang et al., ICLR 2020): a learned augmentation policy that raises the training loss.

A *policy* is ``S`` sub-policies (5) of ``L`` operations (2); an operation is a type from :data:`AAA_OPS` and a
magnitude from ``PolicySpace.magnitudes`` (10 levels). An LSTM controller (:class:`PolicyController`) samples ``M``
policies (8); the batch is augmented once per policy, each image under one of its policy's sub-policies drawn at
random, and the target network trains on all ``M·K`` images (``K`` = the batch, or a share of it, see
``batch_fraction``). A policy's training loss is its reward; :class:`AdversarialAugment` updates the controller by
REINFORCE with an entropy bonus, by default as the paper and the seed implementation do: policies sampled once per
epoch, rewards the epoch's mean losses normalized across the M policies (``schedule='epoch'``).

The operations are AutoAugment's search space without SamplePairing (the paper has 16 ops; the unofficial
implementation this follows leaves SamplePairing out: 15). They are rat's batched per-image ops of
:mod:`rat.data.augment`, with AutoAugment's ranges as timm's ``'original'`` AutoAugment policy defines them; with
level = magnitude / 10, and ``magnitude_map='autoaugment'`` (AutoAugment's and timm's reading of a level):

================ ==================================================================================================
ShearX / ShearY  timm ``ShearX`` / ``ShearY``: ``0.3 · level``, random sign
TranslateX / Y   timm ``TranslateXRel`` / ``TranslateYRel``: ``0.45 · level`` of the width / height, random sign
                 (= timm's ``TranslateX`` with ``translate_const = 0.45 · image size``, as ``create_transform`` sets)
Rotate           ``30 · level`` degrees, random sign
AutoContrast, Invert, Equalize   no argument
Solarize         invert 8-bit values ``>= int(256 · level)``
Posterize        timm ``PosterizeOriginal``: keep ``4 + int(4 · level)`` bits
Contrast, Color, Brightness, Sharpness   enhance factor ``0.1 + 1.8 · level``
Cutout           a square of side ``0.2 · level`` of the shorter image side (DeVries & Taylor; AutoAugment's op) at a
                 uniformly random centre, clipped to the image, painted with ``cutout_fill``
================ ==================================================================================================

The default ``magnitude_map='seed'`` is the seed implementation's reading, ``low + level · (high − low)`` over each
op's range: the same for every op but the five signed ones (:data:`SIGNED_OPS`), whose range ``[−max, max]`` makes
the size ``max · |2 · level − 1|`` (level 0.5 is the identity), see :func:`timm_magnitudes`. The default magnitudes
are 0..9: the 10 levels of AutoAugment's policies as timm reads them (``m / 10``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rat.data.augment import BatchRandomErasing, BatchTransform, apply_ops_, check_fill_and_interpolation

__all__ = ["AAA_OPS", "AdversarialAugment", "PolicyController", "PolicySpace", "policy_from_state"]

_logger = logging.getLogger(__name__)

AAA_OPS = (
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast", "Invert", "Equalize", "Solarize",
    "Posterize", "Contrast", "Color", "Brightness", "Sharpness", "Cutout",
)
# The rat/timm op that implements a search-space op, where the names differ.
_IMPLEMENTED_BY = {"TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel", "Posterize": "PosterizeOriginal"}
MAX_MAGNITUDE = 10
# The ops whose range is symmetric, [-max, max], negated at random (the seed maps their level onto that whole range).
SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAGNITUDE_MAPS = ("seed", "autoaugment")
# Cutout's colour: the seed's (125, 123, 114) in 8 bits, or black.
CUTOUT_FILLS = {"seed": (125 / 255, 123 / 255, 114 / 255), "black": (0.0, 0.0, 0.0)}
SCHEDULES = ("epoch", "step")
LSTM_STATES = ("sub_policy", "policy")
# What a checkpoint of a rat before these rules were options was trained with.
LEGACY_RULES = {"schedule": "step", "lstm_state": "policy", "magnitude_map": "autoaugment", "cutout_fill": "black"}


@dataclass(frozen=True)
class PolicySpace:
    """The search space: ``num_sub_policies`` sub-policies of ``ops_per_sub_policy`` (op, magnitude) pairs.

    Raises:
        ValueError: an unknown or repeated op, a magnitude outside ``[0, 10]`` or repeated, or a size below 1.
    """

    ops: tuple[str, ...] = AAA_OPS
    magnitudes: tuple[int, ...] = tuple(range(10))
    num_sub_policies: int = 5
    ops_per_sub_policy: int = 2

    def __post_init__(self) -> None:
        unknown = [op for op in self.ops if op not in AAA_OPS]
        if unknown:
            raise ValueError(f"unknown op {unknown[0]!r} in the policy's ops: choose from {', '.join(AAA_OPS)}")
        if not self.ops or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"the policy's ops must be distinct and not empty, got {','.join(self.ops)}")
        bad = [m for m in self.magnitudes if not 0 <= m <= MAX_MAGNITUDE]
        if bad:
            raise ValueError(f"magnitude level {bad[0]} is out of range: levels are integers in [0, {MAX_MAGNITUDE}]")
        if not self.magnitudes or len(set(self.magnitudes)) != len(self.magnitudes):
            raise ValueError(f"the policy's magnitudes must be distinct and not empty, got {self.magnitudes}")
        if self.num_sub_policies < 1 or self.ops_per_sub_policy < 1:
            raise ValueError("a policy needs at least one sub-policy of at least one op")

    @property
    def implementations(self) -> tuple[str, ...]:
        """The :mod:`rat.data.augment` op name behind each of :attr:`ops`."""
        return tuple(_IMPLEMENTED_BY.get(op, op) for op in self.ops)

    def describe(self, sub_policy: torch.Tensor) -> str:
        """``'(Rotate, 7) (Invert, 3)'`` for a sub-policy's tokens ``(L, 2)`` (op index, magnitude index)."""
        return " ".join(f"({self.ops[int(o)]}, {self.magnitudes[int(m)]})" for o, m in sub_policy.tolist())


class PolicyController(nn.Module):
    """The policy network: a one-layer LSTM that emits, token by token, each operation's type then its magnitude.

    Each decision feeds the embedding of the previous token to the LSTM cell; two linear heads (zero-initialised,
    so a new controller is exactly uniform) give the logits over op types and magnitudes. Every ``reset_every``
    decisions the LSTM state returns to zero and the start token is fed again: ``reset_every`` = ops per sub-policy
    samples each sub-policy from a fresh state (the seed implementation's rule, which its README gives as the fix
    for a drift towards extreme augmentations), ``None`` carries one state through the whole policy.

    Args:
        num_ops: number of op types.
        num_magnitudes: number of magnitude levels.
        num_decisions: operations per policy (sub-policies × ops per sub-policy).
        hidden_size: LSTM width (the paper: 100).
        reset_every: decisions between resets of the LSTM state (``None``: only at the start of a policy).
    """

    def __init__(self, num_ops: int, num_magnitudes: int, num_decisions: int, hidden_size: int = 100,
                 reset_every: int | None = None):
        super().__init__()
        self.num_ops, self.num_magnitudes, self.num_decisions = num_ops, num_magnitudes, num_decisions
        self.reset_every = reset_every or num_decisions
        self.embed = nn.Embedding(1 + num_ops + num_magnitudes, hidden_size)  # token 0 starts the sequence
        self.cell = nn.LSTMCell(hidden_size, hidden_size)
        self.op_head = nn.Linear(hidden_size, num_ops)
        self.magnitude_head = nn.Linear(hidden_size, num_magnitudes)
        for head in (self.op_head, self.magnitude_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, num_policies: int = 1, tokens: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Sample ``num_policies`` policies (``tokens=None``, drawing from ``generator``) or score given ``tokens``.

        Returns:
            ``tokens`` (M, D, 2) int64 (op index, magnitude index per decision), ``log_prob`` (M,) and ``entropy``
            (M,) summed over the 2·D choices, and ``op_probs`` (num_ops,) / ``magnitude_probs`` (num_magnitudes,):
            the controller's choice probabilities averaged over decisions and policies.
        """
        m = num_policies if tokens is None else tokens.shape[0]
        device = self.embed.weight.device
        hidden = torch.zeros(m, self.cell.hidden_size, device=device)
        start = torch.zeros(m, dtype=torch.int64, device=device)
        chosen, log_prob, entropy, probs = [], 0.0, 0.0, ([], [])
        offsets = (1, 1 + self.num_ops)
        for d in range(self.num_decisions):
            if d % self.reset_every == 0:
                state, previous = (hidden, hidden), start
            pair = []
            for kind, head in enumerate((self.op_head, self.magnitude_head)):
                state = self.cell(self.embed(previous), state)
                logits = head(state[0])
                logp = torch.log_softmax(logits, dim=1)
                p = logp.exp()
                if tokens is None:
                    choice = torch.multinomial(p.detach().cpu(), 1, generator=generator).flatten().to(device)
                else:
                    choice = tokens[:, d, kind].to(device)
                log_prob = log_prob + logp.gather(1, choice[:, None]).squeeze(1)
                entropy = entropy - (p * logp).sum(dim=1)
                probs[kind].append(p)
                pair.append(choice)
                previous = choice + offsets[kind]
            chosen.append(torch.stack(pair, dim=1))
        return {"tokens": torch.stack(chosen, dim=1), "log_prob": log_prob, "entropy": entropy,
                "op_probs": torch.stack(probs[0]).mean(dim=(0, 1)),
                "magnitude_probs": torch.stack(probs[1]).mean(dim=(0, 1))}


def timm_magnitudes(space: PolicySpace, magnitude_map: str = "seed") -> torch.Tensor:
    """``(ops, magnitudes)`` float64: the magnitude on timm's scale (level = value / 10) that gives each search-space
    op at each of the space's magnitude levels its argument.

    ``'autoaugment'``: the level itself (AutoAugment's and timm's definition: a signed op's size is
    ``max · m / 10``, then a random sign). ``'seed'``: the seed implementation's definition, ``low + (m / 10) ·
    (high − low)`` over the op's range; for the signed ops (:data:`SIGNED_OPS`, range ``[−max, max]``) that is
    ``max · (2m / 10 − 1)`` before the random sign, i.e. timm's size at ``|2m − 10|`` (level 5 is the identity);
    for the other ops, whose ranges start where timm's do, it is the level itself.
    """
    if magnitude_map not in MAGNITUDE_MAPS:
        raise ValueError(f"magnitude_map={magnitude_map!r}: choose from {', '.join(MAGNITUDE_MAPS)}")
    levels = torch.tensor(space.magnitudes, dtype=torch.float64)
    rows = [(2 * levels - MAX_MAGNITUDE).abs() if magnitude_map == "seed" and op in SIGNED_OPS else levels
            for op in space.ops]
    return torch.stack(rows)


class PolicyAugment(BatchTransform):
    """Augment a batch under given sub-policies: image ``i`` gets the ops ``ops[i]`` (``(n, L, 2)`` tokens).

    ``apply_`` reads the per-image tokens from :attr:`tokens` (set before each call); the random parts (geometric
    signs, interpolation when ``'random'``, Cutout centres) come from the generator, through
    :func:`rat.data.augment.apply_ops_`, the same batched base RandAugment uses. ``magnitude_map`` says how a level
    becomes an op's argument (:func:`timm_magnitudes`); geometric ops fill uncovered pixels with ``fill``, Cutout
    paints ``cutout_fill``.
    """

    def __init__(self, space: PolicySpace, *, magnitude_map: str = "seed", fill: Sequence[float] = (0.0, 0.0, 0.0),
                 cutout_fill: Sequence[float] = CUTOUT_FILLS["seed"], interpolation: str = "bicubic"):
        self.fill = check_fill_and_interpolation(fill, interpolation)
        self.cutout_fill = check_fill_and_interpolation(cutout_fill, interpolation)
        self.space = space
        self.interpolation = interpolation
        self.levels = timm_magnitudes(space, magnitude_map)
        self.tokens: torch.Tensor | None = None

    def apply_(self, out: torch.Tensor, gen: torch.Generator) -> None:
        if self.tokens is None or self.tokens.shape[0] != out.shape[0]:
            raise ValueError("PolicyAugment: set .tokens to one (L, 2) sub-policy per image before augmenting")
        for layer in range(self.tokens.shape[1]):
            ops = self.tokens[:, layer, 0]
            apply_ops_(out, self.space.implementations, ops, self.levels[ops, self.tokens[:, layer, 1]], gen,
                       fill=self.fill, cutout_fill=self.cutout_fill, interpolation=self.interpolation)


def images_per_policy(batch_size: int, batch_fraction: float) -> int:
    """K, the images each policy augments of a batch of ``batch_size``: the batch, or ``max(1, round(fraction·B))``."""
    return batch_size if batch_fraction == 1.0 else max(1, round(batch_fraction * batch_size))


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values


class AdversarialAugment:
    """The adversarial policy inside the trainer: sample M policies, expand the batch, learn from the losses.

    :meth:`expand` augments each batch under the current M policies (sampled with the controller on the CPU, from
    :attr:`generator`, which starts from the same seed on every rank, so every rank samples the same policies) and
    returns the ``M·K`` augmented images and their labels; :meth:`rewards` splits the step's loss by policy;
    :meth:`observe` averages it over ranks (``reduce_mean``) and records it. The ``schedule`` says when policies are
    sampled and the controller learns:

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
            per rank, saved with the trainer's RNG state).
        random_erasing: applied after the policy (``None``: none).
        reduce_mean: mean of a tensor over ranks (identity on one process).
        hidden_size: controller LSTM width.
        cutout_fill: Cutout's colour, ``'seed'`` (the seed's ``(125, 123, 114)``) or ``'black'``.
        fill, interpolation: as for RandAugment's geometric ops.
    """

    def __init__(self, space: PolicySpace, *, num_policies: int = 8, schedule: str = "epoch",
                 lstm_state: str = "sub_policy", magnitude_map: str = "seed", lr: float = 0.00035,
                 entropy_weight: float = 1e-5, baseline_decay: float = 0.95, update_every: int = 1,
                 batch_fraction: float = 1.0, seed: int = 0, augment_generator: torch.Generator | None = None,
                 random_erasing: BatchRandomErasing | None = None,
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
        self.space = space
        self.rules = {"schedule": schedule, "lstm_state": lstm_state, "magnitude_map": magnitude_map,
                      "cutout_fill": cutout_fill}
        self.num_policies, self.batch_fraction, self.schedule = num_policies, batch_fraction, schedule
        self.entropy_weight, self.baseline_decay, self.update_every = entropy_weight, baseline_decay, update_every
        self.reduce_mean = reduce_mean
        self.generator = torch.Generator().manual_seed(seed)
        self.augment_generator = augment_generator if augment_generator is not None else \
            torch.Generator().manual_seed(seed)
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
            flat = self.controller(num_policies or self.num_policies, generator=self.generator)["tokens"]
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
        if (new_step and self.schedule == "step") or self.tokens is None:
            self.tokens = self.sample()
        rows = self.rows(x.shape[0])
        gen = self.augment_generator
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

    def observe(self, rewards: torch.Tensor) -> None:
        """Record this step's per-policy losses (mean over ranks): added to the epoch's sums (epoch schedule), or
        a pending sample, learnt from every ``update_every`` steps (step schedule)."""
        if self.tokens is None:
            raise RuntimeError("observe() without expand(): no policies were sampled this step")
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
        """
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
                "baseline": self.baseline, "updates": self.updates, "generator": self.generator.get_state(),
                "pending_tokens": [t for t, _ in self.pending], "pending_rewards": [r for _, r in self.pending],
                "tokens": self.tokens, "loss_sum": self.loss_sum.clone(), "loss_steps": self.loss_steps,
                "rules": dict(self.rules),
                "space": {"ops": list(self.space.ops), "magnitudes": list(self.space.magnitudes),
                          "num_sub_policies": self.space.num_sub_policies,
                          "ops_per_sub_policy": self.space.ops_per_sub_policy}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a checkpoint of a rat before the rules were recorded followed
        :data:`LEGACY_RULES`).

        Raises:
            ValueError: the checkpoint's search space, rules or number of policies differ from this one's.
        """
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
        self.generator.set_state(state["generator"])
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
