"""``python -m rat.train``: config → data, model, EMA, DDP, optimizer, attack → epochs of adversarial training.

Launch through ``run_train.sh`` (torchrun) for one or many processes; ranks come from torchrun's environment. The config
is read only by the ``build_*`` functions here; the engine below them takes plain arguments.
"""
from __future__ import annotations

import logging
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastargs import get_current_config
from fastargs.decorators import param, section
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rat.attacks import create_attack, eps_warmup_factor
from rat.config import ConfigError, config_to_dict, dump_config, make_config, threat_models
from rat.data import build_augment, build_mixup, build_train_loader, build_val_loader, read_beton_info, read_classes
from rat.data.augment import BatchRandomErasing
from rat.data.demo import demo_root as default_demo_root
from rat.data.demo import ensure_demo_betons
from rat.data.policy import AdversarialAugment, PolicySpace
from rat.io import OutputError, check_writable
from rat.logging import MetricsWriter, setup_logging
from rat.models import CheckpointError, create_model, dynamic_size_kwargs
from rat.models.preflight import InputSizeError, UnknownArchError, check_arch, check_input_size
from rat.train.checkpoint import (
    CheckpointWriteError,
    config_changes,
    load_resume_checkpoint,
    remove_failed_writes,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from rat.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    check_replicas_in_sync,
    cleanup_distributed,
    gather_objects,
    init_distributed,
)
from rat.train.engine import evaluate, robust_accuracy, train_one_epoch
from rat.train.optim import build_optimizer, lr_at, resolution_at

_logger = logging.getLogger("rat.train")


class TrainingStopped(RuntimeError):
    """The run stopped before its last epoch (non-finite loss); the message says why and what is intact."""


class RunFinished(Exception):
    """``training.resume`` points at a run that has already trained all its epochs; nothing to do."""


def preflight(cfg: dict[str, dict[str, Any]]) -> tuple[Path, dict[str, Any]] | None:
    """Every check of the configuration that needs no process group and no compute, run before anything starts
    (``python -m rat.train --validate-only`` runs only these): the architecture exists, it takes the configured
    resolutions, the betons are readable rat betons, the run folder is writable, and a resumed checkpoint is readable
    and was trained with the same settings. Returns the checkpoint to resume (path and contents), if any.

    Raises:
        ConfigError: a bad setting or a resume that would change the run; the message names the key.
        FileNotFoundError: a missing beton or resume checkpoint.
        CheckpointError: an unreadable resume checkpoint.
        OutputError: the run folder cannot be written.
        RunFinished: the resumed run has trained all its epochs.
    """
    arch = cfg["model"]["arch"]
    try:
        check_arch(arch)
    except UnknownArchError as exc:
        raise ConfigError(f"model.arch: {exc}") from exc
    data = cfg["data"]
    if bool(data["train_dataset"]) != bool(data["val_dataset"]):
        raise ConfigError("give both data.train_dataset and data.val_dataset, or neither (= the demo dataset)")
    for name in ("train_dataset", "val_dataset"):
        if data[name]:
            try:
                read_beton_info(data[name])
            except (ValueError, FileNotFoundError) as exc:
                raise ConfigError(f"data.{name}: {exc}") from exc
    resolution, validation = cfg["resolution"], cfg["validation"]
    for key, value in (("resolution.min_res", resolution["min_res"]), ("resolution.max_res", resolution["max_res"]),
                       ("validation.resolution", validation["resolution"])):
        if value:
            try:
                check_input_size(arch, value, num_classes=cfg["data"]["num_classes"] or 1000)
            except InputSizeError as exc:
                raise ConfigError(f"{key}={value}: {exc}") from exc
    run_dir = Path(cfg["logging"]["folder"])
    check_writable(run_dir / "checkpoints", "run folder (logging.folder)")
    resumed = load_resume_checkpoint(cfg["training"]["resume"], run_dir)
    if resumed is None:
        return None
    path, state = resumed
    recorded = state.get("config") if isinstance(state.get("config"), dict) else None
    if recorded is None or "arch" not in state:
        raise ConfigError(f"cannot resume {path}: it is not a rat.train checkpoint (no recorded config); use it as "
                          f"--model.init_checkpoint {path} to start a new run from its weights")
    refused, allowed = config_changes(recorded, cfg)
    if refused:
        raise ConfigError(f"cannot resume {path} with a different configuration: {'; '.join(refused)}. Resume with "
                          f"the recorded settings (-C {run_dir / 'params.json'}), or start a new run in another "
                          "--logging.folder")
    if allowed:
        _logger.warning("resuming %s with changed settings: %s", path, "; ".join(allowed))
    epochs = cfg["training"]["epochs"]
    if state.get("epoch", 0) >= epochs and not state.get("batches_done"):
        raise RunFinished(f"run {run_dir} has already finished: {path} is at epoch {state.get('epoch')} of "
                          f"training.epochs={epochs}; nothing to do (raise --training.epochs to train longer)")
    return resumed


