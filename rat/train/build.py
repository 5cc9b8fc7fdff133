"""From the run spec to the objects of a run: datasets, model, attacks, augmentation, loaders.

Each builder takes the Sections it needs (frozen dataclasses of :class:`rat.train.spec.TrainSpec`) and plain arguments;
none reads the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import convert_sync_batchnorm
from torch import nn

from rat.attacks import Attack, create_attack
from rat.augment import AdversarialAugment, Augmentation, BatchRandomErasing, build_augment, build_mixup
from rat.config import ConfigError
from rat.data import build_train_loader, build_val_loader, read_beton_info
from rat.data.demo import demo_root as default_demo_root
from rat.data.demo import ensure_demo_betons
from rat.models import create_model, dynamic_size_kwargs
from rat.train.distributed import DistInfo, all_reduce_sum, barrier
from rat.train.spec import AAASpec, AdvSpec, AugmentSpec, DataSpec, ModelSpec, TrainSpec, ValidationSpec


def dataset_paths(data: DataSpec, info: DistInfo) -> tuple[Path, Path]:
    """The train/val beton paths (checked by the trainer's preflight); the embedded demo dataset (written by rank 0
    on first use) when none is given."""
    if not data.train_dataset:
        root = default_demo_root(data.demo_root)
        if info.is_primary:
            ensure_demo_betons(root)
        barrier()
        return root / "train.beton", root / "val.beton"
    return Path(data.train_dataset), Path(data.val_dataset)


def model_kwargs(model: ModelSpec, num_classes: int, img_size: int) -> dict[str, Any]:
    """The ``create_model`` kwargs a checkpoint records (``img_size``: the final training resolution, which sizes a
    ViT's position embedding; convolutional models ignore it). Models with a fixed input size (ViTs) are built with
    ``dynamic_img_size``, so that progressive resizing and validation at another resolution resample the position
    embedding on the fly, exactly as ``set_input_size`` does for rat.eval."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "normalize": bool(model.normalize), "img_size": img_size,
                              **dynamic_size_kwargs(model.arch)}
    if model.drop_path > 0:
        kwargs["drop_path_rate"] = model.drop_path
    return kwargs


def build_model(model: ModelSpec, kwargs: dict[str, Any], device: torch.device, *,
                distributed: bool = False) -> tuple[nn.Module, nn.Module]:
    """(module to train, compiled or not): created, initialised, (on more than one process with ``model.sync_bn``,
    its BatchNorm layers made SyncBatchNorm by timm's ``convert_sync_batchnorm``, as timm's ``--sync-bn``), moved,
    channels_last. Wrapping comes later."""
    module = create_model(model.arch, checkpoint=model.init_checkpoint or None, **kwargs)
    if model.sync_bn and distributed:
        module = convert_sync_batchnorm(module)
    module = module.to(device)
    if model.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module, (torch.compile(module) if model.compile else module)


def build_attack(adv: AdvSpec, module: nn.Module, seed: int, grad_accum: int = 1) -> Attack:
    """The training attack on the unwrapped module: one norm, or E-AT's alternation over several
    (``adv.threat_models``: FGSM takes a single step), one norm per optimizer step of ``grad_accum`` micro-batches."""
    options: dict[str, Any] = {}
    if adv.step_size > 0 and adv.attack != "none":
        options["step_size"] = adv.step_size
    if adv.attack == "pgd":
        options["random_start"] = bool(adv.random_start)
    norms, eps_values, iters = zip(*adv.threat_models)
    return create_attack(adv.attack, module, norm=list(norms), eps=list(eps_values), n_iter=list(iters), seed=seed,
                         calls_per_norm=grad_accum, **options)


def build_eval_attack(adv: AdvSpec, validation: ValidationSpec, module: nn.Module, seed: int) -> Attack | None:
    """APGD with ``validation.robust_n_iter`` steps in the first training threat model, for the per-epoch check
    (None when ``validation.robust_n_ex`` is 0)."""
    if validation.robust_n_ex == 0:
        return None
    norm, eps, _ = adv.threat_models[0]
    return create_attack("apgd", module, norm=norm, eps=eps, n_iter=validation.robust_n_iter, seed=seed)


