"""Engine functions of the trainer: one training epoch, clean evaluation, robust evaluation.

They take plain typed arguments (no config), log nothing but return metrics, and keep every rank in step: all ranks
leave an epoch at the same step, whether it ends, hits a non-finite loss or receives SIGTERM.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from rat.attacks import Attack, adversarial_loss
from rat.data.policy import AdversarialAugment
from rat.precision import autocast
from rat.train.distributed import all_reduce_sum


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


def train_one_epoch(
    model: nn.Module,
    attack: Attack,
    criterion: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    mixed_loss: float = 0.0,
    device: torch.device,
    epoch: int,
    step: int,
    lr_fn: Callable[[int], float],
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    ema=None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    policy: AdversarialAugment | None = None,
    mixup: Callable | None = None,
    on_step: Callable[[int], None] | None = None,
    grad_clip: float = 0.0,
    num_batches: int | None = None,
    skip_batches: int = 0,
    world_size: int = 1,
    log_every: int = 50,
    stop_requested: Callable[[], bool] = lambda: False,
    on_log: Callable[[dict], None] | None = None,
    progress: bool = False,
    resolution: int | None = None,
) -> EpochResult:
    """Train for one epoch (or ``num_batches`` batches), starting at global step ``step``.

    Each step: per-sample augmentation and mixup on the device, then ``rat.attacks.adversarial_loss`` — the attack
    runs on the unwrapped module (in eval mode, restored after; DDP does not synchronise during it), the loss on the
    adversarial inputs (mixed with the clean loss when ``mixed_loss`` > 0) goes through ``model`` (DDP-wrapped).

    With an adversarial augmentation ``policy`` (instead of ``augment``), each batch becomes the M·K images of the
    step's sampled policies (the attack, when there is one, runs on all of them), and each policy's share of the loss
    is its reward (``policy.observe``, after the finite-loss check, every rank alike).

    ``skip_batches`` batches at the start are read and discarded (resuming a checkpoint written mid-epoch).
    ``on_log(record)`` receives the step metrics every ``log_every`` steps, as they happen.
    ``on_step(step)`` runs before each update (e.g. the ε warm-up). ``ema`` is a timm ``ModelEmaV3``; it is updated
    after every optimizer step. Stops early, on every rank at the same step, when the loss is not finite on some rank
    (``stop_reason='nonfinite'``, without applying that update) or when ``stop_requested()`` is true on some rank
    (``'sigterm'``, after completing the step).
    """
    model.train()
    total = len(loader) if num_batches is None else min(num_batches, len(loader))
    bar = tqdm(total=total, initial=skip_batches, desc=f"epoch {epoch}", disable=not progress, dynamic_ncols=True,
               leave=False)
    loss_sum, images, batches = 0.0, 0, 0
    stop_reason = None
    start = time.perf_counter()
    window_start, window_images = start, 0
    for index, (x, y) in enumerate(loader):
        if index >= total:
            break
        if index < skip_batches:
            continue
        lr = lr_fn(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if on_step is not None:
            on_step(step)
        if policy is not None:
            x, y = policy.expand(x, y)
        elif augment is not None:
            x = augment(x)
        target = y
        if mixup is not None:
            x, target = mixup(x, y)
        with autocast(device, precision):
            result = adversarial_loss(model, attack, criterion, x, target, clean_weight=mixed_loss)
        loss = result.loss
        flags = torch.stack([loss.detach().float(), (~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(stop_requested()), device=loss.device)])
        flags = all_reduce_sum(flags)
        if flags[1] > 0:
            stop_reason = "nonfinite"
            break
        if policy is not None:
            policy.observe(policy.rewards(criterion, result.output, target, result.clean_output, mixed_loss))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        step += 1
        if ema is not None:
            ema.update(model.module if hasattr(model, "module") else model, step=step)
        mean_loss = flags[0].item() / world_size
        loss_sum += mean_loss
        batches += 1
        images += x.shape[0] * world_size
        window_images += x.shape[0] * world_size
        bar.update(1)
        if batches % log_every == 0 or flags[2] > 0:
            now = time.perf_counter()
            rate = window_images / max(now - window_start, 1e-9)
            record = {"epoch": epoch, "step": step, "loss": mean_loss, "lr": lr, "img_per_s": rate,
                      "resolution": resolution}
            if on_log is not None:
                on_log(record)
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", res=resolution)
            window_start, window_images = now, 0
        if flags[2] > 0:
            stop_reason = "sigterm"
            break
    bar.close()
    return EpochResult(loss=loss_sum / max(batches, 1), batches=skip_batches + batches, images=images,
                       seconds=time.perf_counter() - start, step=step, stop_reason=stop_reason)


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