@section("data")
@param("train_dataset")
@param("val_dataset")
@param("demo_root")
def build_datasets(info: DistInfo, train_dataset: str, val_dataset: str, demo_root: str) -> tuple[Path, Path]:
    """The train/val beton paths (checked by ``preflight``); the embedded demo dataset (written by rank 0 on first use)
    when none is given."""
    if not train_dataset:
        root = default_demo_root(demo_root)
        if info.is_primary:
            ensure_demo_betons(root)
        barrier()
        return root / "train.beton", root / "val.beton"
    return Path(train_dataset), Path(val_dataset)


@section("model")
@param("arch")
@param("normalize")
@param("drop_path")
def model_kwargs(num_classes: int, img_size: int, arch: str, normalize: int,
                 drop_path: float) -> tuple[str, dict[str, Any]]:
    """Architecture name and the ``create_model`` kwargs a checkpoint records (``img_size``: the final training
    resolution, which sizes a ViT's position embedding; convolutional models ignore it). Models with a fixed input
    size (ViTs) are built with ``dynamic_img_size``, so that progressive resizing and validation at another resolution
    resample the position embedding on the fly, exactly as ``set_input_size`` does for rat.eval."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "normalize": bool(normalize), "img_size": img_size,
                              **dynamic_size_kwargs(arch)}
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    return arch, kwargs


@section("model")
@param("init_checkpoint")
@param("channels_last")
@param("compile")
def build_model(arch: str, kwargs: dict[str, Any], device: torch.device, init_checkpoint: str, channels_last: int,
                compile: int) -> tuple[nn.Module, nn.Module]:
    """(module to train, compiled or not) — created, initialised, moved, channels_last. Wrapping comes later."""
    module = create_model(arch, checkpoint=init_checkpoint or None, **kwargs)
    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module, (torch.compile(module) if compile else module)


@section("ema")
@param("enabled")
@param("decay")
@param("cpu")
def build_ema(module: nn.Module, enabled: int, decay: float, cpu: int) -> ModelEmaV3 | None:
    if not enabled:
        return None
    return ModelEmaV3(module, decay=decay, device="cpu" if cpu else None)


@section("training")
@param("optimizer")
@param("weight_decay")
@param("beta1")
@param("beta2")
@param("momentum")
@param("nesterov")
def build_optim(module: nn.Module, optimizer: str, weight_decay: float, beta1: float, beta2: float, momentum: float,
                nesterov: int) -> torch.optim.Optimizer:
    return build_optimizer(module, optimizer, lr=0.0, weight_decay=weight_decay, betas=(beta1, beta2),
                           momentum=momentum, nesterov=bool(nesterov))


@section("adv")
@param("attack")
@param("norm")
@param("eps")
@param("n_iter")
@param("step_size")
@param("random_start")
def build_attack(module: nn.Module, seed: int, attack: str, norm: str, eps: str, n_iter: str, step_size: float,
                 random_start: int):
    """The training attack on the unwrapped module: one norm, or E-AT's alternation over several."""
    options: dict[str, Any] = {}
    if step_size > 0 and attack != "none":
        options["step_size"] = step_size
    if attack == "fgsm":
        n_iter = "1"  # a single step by definition
    if attack == "pgd":
        options["random_start"] = bool(random_start)
    norms, eps_values, iters = zip(*threat_models(norm, eps, n_iter))
    return create_attack(attack, module, norm=list(norms), eps=list(eps_values), n_iter=list(iters), seed=seed,
                         **options)


