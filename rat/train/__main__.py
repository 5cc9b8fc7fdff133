"""``python -m rat.train``: config → run spec → build → (resume) → epochs of adversarial training → checkpoints.

Launch through ``run_train.sh`` (torchrun) for one or many processes; ranks come from torchrun's environment. ``main``
reads the configuration once into a frozen :class:`TrainSpec`; everything below takes the spec's Sections or
plain arguments. A run is built (:func:`_build`: data, model, EMA, DDP, optimizer, augmentation, attack, loaders, held
by one :class:`~rat.train.state.TrainState` and one :class:`~rat.train.task.AdversarialTask`), resumed from a
checkpoint through ``TrainState.load_state_dict`` (:func:`_resume`), then trained epoch by epoch (:func:`_train`), with
validation (:func:`_validate`) and checkpoints (:func:`_checkpoint`, ``TrainState.state_dict``).
"""
from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rat.attacks import Attack
from rat.config import ConfigError, dump_config
from rat.data import read_classes
from rat.io import OutputError
from rat.logging import MetricsError, MetricsWriter, logging_scope, read_metrics, setup_logging
from rat.models import CheckpointError
from rat.train.build import (
    Loaders,
    build_attack,
    build_augmentation,
    build_eval_attack,
    build_loaders,
    build_model,
    dataset_paths,
    model_kwargs,
)
from rat.train.checkpoint import (
    CheckpointWriteError,
    remove_failed_writes,
    save_on_primary,
)
from rat.train.distributed import (
    DistInfo,
    barrier,
    batchnorm_stats,
    broadcast_object,
    cleanup_distributed,
    env_rank,
    init_distributed,
)
from rat.train.engine import EpochHooks, StepOptions, evaluate, robust_accuracy, train_one_epoch
from rat.train.optim import build_optimizer
from rat.train.preflight import RunFinished, claim_run_folder, preflight
from rat.train.spec import TrainSpec, make_train_config
from rat.train.state import TrainState
from rat.train.task import AdversarialTask

_logger = logging.getLogger("rat.train")


class TrainingStopped(RuntimeError):
    """The run stopped before its last epoch (non-finite loss); the message says why and what is intact."""


