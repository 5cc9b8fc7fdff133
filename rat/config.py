"""Every fastargs Section of rat, in one place, and the strict front end that builds a Config from YAML files and flags.

Values come, in increasing precedence, from each Param's default, the ``--config-file``/``-C`` YAML (or JSON) files
in the order given, and ``--section.name value`` flags. Unlike plain fastargs, rat

* rejects a key in a config file that no Section declares (fastargs silently ignores it), naming the key and the closest
  declared one;
* reports every invalid value with the rule it breaks, instead of printing a table and exiting with status 0;
* does not read parameters from environment variables (fastargs collects all of ``os.environ``, a silent source of
  surprises on shared clusters);
* uses 0/1 ints for on/off flags (fastargs' ``bool`` checker turns the string ``"0"`` into ``True``).

The trainer reads its configuration once: :meth:`TrainSpec.from_config` turns the validated Config into frozen, typed
dataclasses (one per Section), and code below the entry point takes those or plain arguments, never the Config.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import json
import logging
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from fastargs import Config, Param, Section, set_current_config
from fastargs.validation import And, Checker, InRange, OneOf

from rat.attacks import DEFAULT_EPS, NORMS, check_eps
from rat.cli import ArgumentParser
from rat.io import DuplicateKeyError, read_yaml
from rat.logging import PROGRESS_HELP, progress_setting
from rat.precision import PRECISIONS

if TYPE_CHECKING:
    from rat.data.policy import PolicySpace


_logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem the user has to fix; the message says which key and how."""