@section("augment")
@param("heavy")
@param("randaugment")
@param("reprob")
@param("mixup")
@param("cutmix")
@param("mixup_prob")
@param("mixup_switch_prob")
@param("policy")
def build_augmentation(num_classes: int, label_smoothing: float, seed: int, heavy: int,
                       randaugment: str, reprob: float, mixup: float, cutmix: float, mixup_prob: float,
                       mixup_switch_prob: float, policy: str):
    """(augment, mixup, criterion, generator, erasing): per-sample heavy augmentation on the device (its random
    parameters drawn from ``generator``, a seeded CPU generator saved in checkpoints), timm Mixup/CutMix with label
    smoothing folded into the soft targets, the matching loss, and, for the adversarial policy (which then replaces
    ``augment``), the random erasing that follows it."""
    if policy == "adversarial":
        erasing = BatchRandomErasing(reprob) if heavy and reprob > 0 else None
        return None, None, nn.CrossEntropyLoss(label_smoothing=label_smoothing), torch.Generator().manual_seed(seed), \
            erasing
    if not heavy:
        return None, None, nn.CrossEntropyLoss(label_smoothing=label_smoothing), None, None
    generator = torch.Generator().manual_seed(seed)
    batch_augment = build_augment(randaugment, re_prob=reprob)

    def augment(x: torch.Tensor) -> torch.Tensor:
        return batch_augment(x, generator)

    mixup_fn = build_mixup(mixup, cutmix, mixup_switch_prob, label_smoothing, num_classes=num_classes,
                           prob=mixup_prob)
    criterion = SoftTargetCrossEntropy() if mixup_fn is not None else nn.CrossEntropyLoss(
        label_smoothing=label_smoothing)
    return augment, mixup_fn, criterion, generator, None


@section("aaa")
@param("num_policies")
@param("batch_fraction")
@param("ops")
@param("magnitudes")
@param("sub_policies")
@param("ops_per_sub_policy")
@param("lr")
@param("entropy_weight")
@param("baseline_decay")
@param("update_every")
@param("hidden_size")
def build_policy(generator: torch.Generator, erasing: BatchRandomErasing | None, seed: int, world_size: int,
                 num_policies: int, batch_fraction: float, ops: str, magnitudes: str, sub_policies: int,
                 ops_per_sub_policy: int, lr: float, entropy_weight: float, baseline_decay: float,
                 update_every: int, hidden_size: int) -> AdversarialAugment:
    """The Adversarial AutoAugment policy; ``seed`` (the run's, not the rank's) makes every rank's controller the
    same, and rewards are averaged over ranks so that they stay the same."""
    space = PolicySpace(tuple(v.strip() for v in ops.split(",") if v.strip()),
                        tuple(int(v) for v in magnitudes.split(",")), sub_policies, ops_per_sub_policy)
    return AdversarialAugment(space, num_policies=num_policies, lr=lr, entropy_weight=entropy_weight,
                              baseline_decay=baseline_decay, update_every=update_every,
                              batch_fraction=batch_fraction, seed=seed, augment_generator=generator,
                              random_erasing=erasing, reduce_mean=lambda t: all_reduce_sum(t) / world_size,
                              hidden_size=hidden_size)


