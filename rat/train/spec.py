"""The trainer's configuration: one frozen dataclass per fastargs Section, whose fields declare its Params.

Each field names a Param and carries its rule, description and default (:func:`rat.config.param`);
:func:`declare_train_sections` builds the fastargs Sections from them, :func:`make_train_config` parses files and flags
(strictly, :func:`rat.config.make_config`) and checks the cross-parameter rules, and :meth:`TrainSpec.from_config` turns
the validated Config into these typed, frozen objects. Values derived from settings live on the Sections:
:attr:`AdvSpec.threat_models`, :meth:`LRSpec.lr_at`, :meth:`ResolutionSpec.resolution_at`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastargs import Config
from fastargs.validation import OneOf

from rat.attacks import DEFAULT_EPS, NORMS, check_eps
from rat.augment.policy import AAA_OPS, PolicySpace, images_per_policy
from rat.config import (
    CommaList,
    ConfigError,
    FiniteFloat,
    Flag,
    PositiveFloat,
    Progress,
    config_to_dict,
    declare_spec,
    float_in,
    int_in,
    make_config,
    param,
    section,
    spec_from_config,
)
from rat.logging import PROGRESS_HELP
from rat.precision import PRECISIONS

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    train_dataset: str = param(str, "train .beton; empty = the embedded demo dataset (built on first use)", default="")
    val_dataset: str = param(str, "val .beton; empty = the embedded demo dataset's val split", default="")
    demo_root: str = param(str, "where the demo betons are built and cached; empty = ~/.cache/rat/demo", default="")
    num_workers: int = param(int_in(1), "FFCV decoding threads per process", default=2)
    in_memory: int = param(Flag(), "1: load the whole beton in RAM; 0: read through the OS page cache", default=1)
    num_classes: int = param(int_in(0), "number of classes; 0 = read from the beton's classes file", default=0)
    crop_scale_min: float = param(float_in(0.01, 1), "smallest area fraction of the training RandomResizedCrop",
                                   default=0.08)
    flip: int = param(Flag(), "1: random horizontal flip in training (0 for data whose mirror image means something "
                       "else)", default=1)


@dataclass(frozen=True)
class AugmentSpec:
    heavy: int = param(Flag(), "1: RandAugment + random erasing + mixup/cutmix (the paper's recipe)", default=0)
    randaugment: str = param(str, "timm RandAugment config string", default="rand-m9-mstd0.5-inc1")
    reprob: float = param(float_in(0, 1), "random-erasing probability (pixel mode)", default=0.25)
    mixup: float = param(float_in(0), "mixup alpha (0 = off)", default=0.8)
    cutmix: float = param(float_in(0), "cutmix alpha (0 = off)", default=1.0)
    mixup_prob: float = param(float_in(0, 1), "probability of applying mixup or cutmix to a batch", default=1.0)
    mixup_switch_prob: float = param(float_in(0, 1), "probability of cutmix instead of mixup when both are on",
                                      default=0.5)
    policy: str = param(OneOf(["randaugment", "adversarial"]), "augmentation policy: randaugment (fixed, with "
                         "augment.heavy 1) or adversarial (Adversarial AutoAugment, options in aaa.*; with "
                         "augment.heavy 1 random erasing follows it and mixup/cutmix mix within each policy's "
                         "images)", default="randaugment")


@dataclass(frozen=True)
class AAASpec:
    num_policies: int = param(int_in(1), "M: policies sampled per step; the batch is augmented M times (M x the cost)",
                               default=8)
    batch_fraction: float = param(FiniteFloat(0, 1, lo_open=True), "share of the batch each policy augments (1 = "
                                   "the whole batch, M*B images as in the paper; 1/M = RandAugment's cost)",
                                   default=1.0)
    ops: str = param(str, "comma-separated op types of the search space (default: all 15)", default=",".join(AAA_OPS))
    magnitudes: str = param(CommaList(int_in(0, 10), "ints in [0, 10]"), "magnitude levels the controller chooses from "
                             "(timm's scale, level = m/10)", default="0,1,2,3,4,5,6,7,8,9")
    sub_policies: int = param(int_in(1), "sub-policies per policy", default=5)
    ops_per_sub_policy: int = param(int_in(1), "operations per sub-policy", default=2)
    lr: float = param(float_in(0), "controller Adam learning rate (0 = frozen, uniformly random policies)",
                       default=0.00035)
    entropy_weight: float = param(float_in(0), "weight of the controller's entropy bonus (keeps it from collapsing)",
                                   default=1e-5)
    schedule: str = param(OneOf(["epoch", "step"]), "epoch: sample the M policies and update the controller once "
                           "per epoch, rewards the epoch's mean losses normalized across the policies (the paper, the "
                           "seed); step: new policies every step, reward minus a moving baseline", default="epoch")
    lstm_state: str = param(OneOf(["sub_policy", "policy"]), "sub_policy: the controller's LSTM state starts afresh "
                             "for each sub-policy (the seed); policy: one state through a policy's ops",
                             default="sub_policy")
    magnitude_map: str = param(OneOf(["seed", "autoaugment"]), "seed: a level spans the op's range low + level*(high "
                                "- low), so signed ops go -max..max (level 5 = identity); autoaugment: their size is "
                                "level*max (AutoAugment, timm)", default="seed")
    cutout_fill: str = param(OneOf(["seed", "black"]), "Cutout's colour: seed (125,123,114) or black", default="seed")
    baseline_decay: float = param(float_in(0, 0.9999), "decay of the moving-average reward baseline (schedule step)",
                                   default=0.95)
    update_every: int = param(int_in(1), "schedule step: update the controller every this many steps (their samples "
                               "form one batch)", default=1)
    hidden_size: int = param(int_in(1), "controller LSTM width", default=100)

    def policy_space(self) -> PolicySpace:
        """The Adversarial AutoAugment search space (``rat.augment.policy.PolicySpace``) of ``aaa.ops``/``magnitudes``/
        ``sub_policies``/``ops_per_sub_policy``.

        Raises:
            ValueError: an unknown op or an impossible space.
        """
        return PolicySpace(tuple(v.strip() for v in self.ops.split(",") if v.strip()),
                           tuple(int(v) for v in self.magnitudes.split(",")), self.sub_policies,
                           self.ops_per_sub_policy)


@dataclass(frozen=True)
class ModelSpec:
    arch: str = param(str, "any timm model name, e.g. convnext_tiny_cvst, vit_small_patch16_cvst, resnet50",
                       default="convnext_micro_cvst")
    normalize: int = param(Flag(), "1: ImageNet mean/std normalization inside the model (inputs in [0,1])", default=1)
    drop_path: float = param(float_in(0, 1), "stochastic depth rate", default=0.0)
    init_checkpoint: str = param(str, "initialise the weights from this checkpoint (e.g. a clean model); empty = "
                                  "random", default="")
    channels_last: int = param(Flag(), "1: channels_last memory format", default=1)
    compile: int = param(Flag(), "1: torch.compile the model", default=0)
    sync_bn: int = param(Flag(), "1: SyncBatchNorm across processes (CUDA; timm's --sync-bn); 0: each process "
                          "normalizes its own batch and the BatchNorm statistics are averaged over the processes at "
                          "every epoch end and checkpoint", default=0)


@dataclass(frozen=True)
class EMASpec:
    enabled: int = param(Flag(), "1: keep an EMA of the weights", default=0)
    decay: float = param(float_in(0, 1, hi_open=True), "EMA decay per step (1 would freeze the EMA)", default=0.9999)
    cpu: int = param(Flag(), "1: keep the EMA copy on the CPU (saves accelerator memory)", default=0)


@dataclass(frozen=True)
class ResolutionSpec:
    """The progressive-resizing ramp (:meth:`resolution_at`)."""

    min_res: int = param(int_in(16), "resolution up to start_ramp", default=224)
    max_res: int = param(int_in(16), "resolution from end_ramp on", default=224)
    start_ramp: int = param(int_in(0), "epoch at which the resolution starts to grow", default=0)
    end_ramp: int = param(int_in(0), "epoch at which it reaches max_res", default=0)
    step: int = param(int_in(1), "resolutions are rounded down to a multiple of this", default=32)

    def resolution_at(self, epoch: int) -> int:
        """Progressive resizing (0-based ``epoch``): ``min_res`` up to ``start_ramp``, growing linearly to ``max_res``
        at ``end_ramp``, rounded down to a multiple of ``step`` and kept within [min_res, max_res]."""
        if self.end_ramp <= self.start_ramp:
            res = float(self.max_res if epoch >= self.end_ramp else self.min_res)
        else:
            frac = min(max((epoch - self.start_ramp) / (self.end_ramp - self.start_ramp), 0.0), 1.0)
            res = self.min_res + frac * (self.max_res - self.min_res)
        return min(max(int(res) // self.step * self.step, self.min_res), self.max_res)


@dataclass(frozen=True)
class LRSpec:
    """The learning-rate schedule (:meth:`lr_at`)."""

    lr: float = param(PositiveFloat(), "peak learning rate (absolute, not scaled by the batch size)", default=1e-3)
    schedule: str = param(OneOf(["cosine", "step", "cyclic"]), "shape after the warm-up", default="cosine")
    warmup_epochs: float = param(float_in(0), "linear warm-up from 0 to the peak over this many epochs (lr_peak_epoch)",
                                  default=0.0)
    min_lr: float = param(float_in(0), "final learning rate of the cosine schedule", default=5e-6)
    step_ratio: float = param(float_in(0, 1), "step schedule: multiply the lr by this ...", default=0.1)
    step_length: int = param(int_in(1), "... every this many epochs", default=30)

    def lr_at(self, step: int, steps_per_epoch: int, *, epochs: int) -> float:
        """Learning rate for global iteration ``step`` (0-based) of ``epochs`` epochs of ``steps_per_epoch`` steps.

        Warm-up: linear from 0 to ``lr`` at ``warmup_epochs`` (the paper's ``lr_peak_epoch``). Then

        * ``cosine``: half cosine from ``lr`` down to ``min_lr`` at the end of training (the paper: 5e-6);
        * ``step``: ``lr * step_ratio ** (epoch // step_length)``;
        * ``cyclic``: linear from ``lr`` down to 0 at the end (the triangular schedule of ffcv-imagenet).

        A pure function of the step, so a resumed run needs no scheduler state (and timm has no triangular schedule).
        """
        total = epochs * steps_per_epoch
        warmup = self.warmup_epochs * steps_per_epoch
        t = step + 1  # the lr used for the update that completes step `t` of `total`
        if warmup > 0 and t <= warmup:
            return self.lr * t / warmup
        if self.schedule == "cosine":
            progress = (t - warmup) / max(total - warmup, 1)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if self.schedule == "step":
            return self.lr * self.step_ratio ** (step // (self.step_length * steps_per_epoch))
        if self.schedule == "cyclic":
            return self.lr * max(total - t, 0) / max(total - warmup, 1)
        raise ValueError(f"unknown lr schedule {self.schedule!r}: use cosine, step or cyclic")


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = param(int_in(1), "number of epochs", default=1)
    batch_size: int = param(int_in(1), "batch size per process (the global batch is this times the world size)",
                             default=64)
    optimizer: str = param(OneOf(["adamw", "sgd"]), "optimizer", default="adamw")
    weight_decay: float = param(float_in(0), "weight decay (not applied to norm, bias, position and token parameters)",
                                 default=0.05)
    beta1: float = param(float_in(0, 1), "AdamW beta1", default=0.9)
    beta2: float = param(float_in(0, 1), "AdamW beta2", default=0.95)
    momentum: float = param(float_in(0, 1), "SGD momentum", default=0.9)
    nesterov: int = param(Flag(), "1: Nesterov momentum for SGD", default=0)
    label_smoothing: float = param(float_in(0, 1), "label smoothing", default=0.0)
    precision: str = param(OneOf(list(PRECISIONS)), "autocast precision (GradScaler only for fp16)", default="bf16")
    grad_clip: float = param(float_in(0), "clip the gradient norm to this (0 = off)", default=0.0)
    seed: int = param(int_in(0), "random seed (each rank uses seed + rank)", default=0)
    device: str = param(OneOf(["auto", "cpu", "cuda"]), "auto = cuda when available", default="auto")
    resume: str = param(str, "'' = start fresh, 'auto' = newest checkpoint in the run directory, or a checkpoint path",
                         default="")
    save_every: int = param(int_in(1), "write a checkpoint every this many epochs (and always at the end)", default=1)
    limit_batches: int = param(int_in(0), "stop each epoch after this many optimizer steps (0 = whole epoch); for "
                                "smoke runs", default=0)
    grad_accum: int = param(int_in(1), "micro-batches of training.batch_size per optimizer step (gradient "
                             "accumulation: the global batch is batch_size x grad_accum x processes)", default=1)
    fused: int = param(Flag(), "1: AdamW's fused kernels (torch.optim.AdamW(fused=True)) instead of torch's "
                        "multi-tensor ones: the same update up to rounding, fewer kernel launches", default=0)
    cudnn_benchmark: int = param(Flag(), "1: torch.backends.cudnn.benchmark (cuDNN times its convolution "
                                  "algorithms once per input shape and keeps the fastest)", default=0)


@dataclass(frozen=True)
class AdvSpec:
    attack: str = param(OneOf(["none", "apgd", "pgd", "fgsm"]), "attack generating the training inputs",
                         default="none")
    norm: str = param(CommaList(OneOf(NORMS), "norms from Linf, L2, L1"), "threat model; several (e.g. Linf,L1) "
                       "alternate batch by batch as in E-AT", default="Linf")
    eps: str = param(CommaList(PositiveFloat(), "numbers > 0 (one per norm, e.g. 0.0157,75)", allow_empty=True),
                      "radius per norm in [0,1] pixel units; empty = Linf 4/255, L2 2, L1 75", default="")
    n_iter: str = param(CommaList(int_in(1), "ints >= 1 (one per norm, e.g. 2 or 2,5)"), "attack steps, one value or "
                         "one per norm (fgsm: always 1 step)", default="2")
    step_size: float = param(float_in(0), "attack step size (0 = the attack's default, 2*eps for APGD-Linf)",
                              default=0.0)
    random_start: int = param(Flag(), "1: random start (PGD; FGSM always starts at random)", default=0)
    mixed_loss: float = param(float_in(0, 1), "weight of the clean loss: (1-w)*adv + w*clean (0 = adversarial only)",
                               default=0.0)
    eps_warmup_epochs: float = param(float_in(0), "grow eps linearly from 0 over this many epochs", default=0.0)

    @property
    def threat_models(self) -> list[tuple[str, float, int]]:
        """The training attack's ``[(norm, eps, n_iter), ...]`` (:func:`threat_models`).

        FGSM is a single step by definition: with ``adv.attack fgsm`` every ``n_iter`` is 1, whatever ``adv.n_iter``
        says (params.json and checkpoints record ``adv.n_iter`` as given, so that ``-C params.json`` replays the run).
        """
        return threat_models(self.norm, self.eps, "1" if self.attack == "fgsm" else self.n_iter)


@dataclass(frozen=True)
class ValidationSpec:
    every: int = param(int_in(0), "evaluate every this many epochs (0 = only after the last one)", default=1)
    batch_size: int = param(int_in(1), "val batch size per process", default=64)
    resolution: int = param(int_in(0), "val resolution; 0 = the final training resolution", default=0)
    robust_n_ex: int = param(int_in(0), "robust accuracy on this many fixed val images (0 = clean only)", default=500)
    robust_n_iter: int = param(int_in(1), "APGD steps of the robust evaluation", default=10)


@dataclass(frozen=True)
class LoggingSpec:
    folder: str = param(str, "run directory: checkpoints/, metrics.jsonl, params.json, train.log",
                         default="runs/default")
    log_every: int = param(int_in(1), "log metrics every this many steps", default=50)
    progress: str = param(Progress(), f"{PROGRESS_HELP}; rank 0 only", default="auto")
    tensorboard: int = param(Flag(), "1: also write every metrics.jsonl record as TensorBoard scalars to "
                              "<folder>/tensorboard (rank 0; needs the tensorboard package)", default=0)
    keep_checkpoints: int = param(int_in(1), "keep the newest this many epoch_*.pt (best.pt and last.pt are always "
                                   "kept)", default=3)


@dataclass(frozen=True)
class DistSpec:
    backend: str = param(OneOf(["auto", "nccl", "gloo"]), "auto = nccl on GPU, gloo on CPU", default="auto")


@dataclass(frozen=True)
class TrainSpec:
    """Everything ``python -m rat.train`` was configured with, parsed and validated once (:func:`make_config`), as one
    frozen, typed object: ``spec.adv.attack``, ``spec.training.epochs``, ...

    :meth:`to_dict` is the resolved configuration exactly as :func:`config_to_dict` gives it (``params.json``, the
    ``config`` recorded in checkpoints, which a resume compares key by key).
    """

    data: DataSpec = section("Datasets (FFCV .beton files)")
    augment: AugmentSpec = section("Heavy augmentation (applied per sample, batch-wise on the training device)")
    aaa: AAASpec = section("Adversarial AutoAugment (augment.policy adversarial): a learned, loss-raising policy")
    model: ModelSpec = section("Architecture")
    ema: EMASpec = section("Exponential moving average of the weights (timm ModelEmaV3)")
    resolution: ResolutionSpec = section("Training resolution; progressive resizing from min_res to max_res")
    lr: LRSpec = section("Learning-rate schedule (updated every iteration)")
    training: TrainingSpec = section("Optimisation and run control")
    adv: AdvSpec = section("Adversarial training")
    validation: ValidationSpec = section("Evaluation during training")
    logging: LoggingSpec = section("Run directory and logging")
    dist: DistSpec = section("Distributed training (ranks come from torchrun's environment)")

    @classmethod
    def from_config(cls, config: Config) -> TrainSpec:
        """The spec of a Config built by :func:`make_train_config` (already validated)."""
        return spec_from_config(cls, config)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


def declare_train_sections() -> None:
    """Declare every Section of the trainer (the fields of :class:`TrainSpec`) on the current fastargs Config."""
    declare_spec(TrainSpec)


def make_train_config(argv: Sequence[str] | None = None, *, prog: str | None = None) -> Config:
    """The trainer's validated Config from config files and flags (:func:`rat.config.make_config` with its Sections and
    :func:`check_train_config`); ``argv=None``: the defaults."""
    return make_config(argv, declare=declare_train_sections, check=check_train_config, prog=prog,
                       description="rat adversarial training")


def check_train_config(config: Config) -> None:
    """The trainer's cross-parameter rules, which a single Param's checker cannot express."""
    norms = config["adv.norm"].split(",")
    for key in ("adv.eps", "adv.n_iter"):
        values = [v for v in config[key].split(",") if v]
        if len(values) not in (0, 1, len(norms)) or (key == "adv.n_iter" and not values):
            raise ConfigError(f"{key} has {len(values)} values for {len(norms)} norms ({config['adv.norm']}): "
                              "give one value, or one per norm")
        if key == "adv.eps" and len(values) == 1 and len(set(norms)) > 1:
            # One radius for different norms (say Linf 4/255 and L1 4/255) is never what E-AT means: the units differ
            # by orders of magnitude, so it is refused rather than silently shared.
            raise ConfigError(f"adv.eps gives one radius for the norms {config['adv.norm']}, whose radii are not "
                              "comparable: give one per norm (e.g. 0.0157,75), or leave adv.eps empty for the "
                              "defaults (Linf 4/255, L2 2, L1 75)")
    _check_augment_policy(config)
    # The smallest input the attack sees has the fewest pixel values, so the largest change per value for an L2/L1 ε.
    smallest = min(r for r in (config["resolution.min_res"], config["validation.resolution"]) if r)
    for norm, eps, _ in threat_models(config["adv.norm"], config["adv.eps"], config["adv.n_iter"]):
        try:
            warning = check_eps(norm, eps, smallest)
        except ValueError as err:
            raise ConfigError(f"adv.eps: {err}") from err
        if warning:
            _logger.warning("adv.eps: %s", warning)
    if not config["logging.folder"].strip():
        raise ConfigError("logging.folder is empty: name the run folder, e.g. --logging.folder runs/my_run")
    if config["resolution.min_res"] > config["resolution.max_res"]:
        raise ConfigError("resolution.min_res must not exceed resolution.max_res")
    if config["resolution.end_ramp"] < config["resolution.start_ramp"]:
        raise ConfigError("resolution.end_ramp must not be before resolution.start_ramp")


def _check_augment_policy(config: Config) -> None:
    """The adversarial policy's search space, and the configs it cannot serve."""
    if config["augment.policy"] != "adversarial":
        return
    try:
        AAASpec(**config_to_dict(config)["aaa"]).policy_space()
    except ValueError as err:
        raise ConfigError(f"aaa.ops/aaa.magnitudes: {err}") from err
    if config["aaa.schedule"] == "epoch" and config["aaa.update_every"] != 1:
        raise ConfigError(f"aaa.update_every={config['aaa.update_every']} applies to --aaa.schedule step; the epoch "
                          "schedule updates the controller once per epoch")
    group = images_per_policy(config["training.batch_size"], config["aaa.batch_fraction"])
    if config["augment.heavy"] and (config["augment.mixup"] > 0 or config["augment.cutmix"] > 0) and group % 2:
        raise ConfigError(f"mixup/cutmix pair the images within each policy's group of {group} (training.batch_size "
                          "x aaa.batch_fraction), which must be even: change either, or add --augment.mixup 0 "
                          "--augment.cutmix 0")


def threat_models(norm: str, eps: str, n_iter: str) -> list[tuple[str, float, int]]:
    """Expand the ``adv.norm``/``adv.eps``/``adv.n_iter`` strings into ``[(norm, eps, n_iter), ...]``."""
    norms = norm.split(",")
    eps_values = [float(v) for v in eps.split(",") if v] or [DEFAULT_EPS[n] for n in norms]
    iters = [int(v) for v in n_iter.split(",") if v]
    if len(eps_values) == 1:
        eps_values = eps_values * len(norms)
    if len(iters) == 1:
        iters = iters * len(norms)
    return list(zip(norms, eps_values, iters))