class StrictInt(Checker):
    """An integer; unlike fastargs' ``int`` it refuses 1.5 instead of truncating it to 1."""

    def check(self, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(value)

    def help(self) -> str:
        return "an int"


class Flag(Checker):
    """An on/off switch written as 0 or 1."""

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or str(value).strip() not in ("0", "1"):
            raise ValueError(value)
        return int(value)

    def help(self) -> str:
        return "0 or 1"


class Progress(Checker):
    """A progress setting: auto, 1 or 0 (:func:`rat.logging.progress_setting`, the one rule of every entry point)."""

    def check(self, value: Any) -> str:
        try:
            return progress_setting(value)
        except ValueError:
            raise ValueError(value) from None

    def help(self) -> str:
        return "auto, 1 or 0"


class CommaList(Checker):
    """A comma-separated list (or a single value, or a YAML list) whose items all pass ``item``; returns the string."""

    def __init__(self, item: Checker, what: str, allow_empty: bool = False):
        self.item = item
        self.what = what
        self.allow_empty = allow_empty

    def check(self, value: Any) -> str:
        items = value if isinstance(value, list) else str(value).split(",")
        items = [str(v).strip() for v in items if str(v).strip()]
        if not items and not self.allow_empty:
            raise ValueError(value)
        for item in items:
            self.item.check(item)
        return ",".join(items)

    def help(self) -> str:
        return f"comma-separated {self.what}" + (" (empty allowed)" if self.allow_empty else "")


class FiniteFloat(Checker):
    """A finite float in ``[lo, hi]`` (an end excluded with ``lo_open``/``hi_open``). Every float setting of rat is
    one: fastargs' ``float`` and ``InRange`` let NaN and infinity through, which then fail mid-run (or never)."""

    def __init__(self, lo: float = float("-inf"), hi: float = float("inf"), *, lo_open: bool = False,
                 hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def check(self, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(value)
        value = float(value)
        if not math.isfinite(value) or value < self.lo or value > self.hi or (self.lo_open and value == self.lo) \
                or (self.hi_open and value == self.hi):
            raise ValueError(value)
        return value

    def help(self) -> str:
        if self.lo_open and self.hi == float("inf"):
            return f"a finite float > {self.lo:g}"
        lo = "" if self.lo == float("-inf") else f"{self.lo:g}"
        hi = "" if self.hi == float("inf") else f"{self.hi:g}"
        if not hi:
            return f"a finite float >= {lo}" if lo else "a finite float"
        return f"a finite float in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


class PositiveFloat(FiniteFloat):
    def __init__(self) -> None:
        super().__init__(0, lo_open=True)


def _int(lo: float = float("-inf"), hi: float = float("inf")) -> Checker:
    return And(StrictInt(), InRange(lo, hi))


def _float(lo: float = float("-inf"), hi: float = float("inf"), *, hi_open: bool = False) -> Checker:
    return FiniteFloat(lo, hi, hi_open=hi_open)


# ---- the trainer's Sections: one frozen dataclass per Section, whose fields declare its Params --------------------
# Each field names a Param and carries its rule, description and default (_param); _declare_sections builds the
# fastargs Sections from them, and TrainSpec.from_config turns the validated Config into these typed, frozen objects.

def _param(checker: Any, desc: str, *, default: Any) -> Any:
    """A spec field that declares its fastargs Param (a fresh ``Param(checker, desc, default=default)`` per Config).

    The field itself has no dataclass default: specs are made only from a validated Config, where the Param's default
    applies."""
    return dataclasses.field(metadata={"param": (checker, desc, default)})


def _section(desc: str) -> Any:
    """A :class:`TrainSpec` field: one Section, described by ``desc``."""
    return dataclasses.field(metadata={"desc": desc})


@dataclass(frozen=True)
class DataSpec:
    train_dataset: str = _param(str, "train .beton; empty = the embedded demo dataset (built on first use)", default="")
    val_dataset: str = _param(str, "val .beton; empty = the embedded demo dataset's val split", default="")
    demo_root: str = _param(str, "where the demo betons are built and cached; empty = ~/.cache/rat/demo", default="")
    num_workers: int = _param(_int(1), "FFCV decoding threads per process", default=2)
    in_memory: int = _param(Flag(), "1: load the whole beton in RAM; 0: read through the OS page cache", default=1)
    num_classes: int = _param(_int(0), "number of classes; 0 = read from the beton's classes file", default=0)
    crop_scale_min: float = _param(_float(0.01, 1), "smallest area fraction of the training RandomResizedCrop",
                                   default=0.08)
    flip: int = _param(Flag(), "1: random horizontal flip in training (0 for data whose mirror image means something "
                       "else)", default=1)


@dataclass(frozen=True)
class AugmentSpec:
    heavy: int = _param(Flag(), "1: RandAugment + random erasing + mixup/cutmix (the paper's recipe)", default=0)
    randaugment: str = _param(str, "timm RandAugment config string", default="rand-m9-mstd0.5-inc1")
    reprob: float = _param(_float(0, 1), "random-erasing probability (pixel mode)", default=0.25)
    mixup: float = _param(_float(0), "mixup alpha (0 = off)", default=0.8)
    cutmix: float = _param(_float(0), "cutmix alpha (0 = off)", default=1.0)
    mixup_prob: float = _param(_float(0, 1), "probability of applying mixup or cutmix to a batch", default=1.0)
    mixup_switch_prob: float = _param(_float(0, 1), "probability of cutmix instead of mixup when both are on",
                                      default=0.5)
    policy: str = _param(OneOf(["randaugment", "adversarial"]), "augmentation policy: randaugment (fixed, with "
                         "augment.heavy 1) or adversarial (Adversarial AutoAugment, options in aaa.*; with "
                         "augment.heavy 1 random erasing follows it and mixup/cutmix mix within each policy's "
                         "images)", default="randaugment")


@dataclass(frozen=True)
class AAASpec:
    num_policies: int = _param(_int(1), "M: policies sampled per step; the batch is augmented M times (M x the cost)",
                               default=8)
    batch_fraction: float = _param(FiniteFloat(0, 1, lo_open=True), "share of the batch each policy augments (1 = "
                                   "the whole batch, M*B images as in the paper; 1/M = RandAugment's cost)",
                                   default=1.0)
    ops: str = _param(str, "comma-separated op types of the search space (default: all 15)",
                      default="ShearX,ShearY,TranslateX,TranslateY,Rotate,AutoContrast,Invert,Equalize,Solarize,"
                              "Posterize,Contrast,Color,Brightness,Sharpness,Cutout")
    magnitudes: str = _param(CommaList(_int(0, 10), "ints in [0, 10]"), "magnitude levels the controller chooses from "
                             "(timm's scale, level = m/10)", default="0,1,2,3,4,5,6,7,8,9")
    sub_policies: int = _param(_int(1), "sub-policies per policy", default=5)
    ops_per_sub_policy: int = _param(_int(1), "operations per sub-policy", default=2)
    lr: float = _param(_float(0), "controller Adam learning rate (0 = frozen, uniformly random policies)",
                       default=0.00035)
    entropy_weight: float = _param(_float(0), "weight of the controller's entropy bonus (keeps it from collapsing)",
                                   default=1e-5)
    schedule: str = _param(OneOf(["epoch", "step"]), "epoch: sample the M policies and update the controller once "
                           "per epoch, rewards the epoch's mean losses normalized across the policies (the paper, the "
                           "seed); step: new policies every step, reward minus a moving baseline", default="epoch")
    lstm_state: str = _param(OneOf(["sub_policy", "policy"]), "sub_policy: the controller's LSTM state starts afresh "
                             "for each sub-policy (the seed); policy: one state through a policy's ops",
                             default="sub_policy")
    magnitude_map: str = _param(OneOf(["seed", "autoaugment"]), "seed: a level spans the op's range low + level*(high "
                                "- low), so signed ops go -max..max (level 5 = identity); autoaugment: their size is "
                                "level*max (AutoAugment, timm)", default="seed")
    cutout_fill: str = _param(OneOf(["seed", "black"]), "Cutout's colour: seed (125,123,114) or black", default="seed")
    baseline_decay: float = _param(_float(0, 0.9999), "decay of the moving-average reward baseline (schedule step)",
                                   default=0.95)
    update_every: int = _param(_int(1), "schedule step: update the controller every this many steps (their samples "
                               "form one batch)", default=1)
    hidden_size: int = _param(_int(1), "controller LSTM width", default=100)

    def policy_space(self) -> PolicySpace:
        """The Adversarial AutoAugment search space (``rat.data.policy.PolicySpace``) of ``aaa.ops``/``magnitudes``/
        ``sub_policies``/``ops_per_sub_policy``.

        Raises:
            ValueError: an unknown op or an impossible space.
        """
        from rat.data.policy import PolicySpace

        return PolicySpace(tuple(v.strip() for v in self.ops.split(",") if v.strip()),
                           tuple(int(v) for v in self.magnitudes.split(",")), self.sub_policies,
                           self.ops_per_sub_policy)


@dataclass(frozen=True)
class ModelSpec:
    arch: str = _param(str, "any timm model name, e.g. convnext_tiny_cvst, vit_small_patch16_cvst, resnet50",
                       default="convnext_micro_cvst")
    normalize: int = _param(Flag(), "1: ImageNet mean/std normalization inside the model (inputs in [0,1])", default=1)
    drop_path: float = _param(_float(0, 1), "stochastic depth rate", default=0.0)
    init_checkpoint: str = _param(str, "initialise the weights from this checkpoint (e.g. a clean model); empty = "
                                  "random", default="")
    channels_last: int = _param(Flag(), "1: channels_last memory format", default=1)
    compile: int = _param(Flag(), "1: torch.compile the model", default=0)
    sync_bn: int = _param(Flag(), "1: SyncBatchNorm across processes (CUDA; timm's --sync-bn); 0: each process "
                          "normalizes its own batch and the BatchNorm statistics are averaged over the processes at "
                          "every epoch end and checkpoint", default=0)


@dataclass(frozen=True)
class EMASpec:
    enabled: int = _param(Flag(), "1: keep an EMA of the weights", default=0)
    decay: float = _param(_float(0, 1, hi_open=True), "EMA decay per step (1 would freeze the EMA)", default=0.9999)
    cpu: int = _param(Flag(), "1: keep the EMA copy on the CPU (saves accelerator memory)", default=0)


@dataclass(frozen=True)
class ResolutionSpec:
    """The progressive-resizing ramp; the field names are ``rat.train.optim.resolution_at``'s keyword arguments."""

    min_res: int = _param(_int(16), "resolution up to start_ramp", default=224)
    max_res: int = _param(_int(16), "resolution from end_ramp on", default=224)
    start_ramp: int = _param(_int(0), "epoch at which the resolution starts to grow", default=0)
    end_ramp: int = _param(_int(0), "epoch at which it reaches max_res", default=0)
    step: int = _param(_int(1), "resolutions are rounded down to a multiple of this", default=32)


@dataclass(frozen=True)
class LRSpec:
    """The learning-rate schedule; the field names are ``rat.train.optim.lr_at``'s keyword arguments."""

    lr: float = _param(PositiveFloat(), "peak learning rate (absolute, not scaled by the batch size)", default=1e-3)
    schedule: str = _param(OneOf(["cosine", "step", "cyclic"]), "shape after the warm-up", default="cosine")
    warmup_epochs: float = _param(_float(0), "linear warm-up from 0 to the peak over this many epochs (lr_peak_epoch)",
                                  default=0.0)
    min_lr: float = _param(_float(0), "final learning rate of the cosine schedule", default=5e-6)
    step_ratio: float = _param(_float(0, 1), "step schedule: multiply the lr by this ...", default=0.1)
    step_length: int = _param(_int(1), "... every this many epochs", default=30)


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = _param(_int(1), "number of epochs", default=1)
    batch_size: int = _param(_int(1), "batch size per process (the global batch is this times the world size)",
                             default=64)
    optimizer: str = _param(OneOf(["adamw", "sgd"]), "optimizer", default="adamw")
    weight_decay: float = _param(_float(0), "weight decay (not applied to norm, bias, position and token parameters)",
                                 default=0.05)
    beta1: float = _param(_float(0, 1), "AdamW beta1", default=0.9)
    beta2: float = _param(_float(0, 1), "AdamW beta2", default=0.95)
    momentum: float = _param(_float(0, 1), "SGD momentum", default=0.9)
    nesterov: int = _param(Flag(), "1: Nesterov momentum for SGD", default=0)
    label_smoothing: float = _param(_float(0, 1), "label smoothing", default=0.0)
    precision: str = _param(OneOf(list(PRECISIONS)), "autocast precision (GradScaler only for fp16)", default="bf16")
    grad_clip: float = _param(_float(0), "clip the gradient norm to this (0 = off)", default=0.0)
    seed: int = _param(_int(0), "random seed (each rank uses seed + rank)", default=0)
    device: str = _param(OneOf(["auto", "cpu", "cuda"]), "auto = cuda when available", default="auto")
    resume: str = _param(str, "'' = start fresh, 'auto' = newest checkpoint in the run directory, or a checkpoint path",
                         default="")
    save_every: int = _param(_int(1), "write a checkpoint every this many epochs (and always at the end)", default=1)
    limit_batches: int = _param(_int(0), "stop each epoch after this many optimizer steps (0 = whole epoch); for "
                                "smoke runs", default=0)
    grad_accum: int = _param(_int(1), "micro-batches of training.batch_size per optimizer step (gradient "
                             "accumulation: the global batch is batch_size x grad_accum x processes)", default=1)
    fused: int = _param(Flag(), "1: AdamW's fused kernels (torch.optim.AdamW(fused=True)) instead of torch's "
                        "multi-tensor ones: the same update up to rounding, fewer kernel launches", default=0)
    cudnn_benchmark: int = _param(Flag(), "1: torch.backends.cudnn.benchmark (cuDNN times its convolution "
                                  "algorithms once per input shape and keeps the fastest)", default=0)


@dataclass(frozen=True)
class AdvSpec:
    attack: str = _param(OneOf(["none", "apgd", "pgd", "fgsm"]), "attack generating the training inputs",
                         default="none")
    norm: str = _param(CommaList(OneOf(NORMS), "norms from Linf, L2, L1"), "threat model; several (e.g. Linf,L1) "
                       "alternate batch by batch as in E-AT", default="Linf")
    eps: str = _param(CommaList(PositiveFloat(), "numbers > 0 (one per norm, e.g. 0.0157,75)", allow_empty=True),
                      "radius per norm in [0,1] pixel units; empty = Linf 4/255, L2 2, L1 75", default="")
    n_iter: str = _param(CommaList(_int(1), "ints >= 1 (one per norm, e.g. 2 or 2,5)"), "attack steps, one value or "
                         "one per norm (fgsm: always 1 step)", default="2")
    step_size: float = _param(_float(0), "attack step size (0 = the attack's default, 2*eps for APGD-Linf)",
                              default=0.0)
    random_start: int = _param(Flag(), "1: random start (PGD; FGSM always starts at random)", default=0)
    mixed_loss: float = _param(_float(0, 1), "weight of the clean loss: (1-w)*adv + w*clean (0 = adversarial only)",
                               default=0.0)
    eps_warmup_epochs: float = _param(_float(0), "grow eps linearly from 0 over this many epochs", default=0.0)

    @property
    def threat_models(self) -> list[tuple[str, float, int]]:
        """The training attack's ``[(norm, eps, n_iter), ...]`` (:func:`threat_models`).

        FGSM is a single step by definition: with ``adv.attack fgsm`` every ``n_iter`` is 1, whatever ``adv.n_iter``
        says (params.json and checkpoints record ``adv.n_iter`` as given, so that ``-C params.json`` replays the run).
        """
        return threat_models(self.norm, self.eps, "1" if self.attack == "fgsm" else self.n_iter)


@dataclass(frozen=True)
class ValidationSpec:
    every: int = _param(_int(0), "evaluate every this many epochs (0 = only after the last one)", default=1)
    batch_size: int = _param(_int(1), "val batch size per process", default=64)
    resolution: int = _param(_int(0), "val resolution; 0 = the final training resolution", default=0)
    robust_n_ex: int = _param(_int(0), "robust accuracy on this many fixed val images (0 = clean only)", default=500)
    robust_n_iter: int = _param(_int(1), "APGD steps of the robust evaluation", default=10)


@dataclass(frozen=True)
class LoggingSpec:
    folder: str = _param(str, "run directory: checkpoints/, metrics.jsonl, params.json, train.log",
                         default="runs/default")
    log_every: int = _param(_int(1), "log metrics every this many steps", default=50)
    progress: str = _param(Progress(), f"{PROGRESS_HELP}; rank 0 only", default="auto")
    tensorboard: int = _param(Flag(), "1: also write every metrics.jsonl record as TensorBoard scalars to "
                              "<folder>/tensorboard (rank 0; needs the tensorboard package)", default=0)
    keep_checkpoints: int = _param(_int(1), "keep the newest this many epoch_*.pt (best.pt and last.pt are always "
                                   "kept)", default=3)


@dataclass(frozen=True)
class DistSpec:
    backend: str = _param(OneOf(["auto", "nccl", "gloo"]), "auto = nccl on GPU, gloo on CPU", default="auto")


@dataclass(frozen=True)
class TrainSpec:
    """Everything ``python -m rat.train`` was configured with, parsed and validated once (:func:`make_config`), as one
    frozen, typed object: ``spec.adv.attack``, ``spec.training.epochs``, ...

    :meth:`to_dict` is the resolved configuration exactly as :func:`config_to_dict` gives it (``params.json``, the
    ``config`` recorded in checkpoints, which a resume compares key by key).
    """

    data: DataSpec = _section("Datasets (FFCV .beton files)")
    augment: AugmentSpec = _section("Heavy augmentation (applied per sample, batch-wise on the training device)")
    aaa: AAASpec = _section("Adversarial AutoAugment (augment.policy adversarial): a learned, loss-raising policy")
    model: ModelSpec = _section("Architecture")
    ema: EMASpec = _section("Exponential moving average of the weights (timm ModelEmaV3)")
    resolution: ResolutionSpec = _section("Training resolution; progressive resizing from min_res to max_res")
    lr: LRSpec = _section("Learning-rate schedule (updated every iteration)")
    training: TrainingSpec = _section("Optimisation and run control")
    adv: AdvSpec = _section("Adversarial training")
    validation: ValidationSpec = _section("Evaluation during training")
    logging: LoggingSpec = _section("Run directory and logging")
    dist: DistSpec = _section("Distributed training (ranks come from torchrun's environment)")

    @classmethod
    def from_dict(cls, values: dict[str, dict[str, Any]]) -> TrainSpec:
        """The spec of a resolved ``{section: {name: value}}`` configuration (every trainer Section, every Param)."""
        types = typing.get_type_hints(cls)
        return cls(**{f.name: types[f.name](**values[f.name]) for f in dataclasses.fields(cls)})

    @classmethod
    def from_config(cls, config: Config) -> TrainSpec:
        """The spec of a Config built by :func:`make_config` with the trainer's Sections (already validated)."""
        return cls.from_dict(config_to_dict(config))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _declare_sections() -> None:
    """Declare every Section of the trainer (the fields of :class:`TrainSpec`, each with its Params) on the current
    fastargs Config."""
    types = typing.get_type_hints(TrainSpec)
    for section in dataclasses.fields(TrainSpec):
        params = {}
        for field in dataclasses.fields(types[section.name]):
            checker, desc, default = field.metadata["param"]
            params[field.name] = Param(checker, desc, default=default)
        Section(section.name, section.metadata["desc"]).params(**params)


# ---- rat.quant (python -m rat.quant SUBCOMMAND): one declare function per subcommand -------------------------------
QUANT_SUBCOMMANDS = ("ptq", "sweep", "fit", "generate", "estimate")


def _declare_quant_model() -> None:
    Section("qmodel", "The full-precision model (a rat checkpoint: arch and model_kwargs come from it)").params(
        checkpoint=Param(str, "rat trainer checkpoint (required)", default=""),
        use_ema=Param(Flag(), "1: the checkpoint's EMA weights", default=0),
        resolution=Param(_int(0), "input side; 0 = the checkpoint's training resolution", default=0),
        device=Param(OneOf(["auto", "cpu", "cuda"]), "auto = cuda when available", default="auto"),
        batch_size=Param(_int(1), "images per forward pass", default=100),
    )


def _declare_quant_data(eval_data: bool, calib: bool, split: bool = False) -> None:
    params = {"demo_root": Param(str, "where the demo betons live; empty = ~/.cache/rat/demo", default=""),
              "num_workers": Param(_int(0), "loader workers", default=2)}
    if eval_data and split:  # estimate: the score part of the guide/score split (docs/quant.md)
        params["data"] = Param(str, "val .beton or ImageNet-style folder, the one generate's guide images came "
                               "from; empty = the demo val set", default="")
        params["n_ex"] = Param(_int(1), "scoring images: the next n_ex of rat.eval's seeded order after the guide "
                               "part", default=200)
        params["guide_n"] = Param(_int(-1), "images of the guide part the scoring images skip; -1 = the generated "
                                  "set's recorded guide part", default=-1)
    elif eval_data:
        params["data"] = Param(str, "val .beton or ImageNet-style folder; empty = the demo val set", default="")
        params["n_ex"] = Param(_int(1), "evaluation images (the fixed subset of rat.eval)", default=300)
    if calib:
        params["calib_data"] = Param(str, "calibration .beton or folder; empty = the demo train set", default="")
        params["calib_n"] = Param(_int(1), "calibration images", default=256)
    Section("qdata", "Images for calibration and evaluation").params(**params)


def _declare_quant_attack() -> None:
    Section("qattack", "Robust accuracy: APGD-CE, optionally AutoAttack").params(
        norm=Param(OneOf(NORMS), "threat model", default="Linf"),
        eps=Param(_float(0), "radius in [0,1] pixel units; 0 = Linf 4/255, L2 2, L1 75", default=0.0),
        n_iter=Param(_int(1), "APGD steps", default=10),
        autoattack=Param(OneOf(["", "fast", "standard"]), "'' = off, else AutoAttack version", default=""),
        seed=Param(_int(0), "attack seed", default=0),
    )


def _declare_quant_scheme() -> None:
    Section("qscheme", "How layers are quantized (the seed's scheme by default)").params(
        fold_bn=Param(Flag(), "1: fold each BatchNorm into the convolution before it, then quantize", default=1),
        quant_bias=Param(Flag(), "1: quantize biases at the accumulator scale (INT32 for INT, bfloat16 for FLOAT/POT); "
                         "0: keep them in float", default=1),
    )


def declare_quant_sections(subcommand: str) -> Callable[[], None]:
    """The ``declare`` function (for :func:`make_config`) of one ``python -m rat.quant`` subcommand."""
    def ptq() -> None:
        _declare_quant_model()
        _declare_quant_data(eval_data=False, calib=True)
        _declare_quant_scheme()
        Section("ptq", "Post-training quantization to one format").params(
            format=Param(str, "INT<b> (2-16), POT<b> (2-8) or FLOAT<b>_E<e>M<m> (3-8), e.g. int8, float8_e4m3",
                         default=""),
            output=Param(str, "quantized checkpoint to write (must not exist)", default=""),
        )

    def sweep() -> None:
        _declare_quant_model()
        _declare_quant_data(eval_data=True, calib=True)
        _declare_quant_attack()
        _declare_quant_scheme()
        Section("sweep", "Every format and bit width for one model").params(
            kinds=Param(CommaList(OneOf(["INT", "POT", "FLOAT", "int", "pot", "float"]), "formats"),
                        "format families of the grid (INT 2-16, POT 2-8, FLOAT 3-8 with every e)",
                        default="INT,POT,FLOAT"),
            formats=Param(str, "comma-separated formats instead of the grid, e.g. int8,int4,pot4", default=""),
            name=Param(str, "model name in the results; empty = the checkpoint's run folder", default=""),
            output=Param(str, "results folder: sweep.jsonl and sweep.csv (must not hold a sweep.jsonl)",
                         default=""),
            progress=Param(Progress(), PROGRESS_HELP, default="auto"),
            same_grid=Param(Flag(), "1: also evaluate formats whose grid equals an earlier one's (FLOAT E1 = INT, "
                            "FLOAT M0 = POT; recorded with same_grid_as, left out of fits); 0: skip them", default=1),
            bins=Param(_int(2), "bins of the histogram similarity (recorded as hist_js_*)", default=256),
        )

    def fit() -> None:
        Section("fit", "Fit accuracy loss against weight similarity across sweeps").params(
            sweeps=Param(str, "comma-separated sweep.jsonl files (one or more models)", default=""),
            similarity=Param(OneOf(["js_flops", "js_param", "js_flops_wt_log", "js_flops_wt_cbrt", "hist_js_flops",
                                    "hist_js_param", "hist_js_flops_wt_log", "hist_js_flops_wt_cbrt"]),
                             "x axis of the plot: the seed's softmax JS (js_*) or the histogram JS (hist_js_*), "
                             "weighted by FLOPs, parameters, FLOPs x log10(MACs) or FLOPs x MACs^(1/3)",
                             default="js_flops"),
            output=Param(str, "plot (.png); the fit summary goes next to it as .json", default=""),
        )

    def generate() -> None:
        _declare_quant_model()
        _declare_quant_attack()
        Section("qdata", "Real images: the guide part that sets the adjustment's targets, and your own unlabeled "
                "images for the activation statistics of a model without BatchNorm").params(
            data=Param(str, "val .beton or ImageNet-style folder the guide part comes from; empty = the demo val set",
                       default=""),
            guide_n=Param(_int(1), "guide images: the first guide_n of rat.eval's seeded order of qdata.data "
                          "(estimate scores only on images after them)", default=100),
            demo_root=Param(str, "where the demo betons live; empty = ~/.cache/rat/demo", default=""),
            stats_data=Param(str, ".beton or folder; empty for BatchNorm models", default=""),
            stats_n=Param(_int(1), "images to record statistics on", default=256),
            num_workers=Param(_int(0), "loader workers", default=2),
        )
        Section("generate", "Train and adjust the label-conditioned generator").params(
            target_clean=Param(_float(-1, 100), "the model's real clean accuracy in %, measured on the guide part "
                               "(qdata.guide_n images of qdata.data); -1 = rat measures it there", default=-1.0),
            target_robust=Param(_float(-1, 100), "its real robust accuracy in % on the guide part (APGD, qattack's "
                                "threat model); -1 = rat measures it there", default=-1.0),
            steps=Param(_int(1), "stage-1 training steps", default=400),
            rounds=Param(_int(0), "adjustment rounds (0 = no adjustment)", default=8),
            steps_per_round=Param(_int(1), "generator steps per adjustment round", default=40),
            batch_size=Param(_int(2), "generated images per step", default=64),
            lr=Param(PositiveFloat(), "Adam learning rate", default=1e-3),
            mix=Param(_float(0, 1), "initial share of inter-class samples", default=0.2),
            stat_weight=Param(_float(0), "weight of the feature-statistics term", default=1.0),
            width=Param(_int(4), "channels of the generator's first feature map (its cost grows with the square)",
                        default=128),
            n_samples=Param(_int(1), "images in the generated set", default=1000),
            tolerance=Param(_float(0), "stop adjusting once clean and robust are this close (points)", default=1.0),
            seed=Param(_int(0), "seed", default=0),
            output=Param(str, "generated set (.pt, must not exist): images, labels, generator", default=""),
            progress=Param(Progress(), PROGRESS_HELP, default="auto"),
        )

    def estimate() -> None:
        _declare_quant_model()
        _declare_quant_data(eval_data=True, calib=False, split=True)
        _declare_quant_attack()
        _declare_quant_scheme()
        Section("estimate", "Clean/robust accuracy of FP and quantized models on a generated set").params(
            generated=Param(str, "generated set from `generate`", default=""),
            formats=Param(str, "comma-separated formats to estimate, e.g. int8,int4,pot4,float6_e3m2", default=""),
            real=Param(Flag(), "1: also measure on qdata.data (or the demo val set) and report the errors", default=0),
            output=Param(str, "results JSON (must not exist)", default=""),
        )

    return {"ptq": ptq, "sweep": sweep, "fit": fit, "generate": generate, "estimate": estimate}[subcommand]
# ---- end rat.quant ------------------------------------------------------------------------------------------------


def _leaf_keys(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf key of a config file's content as a path (dotted keys split), repeats kept."""
    if not isinstance(tree, dict):
        return [prefix]
    return [leaf for key, value in tree.items() for leaf in _leaf_keys(value, prefix + tuple(str(key).split(".")))]


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        path = prefix + tuple(str(key).split("."))
        flat.update(_flatten(value, path) if isinstance(value, dict) else {path: value})
    return flat


RECORD_KEY = "run_record"


def load_config_file(config: Config, fname: str) -> dict:
    """A YAML/JSON config file's values, every key checked against ``config``'s declared Params.

    Raises:
        ConfigError: the file is missing or not a mapping, or has a key no Section declares (fastargs'
            ``collect_config_file`` would silently ignore it); the message names the key and the closest declared one.
    """
    path = Path(fname)
    if not path.is_file():
        raise ConfigError(f"config file {fname} does not exist: check the path given to --config-file")
    try:
        content = read_yaml(path) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {fname} is not a text file ({err.reason} at byte {err.start}): pass a YAML "
                          "or JSON config such as configs/demo.yaml") from err
    except DuplicateKeyError as err:
        raise ConfigError(f"config file {fname}: {err}: keep one of them") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {fname} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(content, dict):
        raise ConfigError(f"config file {fname} must map sections to parameters, got {type(content).__name__}")
    content.pop(RECORD_KEY, None)  # params.json's record of the run that wrote it (dump_config), not settings
    known = [".".join(p) for p in config.entries]
    flat = _flatten(content)
    for path_key, count in collections.Counter(_leaf_keys(content)).items():
        if count > 1:  # e.g. `training: {epochs: 1}` and `training.epochs: 50`
            raise ConfigError(f"config file {fname} gives '{'.'.join(path_key)}' {count} times (nested and dotted), "
                              "and only the last would count: keep one of them")
    for path_key in flat:
        if path_key not in config.entries:
            name = ".".join(path_key)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see `--help` for the declared parameters"
            raise ConfigError(f"unknown key '{name}' in config file {fname}: {hint}")
    return content


def _parser(config: Config, prog: str | None, description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", "-C", action="append", default=[],
                        help="YAML/JSON config file; repeatable, later files win, flags win over files")
    lines = []
    for path, param in config.entries.items():
        name = ".".join(path)
        parser.add_argument(f"--{name}", dest=name, default=None, metavar="V", help=argparse.SUPPRESS)
        lines.append(f"  --{name:<32} {param.desc} [{param.checker.help()}; default {param.default!r}]")
    parser.epilog = "parameters:\n" + "\n".join(lines)
    return parser


def make_config(argv: Sequence[str] | None = None, *, prog: str | None = None,
                description: str = "rat adversarial training", declare: Callable[[], None] | None = None,
                check: Callable[[Config], None] | None = None) -> Config:
    """Build a fresh fastargs Config (and make it the current one) from config files and flags.

    Args:
        argv: command-line arguments without the program name; ``None`` = no arguments (defaults only).
        prog: program name for ``--help``.
        description: text for ``--help``.
        declare: declares the Sections of another command (e.g. one of :func:`declare_quant_sections`); default the
            trainer's.
        check: cross-parameter rules of those Sections; default the trainer's (only when ``declare`` is default).

    Raises:
        ConfigError: an unknown key in a config file, or values that break their Param's rule (all of them listed).
    """
    config = Config()
    set_current_config(config)
    if declare is None:
        declare, check = _declare_sections, _check_consistency
    declare()
    args = vars(_parser(config, prog, description).parse_args(list(argv or [])))
    for fname in args.pop("config_file"):
        config.collect(load_config_file(config, fname))
    config.collect({k: v for k, v in args.items() if v is not None})
    errors = config.validate(mode="errordict")
    if errors:
        problems = "; ".join(
            f"{'.'.join(path)}={config.content.get(path)!r} is not {config.entries[path].checker.help()}"
            for path in errors)
        raise ConfigError(f"invalid configuration: {problems}")
    if check is not None:
        check(config)
    return config


def _check_consistency(config: Config) -> None:
    """Cross-parameter rules that a single Param's checker cannot express."""
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
    from rat.data.policy import images_per_policy

    group = images_per_policy(config["training.batch_size"], config["aaa.batch_fraction"])
    if config["augment.heavy"] and (config["augment.mixup"] > 0 or config["augment.cutmix"] > 0) and group % 2:
        raise ConfigError(f"mixup/cutmix pair the images within each policy's group of {group} (training.batch_size "
                          "x aaa.batch_fraction), which must be even: change either, or add --augment.mixup 0 "
                          "--augment.cutmix 0")


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The full resolved configuration as ``{section: {name: value}}`` (what params.json stores)."""
    result: dict[str, dict[str, Any]] = {}
    for path in config.entries:
        result.setdefault(path[0], {})[".".join(path[1:])] = config[path]
    return result


def dump_config(values: dict[str, dict[str, Any]], path: str | Path, record: dict[str, Any] | None = None) -> None:
    """Write a resolved configuration (:func:`config_to_dict`, :meth:`TrainSpec.to_dict`) as JSON: a file that
    ``--config-file`` accepts back (``params.json``). ``record``: facts of the run that are no settings (the trainer's
    ``world_size`` and ``global_batch``), stored under :data:`RECORD_KEY`, which ``--config-file`` skips."""
    content = {**values, RECORD_KEY: record} if record is not None else values
    Path(path).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


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