def build_augmentation(augment: AugmentSpec, aaa: AAASpec, *, num_classes: int, label_smoothing: float, seed: int,
                       run_seed: int, world_size: int) -> Augmentation:
    """The augmentation of ``augment.*`` (and ``aaa.*`` for the adversarial policy, with mixup/cutmix within each
    policy's images). ``seed`` (the rank's) seeds the augmentation generator; ``run_seed`` (the run's, the same on
    every rank) the policy's controller, whose rewards are averaged over the ``world_size`` ranks so that every rank's
    controller stays the same."""
    mixup = build_mixup(augment.mixup, augment.cutmix, augment.mixup_switch_prob, label_smoothing,
                        num_classes=num_classes, prob=augment.mixup_prob) if augment.heavy else None
    if augment.policy == "adversarial":
        erasing = BatchRandomErasing(augment.reprob) if augment.heavy and augment.reprob > 0 else None
        return AdversarialAugment(aaa.policy_space(), num_policies=aaa.num_policies, schedule=aaa.schedule,
                                  lstm_state=aaa.lstm_state, magnitude_map=aaa.magnitude_map,
                                  cutout_fill=aaa.cutout_fill, lr=aaa.lr, entropy_weight=aaa.entropy_weight,
                                  baseline_decay=aaa.baseline_decay, update_every=aaa.update_every,
                                  batch_fraction=aaa.batch_fraction, seed=run_seed,
                                  augment_generator=torch.Generator().manual_seed(seed), random_erasing=erasing,
                                  mixup=mixup, label_smoothing=label_smoothing,
                                  reduce_mean=lambda t: all_reduce_sum(t) / world_size, hidden_size=aaa.hidden_size)
    if not augment.heavy:
        return Augmentation(label_smoothing=label_smoothing)
    return Augmentation(build_augment(augment.randaugment, re_prob=augment.reprob), mixup,
                        generator=torch.Generator().manual_seed(seed), label_smoothing=label_smoothing)


@dataclass(frozen=True)
class Loaders:
    """The run's FFCV loaders: train (its resolution set per epoch), clean val over this rank's shard of the val set,
    robust val over its shard of the first ``validation.robust_n_ex`` images (None when that is 0; a rank whose shard is
    empty still takes part in the metrics' all-reduce with an empty loader)."""

    train: Any
    val: Any
    robust: Any | None
    steps_per_epoch: int  # optimizer steps: training.limit_batches, or len(train) // grad_accum when 0 or more


def build_loaders(spec: TrainSpec, train_path: Path, val_path: Path, info: DistInfo) -> Loaders:
    """The loaders of ``data.*``, ``training.batch_size``/``seed``/``limit_batches`` and ``validation.*`` (at
    ``validation.resolution``, or the final training resolution when 0)."""
    data, training, validation = spec.data, spec.training, spec.validation
    per_rank = -(-read_beton_info(train_path)["num_samples"] // info.world_size)  # DistributedSampler's share
    if per_rank < training.batch_size:  # every batch is full (drop_last): not even one would be
        raise ConfigError(f"training.batch_size={training.batch_size} exceeds the {per_rank} images each of the "
                          f"{info.world_size} process(es) reads from {train_path}: lower training.batch_size")
    train = build_train_loader(train_path, batch_size=training.batch_size, resolution=spec.resolution.min_res,
                               device=info.device, num_workers=data.num_workers, seed=training.seed,
                               distributed=info.distributed, in_memory=bool(data.in_memory),
                               scale=(data.crop_scale_min, 1.0), flip=bool(data.flip))
    steps = len(train) // training.grad_accum  # a last group of fewer micro-batches is dropped (drop_last)
    if steps == 0:
        raise ConfigError(f"training.grad_accum={training.grad_accum} exceeds the {len(train)} batches of "
                          f"{training.batch_size} each of the {info.world_size} process(es) reads per epoch from "
                          f"{train_path}: lower training.grad_accum or training.batch_size")
    steps_per_epoch = min(training.limit_batches, steps) if training.limit_batches else steps
    resolution = validation.resolution or spec.resolution.resolution_at(training.epochs - 1)
    num_val = read_beton_info(val_path)["num_samples"]
    common = {"batch_size": validation.batch_size, "resolution": resolution, "device": info.device,
              "num_workers": data.num_workers, "distributed": info.distributed}
    val = build_val_loader(val_path, **common)
    robust = build_val_loader(val_path, indices=range(min(validation.robust_n_ex, num_val)), **common) \
        if validation.robust_n_ex else None
    return Loaders(train, val, robust, steps_per_epoch)