def _eps_warmup(attack, warmup_epochs: float, steps_per_epoch: int):
    """An ``on_step`` hook scaling the attack's ε linearly from 0 to its configured value over the warm-up."""
    if warmup_epochs <= 0:
        return None

    def set_eps(step: int) -> None:
        attack.set_eps_scale(eps_warmup_factor((step + 1) / steps_per_epoch, warmup_epochs))

    return set_eps


class _SigtermFlag:
    """Set by SIGTERM (cluster pre-emption); the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.raised = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __call__(self) -> bool:
        return self.raised


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(config) -> dict[str, Any]:
    """Train as configured; returns the final metrics (rank 0's view)."""
    cfg = config_to_dict(config)
    training, logging_cfg, validation = cfg["training"], cfg["logging"], cfg["validation"]
    resumed = preflight(cfg)
    info = init_distributed(training["device"], cfg["dist"]["backend"])
    run_dir = Path(logging_cfg["folder"])
    if info.is_primary:
        remove_failed_writes(run_dir / "checkpoints")
    barrier()
    setup_logging(info.rank, run_dir / "train.log")
    seed = training["seed"] + info.rank
    _seed_everything(seed)
    stop_flag = _SigtermFlag()

    train_path, val_path = build_datasets(info)
    classes = read_classes(train_path)
    num_classes = cfg["data"]["num_classes"] or len(classes)
    arch, kwargs = model_kwargs(num_classes, cfg["resolution"]["max_res"])
    module, compiled = build_model(arch, kwargs, info.device)
    ema = build_ema(module)
    model = DistributedDataParallel(compiled, device_ids=[info.local_rank] if info.device.type == "cuda" else None) \
        if info.distributed else compiled
    optimizer = build_optim(module)
    precision = training["precision"]
    scaler = torch.amp.GradScaler(info.device.type) if precision == "fp16" else None
    augment, mixup, criterion, generator, erasing = build_augmentation(num_classes, training["label_smoothing"], seed)
    policy = build_policy(generator, erasing, training["seed"], info.world_size) \
        if cfg["augment"]["policy"] == "adversarial" else None
    attack = build_attack(module, seed)

    data = cfg["data"]
    train_loader = build_train_loader(train_path, batch_size=training["batch_size"],
                                      resolution=cfg["resolution"]["min_res"], device=info.device,
                                      num_workers=data["num_workers"], seed=training["seed"],
                                      distributed=info.distributed, in_memory=bool(data["in_memory"]),
                                      scale=(data["crop_scale_min"], 1.0), flip=bool(data["flip"]))
    steps_per_epoch = len(train_loader) if not training["limit_batches"] else min(training["limit_batches"],
                                                                                   len(train_loader))
    res_kwargs = {k: cfg["resolution"][k] for k in ("min_res", "max_res", "start_ramp", "end_ramp", "step")}
    val_res = validation["resolution"] or resolution_at(training["epochs"] - 1, **res_kwargs)
    num_val = read_beton_info(val_path)["num_samples"]
    shard = list(range(num_val))[info.rank::info.world_size]
    val_loader = build_val_loader(val_path, batch_size=validation["batch_size"], resolution=val_res,
                                  device=info.device, num_workers=data["num_workers"], indices=shard)
    robust_shard = list(range(min(validation["robust_n_ex"], num_val)))[info.rank::info.world_size]
    robust_loader = build_val_loader(val_path, batch_size=validation["batch_size"], resolution=val_res,
                                     device=info.device, num_workers=data["num_workers"],
                                     indices=robust_shard) if robust_shard else None

    start_epoch, step, skip_batches, best = 0, 0, 0, -1.0
    if resumed is not None:
        resume_path, state = resumed
        recorded_classes = (state.get("model_kwargs") or {}).get("num_classes")
        if recorded_classes != num_classes:
            raise ConfigError(f"cannot resume {resume_path}: it has {recorded_classes} classes but the data now has "
                              f"{num_classes}; resume with the data it was trained on")
        module.load_state_dict(state["model"])
        if ema is not None and state.get("model_ema") is not None:
            ema.module.load_state_dict(state["model_ema"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, skip_batches = state["epoch"], state["step"], state.get("batches_done", 0)
        best = state.get("best_robust", -1.0)
        attack.load_state_dict(state["attack"])
        if policy is not None and state.get("augment_policy") is not None:
            try:
                policy.load_state_dict(state["augment_policy"])
            except ValueError as err:
                raise ConfigError(f"cannot resume {resume_path}: {err}") from err
        elif policy is not None:
            _logger.warning("checkpoint has no adversarial policy state: the controller starts fresh")
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank], generator)
        else:
            _logger.warning("checkpoint has RNG states for %d ranks, this run has %d: continuing with fresh seeds",
                            len(rngs), info.world_size)
        _logger.info("resumed %s: epoch %d, step %d%s", resume_path, start_epoch, step,
                     f", skipping {skip_batches} finished batches" if skip_batches else "")
    if info.is_primary:
        dump_config(config, run_dir / "params.json")
        _logger.info("training %s (%d classes) on %s x%d, %d steps/epoch", arch, num_classes, info.device,
                     info.world_size, steps_per_epoch)
    metrics_writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=info.is_primary)
    eval_attack = build_eval_attack(module, seed)
    ema_eval_attack = build_eval_attack(ema.module, seed) if ema is not None else None

    def lr_fn(s: int) -> float:
        return lr_at(s, steps_per_epoch, epochs=training["epochs"], **{k: cfg["lr"][k] for k in (
            "lr", "schedule", "warmup_epochs", "min_lr", "step_ratio", "step_length")})

    def checkpoint(epoch_done: int, batches_done: int, metrics: dict, names: list[str]) -> None:
        in_sync = check_replicas_in_sync(module)
        if policy is not None:
            check_replicas_in_sync(policy.controller)
        rngs = gather_objects(rng_state(generator))
        if not info.is_primary:
            return
        state = {"model": module.state_dict(), "model_ema": ema.module.state_dict() if ema is not None else None,
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                 "epoch": epoch_done, "step": step, "batches_done": batches_done, "arch": arch,
                 "attack": attack.state_dict(), "replicas_in_sync": in_sync,
                 "model_kwargs": kwargs, "config": cfg, "rng": rngs, "metrics": metrics, "best_robust": best,
                 "augment_policy": policy.state_dict() if policy is not None else None}
        path = save_training_checkpoint(state, run_dir / "checkpoints", names)
        _logger.info("checkpoint written: %s", path)

    on_step = _eps_warmup(attack, cfg["adv"]["eps_warmup_epochs"], steps_per_epoch)
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, training["epochs"]):
        res = resolution_at(epoch, **res_kwargs)
        train_loader.set_resolution(res)
        train_loader.set_epoch(epoch)
        result = train_one_epoch(
            model, attack, criterion, train_loader, optimizer, mixed_loss=cfg["adv"]["mixed_loss"],
            device=info.device, epoch=epoch, step=step, lr_fn=lr_fn,
            precision=precision, scaler=scaler, ema=ema, augment=augment, policy=policy, mixup=mixup, on_step=on_step,
            grad_clip=training["grad_clip"], num_batches=steps_per_epoch, skip_batches=skip_batches,
            world_size=info.world_size, log_every=logging_cfg["log_every"], stop_requested=stop_flag,
            progress=bool(logging_cfg["progress"]) and info.is_primary, resolution=res,
            on_log=lambda record: metrics_writer.write({"kind": "step", **record}))
        skip_batches = 0
        if result.stop_reason == "nonfinite":
            raise TrainingStopped(f"non-finite loss at epoch {epoch}, step {result.step}: stopped without applying "
                                  f"that update; the last good checkpoint in {run_dir / 'checkpoints'} is intact "
                                  "(lower lr.lr, enable training.grad_clip, or use training.precision bf16/fp32)")
        step = result.step
        if result.stop_reason == "sigterm":
            checkpoint(epoch, result.batches, metrics, [])
            _logger.warning("SIGTERM: checkpoint saved at epoch %d, batch %d; resume with --training.resume auto",
                            epoch, result.batches)
            return {"stopped": "sigterm", **metrics}
        epoch_done = epoch + 1
        metrics = {"kind": "epoch", "epoch": epoch_done, "step": step, "train_loss": result.loss,
                   "img_per_s": result.img_per_s, "resolution": res, "lr": lr_fn(step - 1)}
        if policy is not None:
            metrics.update(policy.epoch_stats())
            _logger.info("controller's top sub-policies: %s", ", ".join(
                f"{policy.space.describe(tokens)} {share:.1%}" for tokens, share in policy.top_sub_policies(3)))
        last = epoch_done == training["epochs"]
        every = validation["every"]
        if last or (every and epoch_done % every == 0):
            metrics.update(_validate(module, ema, val_loader, robust_loader, eval_attack, ema_eval_attack,
                                     info.device, precision))
        robust_key = "ema_robust_top1" if ema is not None else "robust_top1"
        is_best = robust_key in metrics and metrics[robust_key] > best
        if is_best:
            best = metrics[robust_key]
        metrics_writer.write(metrics)
        _logger.info("epoch %d: %s", epoch_done, " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            if k != "kind" and not isinstance(v, dict)))
        if last or epoch_done % training["save_every"] == 0 or is_best:
            checkpoint(epoch_done, 0, metrics, [f"epoch_{epoch_done:04d}.pt"] + (["best.pt"] if is_best else []))
    return metrics


@section("validation")
@param("robust_n_ex")
@param("robust_n_iter")
def build_eval_attack(module: nn.Module, seed: int, robust_n_ex: int, robust_n_iter: int):
    """APGD with ``validation.robust_n_iter`` steps in the first training threat model, for the per-epoch check."""
    if robust_n_ex == 0:
        return None
    config = get_current_config()
    norm, eps, _ = threat_models(config["adv.norm"], config["adv.eps"], config["adv.n_iter"])[0]
    return create_attack("apgd", module, norm=norm, eps=eps, n_iter=robust_n_iter, seed=seed)


def _validate(module, ema, val_loader, robust_loader, eval_attack, ema_eval_attack, device, precision) -> dict:
    metrics: dict[str, Any] = {}
    for prefix, net, attack in (("", module, eval_attack), ("ema_", ema.module if ema is not None else None,
                                                           ema_eval_attack)):
        if net is None:
            continue
        metrics.update({f"{prefix}{k}": v for k, v in evaluate(net, val_loader, device, precision).items()})
        if attack is not None and robust_loader is not None:
            metrics.update({f"{prefix}{k}": v for k, v in robust_accuracy(attack, robust_loader, device,
                                                                           precision).items()})
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Train; returns 0 when done (or already done), 1 when the run failed, 2 on bad input (one line on stderr).

    ``--validate-only`` (``run_train.sh`` runs it before torchrun) runs only the up-front checks of ``preflight``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    validate_only = "--validate-only" in argv
    if validate_only:
        argv.remove("--validate-only")
    try:
        config = make_config(argv, prog="python -m rat.train")
        if validate_only:
            preflight(config_to_dict(config))
            return 0
        metrics = run(config)
    except RunFinished as done:
        print(f"rat.train: {done}", file=sys.stderr)
        return 0
    except (ConfigError, FileNotFoundError, CheckpointError, OutputError) as err:
        print(f"rat.train: error: {err}", file=sys.stderr)
        return 2
    except (TrainingStopped, CheckpointWriteError) as err:
        print(f"rat.train: error: {err}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()
    if "top1" in metrics:
        summary = f"clean top-1 {metrics['top1']:.2f}%"
        if "robust_top1" in metrics:
            summary += f", robust top-1 {metrics['robust_top1']:.2f}% (APGD, first training threat model)"
        _logger.info("done: %s; checkpoints in %s", summary,
                     Path(get_current_config()["logging.folder"]) / "checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
