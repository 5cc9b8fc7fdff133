"""rat augmentation: batched, per-sample, torch-only augmentation of decoded ``[0, 1]`` batches on their device, and
Adversarial AutoAugment. See docs/data.md.

The trainer holds one :class:`Augmentation` and calls only its ``apply`` / ``observe`` / ``end_epoch`` /
``epoch_stats`` / ``state_dict`` / ``load_state_dict``: the fixed recipe (:class:`Augmentation` over
:func:`build_augment`'s RandAugment + random erasing and :func:`build_mixup`'s Mixup/CutMix) and the learned policy
(:class:`AdversarialAugment`) alike.

The modules, one job each, from the bottom up:

* ``ops``: the batched op kernel, :func:`rat.augment.ops.apply_ops_` (per-image ops, magnitudes to arguments,
  geometric resampling, Cutout), the one base of RandAugment and the policy;
* ``transform``: :class:`BatchTransform`, the base of the batch augmentations, and how they draw from a generator;
* ``randaugment``: timm RandAugment on a batch, and :class:`BatchAugment` (RandAugment then random erasing, the
  paper's per-sample recipe); ``erasing``: timm RandomErasing on a batch; ``mix``: Mixup/CutMix (timm's), also within
  groups of a batch;
* ``augmentation``: :class:`Augmentation`, the trainer's interface, for a fixed augmentation;
* ``policy``: the Adversarial AutoAugment search space (:data:`AAA_OPS`, the one list of its ops, and
  :class:`PolicySpace`) and the batch under given sub-policies; ``controller``: the LSTM that samples policies;
  ``adversarial``: :class:`AdversarialAugment`, the policy in training (sampling, REINFORCE, its state), an
  :class:`Augmentation` too.

Nothing here reads a config or imports FFCV; timm is imported only where Mixup is built.
"""
from __future__ import annotations

from rat.augment.adversarial import AdversarialAugment, policy_from_state
from rat.augment.augmentation import Augmentation
from rat.augment.controller import PolicyController
from rat.augment.erasing import BatchRandomErasing
from rat.augment.mix import GroupMixup, build_mixup
from rat.augment.policy import AAA_OPS, PolicySpace, images_per_policy
from rat.augment.randaugment import BatchAugment, BatchRandAugment, build_augment, parse_rand_augment
from rat.augment.transform import BatchTransform

__all__ = ["AAA_OPS", "AdversarialAugment", "Augmentation", "BatchAugment", "BatchRandAugment", "BatchRandomErasing",
           "BatchTransform", "GroupMixup", "PolicyController", "PolicySpace", "build_augment", "build_mixup",
           "images_per_policy", "parse_rand_augment", "policy_from_state"]