class _RunHooks(EpochHooks):
    """SIGTERM (cluster pre-emption) and SIGINT (Ctrl-C) set a flag: the epoch stops after the step in flight, and the
    run saves a checkpoint and exits. Step records go to metrics.jsonl (written by rank 0 only); a record that cannot
    be written stops the run the same way (``write_error``)."""

    def __init__(self, writer: MetricsWriter):
        self.writer = writer
        self.signal: str | None = None
        self.write_error: str | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name
        # The run is stopping: later signals (run_train.sh forwards Ctrl-C as SIGTERM; scancel repeats it) are
        # ignored, also while the interpreter shuts down, when Python would restore their default (kill) action.
        for other in (signal.SIGTERM, signal.SIGINT):
            signal.signal(other, signal.SIG_IGN)

    def stop_requested(self) -> bool:
        return self.signal is not None or self.write_error is not None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl; a failure (full disk) is kept in ``write_error`` and stops the run."""
        try:
            self.writer.write(record)
        except OSError as exc:
            self.write_error = self.write_error or f"could not append to {self.writer.path} " \
                                                   f"({exc.strerror or exc})"

    def log(self, record: dict[str, Any]) -> None:
        self.write({"kind": "step", **record})


@dataclass
class _Run:
    """One rank's run, as :func:`_build` assembles it."""

    spec: TrainSpec
    info: DistInfo
    hooks: _RunHooks
    state: TrainState
    task: AdversarialTask
    loaders: Loaders
    options: StepOptions
    eval_models: list[tuple[str, nn.Module, Attack | None]]  # (metrics prefix, model, its robust-accuracy attack)
    classes: list[str]  # the data's class names in label order (recorded in every checkpoint)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.spec.logging.folder) / "checkpoints"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build(spec: TrainSpec, info: DistInfo, hooks: _RunHooks) -> _Run:
    """Data, model (created → SyncBatchNorm → device → channels_last → DDP → EMA), optimizer, scaler, augmentation,
    attack, loaders; the state at step 0."""
    training = spec.training
    seed = training.seed + info.rank
    train_path, val_path = dataset_paths(spec.data, info)
    classes = read_classes(train_path)
    num_classes = spec.data.num_classes or len(classes)
    kwargs = model_kwargs(spec.model, num_classes, spec.resolution.max_res)
    torch.backends.cudnn.benchmark = bool(training.cudnn_benchmark)
    module, compiled = build_model(spec.model, kwargs, info.device, distributed=info.distributed)
    model = DistributedDataParallel(compiled, device_ids=[info.local_rank] if info.device.type == "cuda" else None) \
        if info.distributed else compiled
    # after DDP, which gives every rank rank 0's initial weights: so the EMA starts from them on every rank too
    ema = ModelEmaV3(module, decay=spec.ema.decay, device="cpu" if spec.ema.cpu else None) if spec.ema.enabled \
        else None
    optimizer = build_optimizer(module, training.optimizer, lr=0.0, weight_decay=training.weight_decay,
                                betas=(training.beta1, training.beta2), momentum=training.momentum,
                                nesterov=bool(training.nesterov), fused=bool(training.fused))
    scaler = torch.amp.GradScaler(info.device.type) if training.precision == "fp16" else None
    augmentation = build_augmentation(spec.augment, spec.aaa, num_classes=num_classes,
                                      label_smoothing=training.label_smoothing, seed=seed, run_seed=training.seed,
                                      world_size=info.world_size)
    # through the compiled module (with model.compile 1), so the attack's forward/backward passes are compiled too
    attack = build_attack(spec.adv, compiled, seed, grad_accum=training.grad_accum)
    loaders = build_loaders(spec, train_path, val_path, info)
    state = TrainState(module, optimizer, attack, ema=ema, scaler=scaler, augmentation=augmentation,
                       arch=spec.model.arch, model_kwargs=kwargs, config=spec.to_dict(),
                       rank=info.rank, world_size=info.world_size,
                       local_bn=info.distributed and not spec.model.sync_bn and bool(batchnorm_stats(module)),
                       global_batch=global_batch(spec, info.world_size))
    options = StepOptions(
        lr=partial(spec.lr.lr_at, steps_per_epoch=loaders.steps_per_epoch, epochs=training.epochs),
        steps_per_epoch=loaders.steps_per_epoch, grad_accum=training.grad_accum, precision=training.precision,
        grad_clip=training.grad_clip,
        eps_warmup_epochs=spec.adv.eps_warmup_epochs, log_every=spec.logging.log_every,
        progress=spec.logging.progress if info.is_primary else "0")
    eval_models = [("", module, build_eval_attack(spec.adv, spec.validation, module, seed))]
    if ema is not None:
        eval_models.append(("ema_", ema.module, build_eval_attack(spec.adv, spec.validation, ema.module, seed)))
    return _Run(spec, info, hooks, state, AdversarialTask(model, attack, augmentation.criterion, spec.adv.mixed_loss),
                loaders, options, eval_models, classes)


def global_batch(spec: TrainSpec, world_size: int) -> int:
    """Images per optimizer step over all processes: per-process batch × gradient accumulation × world size."""
    return spec.training.batch_size * spec.training.grad_accum * world_size


def _resume(run: _Run, path: Path, checkpoint: dict[str, Any]) -> None:
    """Continue from ``checkpoint`` (read and checked against the configuration and the data's classes by
    :func:`preflight`).

    Raises:
        ConfigError: the checkpoint's policy does not fit this run's.
    """
    state = run.state
    try:
        state.load_state_dict(checkpoint)
    except ValueError as err:
        raise ConfigError(f"cannot resume {path}: {err}") from err
    _logger.info("resumed %s: epoch %d, step %d%s", path, state.epoch, state.step,
                 f", skipping {state.batches_done} finished batches" if state.batches_done else "")


def _checkpoint(run: _Run, names: list[str]) -> None:
    """Every rank: the state's checkpoint (a collective); rank 0 writes it under ``names`` and as last.pt, and a
    failed write stops every rank (``save_on_primary``)."""
    path = save_on_primary({**run.state.state_dict(), "classes": run.classes}, run.checkpoint_dir, names,
                           primary=run.info.is_primary, keep=run.spec.logging.keep_checkpoints)
    if path is not None:
        _logger.info("checkpoint written: %s", path)


def _validate(run: _Run) -> dict[str, Any]:
    """Clean accuracy on the val set and robust accuracy on its fixed subset, of the model and of its EMA."""
    metrics: dict[str, Any] = {}
    device, precision = run.info.device, run.spec.training.precision
    for prefix, net, attack in run.eval_models:
        metrics.update({f"{prefix}{k}": v for k, v in evaluate(net, run.loaders.val, device, precision).items()})
        if attack is not None and run.loaders.robust is not None:
            metrics.update({f"{prefix}{k}": v for k, v in robust_accuracy(attack, run.loaders.robust, device,
                                                                           precision).items()})
    return metrics


