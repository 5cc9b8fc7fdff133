"""Engine functions of the trainer: one training epoch, clean evaluation, robust evaluation.

They take the task, the state and plain typed options (no config), log nothing but return metrics (step records go to
the caller's hooks), and keep every rank in step: all ranks leave an epoch at the same step, whether it ends, hits a
non-finite loss or is asked to stop.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rat.attacks import eps_warmup_factor
from rat.logging import progress
from rat.precision import autocast
from rat.train.distributed import all_reduce_sum
from rat.train.state import TrainState
from rat.train.task import AdversarialTask


@dataclass
class EpochResult:
    loss: float
    batches: int
    images: int
    seconds: float
    step: int
    stop_reason: str | None = None  # None, 'nonfinite' or 'sigterm'

    @property
    def img_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class StepOptions:
    """How every step of a run is taken.

    Attributes:
        lr: the learning rate of global step ``step`` (0-based), a pure function of the step (see
            ``rat.train.spec.LRSpec.lr_at``), so that a resumed run needs no scheduler state.
        steps_per_epoch: optimizer steps per epoch (at most the loader's length // ``grad_accum``); ``None`` = the
            whole loader.
        grad_accum: micro-batches (loader batches) per optimizer step; a last group of fewer is not trained (as a
            loader of ``grad_accum`` times the batch drops its partial last batch).
        precision: autocast precision, ``fp32``, ``bf16`` or ``fp16`` (``fp16`` with the state's GradScaler).
        grad_clip: clip the gradient norm to this (0 = off).
        eps_warmup_epochs: grow the attack's ε linearly from 0 over this many (fractional) epochs (0 = off).
        log_every: hand a step record to the hooks every this many steps (and at a requested stop).
        progress: the progress setting (``auto``, ``1``, ``0``; :func:`rat.logging.progress`): a tqdm bar, or a
            plain log line every ``log_every`` steps (epoch, step/total, loss, lr, img/s, ETA).
    """

    lr: Callable[[int], float]
    steps_per_epoch: int | None = None
    grad_accum: int = 1
    precision: str = "fp32"
    grad_clip: float = 0.0
    eps_warmup_epochs: float = 0.0
    log_every: int = 50
    progress: str = "0"


class EpochHooks:
    """The caller's side of an epoch: asked after every step whether to stop, handed the step records.

    This base never stops and drops the records; the trainer's subclass stops on SIGTERM and writes metrics.jsonl.
    """

    def stop_requested(self) -> bool:
        """True to stop after the step just taken (on one rank is enough: every rank stops at the same step)."""
        return False

    def log(self, record: dict[str, Any]) -> None:
        """``{'epoch', 'step', 'loss', 'lr', 'img_per_s', 'resolution'}`` every ``log_every`` steps, as they happen."""


def train_one_epoch(task: AdversarialTask, loader: Iterable, state: TrainState, options: StepOptions, *,
                    hooks: EpochHooks | None = None, resolution: int | None = None) -> EpochResult:
    """Train epoch ``state.epoch`` from global step ``state.step``, skipping the ``state.batches_done`` batches a
    checkpoint written mid-epoch had already trained (they are read and discarded).

    Each step: the lr of the step on every param group, the ε warm-up, then on the device
    ``state.augmentation.apply`` (the images and targets to train on: per-sample augmentation and mixup, or the M·K
    images of the adversarial policy's sampled policies, on all of which the attack, if any, runs); then ``task(x,
    target)`` under autocast, ``state.augmentation.observe`` of the logits (after the finite-loss check, every rank
    alike: the policy's rewards), the backward pass (through ``state.scaler`` for fp16), gradient clipping, the
    optimizer step and the EMA update (``state.ema``, a timm ``ModelEmaV3``). An epoch that ends (not stopped) ends
    the augmentation's epoch (``end_epoch``: the policy's epoch-schedule controller update). ``state.step`` and
    ``state.batches_done`` advance with every update.

    Stops early, on every rank at the same step, when the loss is not finite on some rank (``stop_reason='nonfinite'``,
    without applying that update) or when ``hooks.stop_requested()`` is true on some rank (``'sigterm'``, after
    completing the step). ``resolution`` only labels the records.

    Gradient accumulation (``options.grad_accum`` = K > 1): each optimizer step takes K consecutive loader batches
    (micro-batches), each attacked on its own and back-propagated with its loss divided by K, under DDP's
    ``no_sync`` except the last (one gradient all-reduce per step), so that the step equals one of a K times larger
    batch. Everything counted in steps (``state.step``, the lr, the ε warm-up, the EMA, the policy's
    ``observe``/sampling, E-AT's alternation, the records) counts optimizer steps; ``state.batches_done`` counts
    loader batches and only ever stands at a step's end (a stop request waits for the step's last micro-batch).
    """
    hooks = hooks if hooks is not None else EpochHooks()
    model, optimizer, scaler, augmentation = task.model, state.optimizer, state.scaler, state.augmentation
    model.train()
    accum = options.grad_accum
    steps = len(loader) // accum
    total = steps if options.steps_per_epoch is None else min(options.steps_per_epoch, steps)  # optimizer steps
    skip_batches, epoch, world_size = state.batches_done, state.epoch, state.world_size
    bar = progress(total=total, initial=skip_batches // accum, desc=f"epoch {epoch}", setting=options.progress,
                   every=options.log_every, leave=False)
    loss_sum, images, batches = 0.0, 0, 0
    stop_reason = None
    start = time.perf_counter()
    window_start, window_images = start, 0
    micro, step_loss, stop = 0, 0.0, False  # within the optimizer step in progress
    for index, (x, y) in enumerate(loader):
        if index >= total * accum:
            break
        if index < skip_batches:
            continue
        if micro == 0:
            lr = options.lr(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if options.eps_warmup_epochs > 0:
                task.attack.set_eps_scale(eps_warmup_factor((state.step + 1) / total, options.eps_warmup_epochs))
            optimizer.zero_grad(set_to_none=True)
        x, target = augmentation.apply(x, y, new_step=micro == 0)
        micro += 1
        last = micro == accum
        with nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync():
            with autocast(x.device, options.precision):
                result = task(x, target)
            loss = result.loss
            flags = torch.stack([loss.detach().float(), (~torch.isfinite(loss.detach())).float(),
                                 torch.full((), float(hooks.stop_requested()), device=loss.device)])
            # one host synchronisation per loader batch (the non-finite stop): once per step without accumulation
            flags = all_reduce_sum(flags).tolist()
            if flags[1] > 0:
                stop_reason = "nonfinite"
                break
            augmentation.observe(result.output, target, result.clean_output, task.mixed_loss, step_end=last)
            loss = loss / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += flags[0] / world_size / accum
        stop = stop or bool(flags[2] > 0)
        images += x.shape[0] * world_size
        window_images += x.shape[0] * world_size
        if not last:
            continue
        if scaler is not None:
            if options.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if options.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            optimizer.step()
        state.step += 1
        state.batches_done = index + 1
        if state.ema is not None:
            state.ema.update(state.module, step=state.step)
        mean_loss, micro, step_loss = step_loss, 0, 0.0
        loss_sum += mean_loss
        batches += 1
        if batches % options.log_every == 0 or stop:
            now = time.perf_counter()
            rate = window_images / max(now - window_start, 1e-9)
            hooks.log({"epoch": epoch, "step": state.step, "loss": mean_loss, "lr": lr, "img_per_s": rate,
                       "resolution": resolution})
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", res=resolution)
            window_start, window_images = now, 0
        bar.update(1)  # after the postfix: a plain line shows this step's numbers
        if stop:
            stop_reason = "sigterm"
            break
    bar.close()
    if stop_reason is None:
        augmentation.end_epoch()  # the policy's epoch-schedule controller update, on every rank alike
    return EpochResult(loss=loss_sum / max(batches, 1), batches=state.batches_done, images=images,
                       seconds=time.perf_counter() - start, step=state.step, stop_reason=stop_reason)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Clean top-1/top-5 accuracy (in %) summed over all ranks' shards of the val set."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device)  # top1, top5, n
    for x, y in loader:
        with autocast(device, precision):
            logits = model(x)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top5[:, 0] == y).sum()
        counts[1] += (top5 == y[:, None]).any(dim=1).sum()
        counts[2] += y.numel()
    model.train(was_training)
    counts = all_reduce_sum(counts)
    n = max(counts[2].item(), 1)
    return {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n, "n": int(counts[2].item())}


def robust_accuracy(attack, loader: Iterable, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Accuracy (in %) on ``attack.perturb`` outputs over all ranks' shards of a fixed val subset."""
    model = attack.model
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, device=device)
    for x, y in loader:
        with autocast(device, precision):
            x_adv = attack.perturb(x, y)
            with torch.no_grad():
                logits = model(x_adv)
        counts[0] += (logits.argmax(dim=1) == y).sum()
        counts[1] += y.numel()
    model.train(was_training)
    counts = all_reduce_sum(counts)
    return {"robust_top1": 100 * counts[0].item() / max(counts[1].item(), 1), "robust_n": int(counts[1].item())}