def _train(run: _Run) -> dict[str, Any]:
    """The epochs from ``state.epoch`` on; returns the last epoch's metrics (``stopped: sigterm`` on SIGTERM).

    Raises:
        TrainingStopped: a non-finite loss (no update applied, the last checkpoint intact).
    """
    spec, state = run.spec, run.state
    epochs, every = spec.training.epochs, spec.validation.every
    for epoch in range(state.epoch, epochs):
        res = spec.resolution.resolution_at(epoch)
        run.loaders.train.set_resolution(res)
        run.loaders.train.set_epoch(epoch)
        result = train_one_epoch(run.task, run.loaders.train, state, run.options, hooks=run.hooks, resolution=res)
        if result.stop_reason == "nonfinite":
            last = run.checkpoint_dir / "last.pt"
            intact = f"the last good checkpoint {last} is intact" if last.is_file() else "no checkpoint was written"
            raise TrainingStopped(f"non-finite loss at epoch {epoch}, step {result.step}: stopped without applying "
                                  f"that update; {intact} (lower lr.lr, enable training.grad_clip, or use "
                                  "training.precision bf16/fp32)")
        if result.stop_reason == "sigterm":  # a signal or a failed metrics write, on some rank
            _checkpoint(run, [])
            _stop_if_metrics_lost(run, broadcast_object(run.hooks.write_error),
                                  f"epoch {epoch}, batch {result.batches}")
            _logger.warning("%s: checkpoint saved at epoch %d, batch %d (optimizer step %d%s); resume with "
                            "--training.resume auto", run.hooks.signal or "stopped", epoch, result.batches,
                            result.step, ", after finishing the step's micro-batches: a resume continues at this "
                            "step boundary" if spec.training.grad_accum > 1 else "")
            return {"stopped": "sigterm", **state.metrics}
        state.epoch, state.batches_done = epoch + 1, 0
        state.average_batchnorm()  # with per-rank BatchNorm statistics: their mean, before validation and checkpoint
        metrics = {"kind": "epoch", "epoch": state.epoch, "step": state.step, "train_loss": result.loss,
                   "img_per_s": result.img_per_s, "resolution": res, "lr": run.options.lr(state.step - 1)}
        metrics.update(state.augmentation.epoch_stats())
        last = state.epoch == epochs
        if last or (every and state.epoch % every == 0):
            metrics.update(_validate(run))
        robust_key = "ema_robust_top1" if state.ema is not None else "robust_top1"
        is_best = robust_key in metrics and metrics[robust_key] > state.best
        if is_best:
            state.best = metrics[robust_key]
        state.metrics = metrics
        run.hooks.write(metrics)
        _logger.info("epoch %d: %s", state.epoch, " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            if k != "kind" and not isinstance(v, dict)))
        lost = broadcast_object(run.hooks.write_error)  # rank 0's metrics write, known to every rank
        if last or state.epoch % spec.training.save_every == 0 or is_best or lost is not None:
            _checkpoint(run, [f"epoch_{state.epoch:04d}.pt"] + (["best.pt"] if is_best else []))
        _stop_if_metrics_lost(run, lost, f"the end of epoch {state.epoch}")
    return state.metrics


def _stop_if_metrics_lost(run: _Run, error: str | None, where: str) -> None:
    """After the checkpoint that follows a failed metrics.jsonl write (``error``: rank 0's, broadcast to every rank):
    stop.

    Raises:
        TrainingStopped: on every rank; the checkpoint holds the epoch record, which a resume writes back.
    """
    if error is not None:
        raise TrainingStopped(f"{error}: stopped at {where}; {run.checkpoint_dir / 'last.pt'} holds the run so far "
                              "(a resume writes its epoch record back): free disk space and resume with "
                              "--training.resume auto")


def _set_aside_unsaved_attempt(run_dir: Path) -> None:
    """A fresh start (``--training.resume auto`` without a checkpoint) in a folder whose earlier attempt died before
    its first checkpoint: move that attempt's metrics.jsonl aside instead of appending a second run to it."""
    path = run_dir / "metrics.jsonl"
    if path.is_file() and path.stat().st_size:
        aside = path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        os.replace(path, aside)
        _logger.warning("%s held the records of an earlier attempt that saved no checkpoint: moved to %s", path, aside)


def _restore_epoch_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append a resumed checkpoint's epoch record to metrics.jsonl when a failed write (a full disk) lost it."""
    path = run_dir / "metrics.jsonl"
    if record.get("kind") != "epoch":
        return
    try:
        epochs = [r.get("epoch") for r in read_metrics(path) if r.get("kind") == "epoch"] if path.exists() else []
    except MetricsError:
        return  # a damaged file is plot_run's to report; never rewritten here
    if record.get("epoch") not in epochs:
        MetricsWriter(path).write(record)
        _logger.warning("metrics.jsonl lacked the record of epoch %s (a failed write): appended it from the "
                        "checkpoint", record.get("epoch"))


def run(spec: TrainSpec) -> dict[str, Any]:
    """Train as configured; returns the final metrics (rank 0's view). Rank 0 holds the run folder's lock throughout
    (taken before the checks, so that two runs started on one folder at once cannot both pass them)."""
    run_dir = Path(spec.logging.folder)
    lock = claim_run_folder(run_dir) if env_rank() == 0 else None
    try:
        return _run_locked(spec, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(spec: TrainSpec, run_dir: Path) -> dict[str, Any]:
    resumed = preflight(spec)
    info = init_distributed(spec.training.device, spec.dist.backend)
    if info.is_primary:
        remove_failed_writes(run_dir / "checkpoints")
        if resumed is None:
            _set_aside_unsaved_attempt(run_dir)
    barrier()
    setup_logging(info.rank, run_dir / "train.log")
    _seed_everything(spec.training.seed + info.rank)
    hooks = _RunHooks(MetricsWriter(run_dir / "metrics.jsonl", enabled=info.is_primary))
    trainer = _build(spec, info, hooks)
    if resumed is not None:
        _resume(trainer, *resumed)
        if info.is_primary:
            _restore_epoch_record(run_dir, resumed[1].get("metrics") or {})
    if spec.logging.tensorboard and info.is_primary:
        hooks.writer.open_tensorboard(run_dir / "tensorboard",
                                      resumed_at=trainer.state.step if resumed is not None else None)
    if info.is_primary:
        dump_config(spec.to_dict(), run_dir / "params.json",
                    record={"world_size": info.world_size, "global_batch": trainer.state.global_batch})
        training = spec.training
        _logger.info("training %s (%d classes) on %s x%d, global batch %d (%d per process x %d accumulated x %d "
                     "processes), %d optimizer steps/epoch", spec.model.arch,
                     trainer.state.model_kwargs["num_classes"], info.device, info.world_size,
                     trainer.state.global_batch, training.batch_size, training.grad_accum, info.world_size,
                     trainer.loaders.steps_per_epoch)
    try:
        return _train(trainer)
    finally:
        hooks.writer.close()


@logging_scope()
def main(argv: list[str] | None = None) -> int:
    """Train; returns 0 when done (or already done), 1 when the run failed, 2 on bad input (one line on stderr).

    ``--validate-only`` (``run_train.sh`` runs it before torchrun) runs only the up-front checks of ``preflight``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    validate_only = "--validate-only" in argv
    if validate_only:
        argv.remove("--validate-only")
    setup_logging(env_rank())  # the checks' warnings (run() adds train.log)
    try:
        spec = TrainSpec.from_config(make_train_config(argv, prog="python -m rat.train"))
        if validate_only:
            with claim_run_folder(Path(spec.logging.folder)):
                preflight(spec)
            return 0
        metrics = run(spec)
    except RunFinished as done:
        print(f"rat.train: {done}", file=sys.stderr)
        return 0
    except (ConfigError, FileNotFoundError, CheckpointError, OutputError) as err:
        print(f"rat.train: error: {err}", file=sys.stderr)
        return 2
    except (TrainingStopped, CheckpointWriteError) as err:
        print(f"rat.train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started (from then on it saves a checkpoint and stops)
        print("rat.train: interrupted before training started: nothing was saved; run the same command again",
              file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        cleanup_distributed()
    if "top1" in metrics:
        summary = f"clean top-1 {metrics['top1']:.2f}%"
        if "robust_top1" in metrics:
            summary += f", robust top-1 {metrics['robust_top1']:.2f}% (APGD, first training threat model)"
        _logger.info("done: %s; checkpoints in %s", summary, Path(spec.logging.folder) / "checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
