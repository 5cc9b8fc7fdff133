"""Data-free robustness estimation: a label-conditioned generator trained from the model alone, then adjusted until
the full-precision model's clean and robust accuracy on its images track the real ones.

1. **Train.** ``G(z, label) -> image`` in [0, 1]. The label enters as a (soft) class vector times an embedding
   initialised from the model's classifier weights. Loss: cross-entropy of ``model(G(z, t))`` against the requested
   target ``t`` plus ``stat_weight`` times a feature-statistics term (below). A fraction ``mix`` of each batch are
   inter-class samples: ``t = (1 - lam) e_a + lam e_b`` with ``lam ~ U(0, 0.5)`` and soft-target cross-entropy, which
   fills the space between class clusters (Qimera, NeurIPS 2021).
2. **Adjust.** Training continues with a third term, ``beta`` times the cross-entropy on adversarially perturbed
   generated images (APGD on the model, perturbation detached, gradient into ``G`` through the image): it moves the
   generated images away from the decision boundary, raising the model's robust accuracy on them. Every round, the
   model's clean and robust accuracy on a fixed probe set are compared with the real numbers (``target_clean``,
   ``target_robust``: measured on the guide part of the real data, which ``python -m rat.quant estimate`` never scores
   on; nothing else about the real data): ``beta`` rises while the robust accuracy
   is too low, and the share of inter-class samples (labelled with their dominant class) rises while the clean
   accuracy is too high. The best round (smallest worse error) is kept.
3. **Estimate.** The generated set (images + labels) stands in for the test set: clean and robust accuracy of the
   full-precision model and of its quantized variants (calibrated on the generated images too, so no real data is
   needed at all) are measured on it.

Feature statistics: for a model with BatchNorm layers, the mean and variance of each BN layer's input over a
generated batch are pulled towards the layer's running statistics (DeepInversion / ZeroQ). A model without BatchNorm
(the LayerNorm CvSt family) has no stored statistics; there the same term uses per-channel input statistics of
every normalization layer recorded once from images the user has (``record_norm_stats``; a few hundred unlabeled
images suffice), and without such images generation refuses (:class:`GeneratorError`) rather than silently dropping
the term.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rat.logging import progress as report_progress
from rat.quant.sweep import AttackSpec, accuracy, robust_accuracy

__all__ = [
    "AdjustResult", "GeneratorError", "LabelGenerator", "NormStatLoss", "adjust_generator", "bn_targets",
    "label_accuracy", "record_norm_stats", "sample", "solve_mix", "stat_targets", "train_generator",
]

_logger = logging.getLogger(__name__)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GeneratorError(ValueError):
    """The generator cannot be built for this model as asked; the message says why and what to do."""


def _channel_dim(module: nn.Module) -> int:
    """Channel axis of a normalization layer's input: 1 for BatchNorm / LayerNorm2d / GroupNorm, last for LayerNorm."""
    from timm.layers import LayerNorm2d

    return 1 if isinstance(module, (*_BATCHNORMS, LayerNorm2d, nn.GroupNorm)) else -1


def _batch_stats(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.movedim(dim, -1).reshape(-1, x.shape[dim])
    return x.mean(0), x.var(0, unbiased=False)


def bn_targets(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Running mean and variance of every BatchNorm layer (empty for a model without BatchNorm)."""
    return {name: (m.running_mean.detach().clone(), m.running_var.detach().clone())
            for name, m in model.named_modules() if isinstance(m, _BATCHNORMS) and m.running_mean is not None}


def _norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (*_BATCHNORMS, nn.LayerNorm, nn.GroupNorm))}


@torch.no_grad()
def record_norm_stats(model: nn.Module, images: Iterable[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and variance of every normalization layer's input over real (unlabeled) images.

    The replacement of BN running statistics for models without BatchNorm: recorded once, stored with the generator.
    """
    layers = _norm_layers(model)
    sums: dict[str, list[Any]] = {}

    def hook(name: str, dim: int):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].movedim(dim, -1).reshape(-1, args[0].shape[dim]).double()
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += x.shape[0]
            acc[1] = acc[1] + x.sum(0)
            acc[2] = acc[2] + (x * x).sum(0)
        return record

    handles = [m.register_forward_pre_hook(hook(n, _channel_dim(m))) for n, m in layers.items()]
    model.eval()
    try:
        for x in images:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        stats[name] = (mean.float(), (squares / count - mean * mean).clamp(min=0).float())
    return stats


def stat_targets(model: nn.Module, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The feature statistics the generator matches: BN running statistics, else recorded ``stats``.

    Raises:
        GeneratorError: no BatchNorm and no recorded statistics.
    """
    targets = bn_targets(model)
    if targets:
        return targets
    if stats:
        return dict(stats)
    raise GeneratorError(f"{type(getattr(model, 'model', model)).__name__} has no BatchNorm running statistics to "
                         "match: give a few hundred of your own images (generate.stats_data) to record per-layer "
                         "activation statistics once")


class NormStatLoss:
    """Forward pre-hooks that sum ``||mean - mu||_2 + ||var - sigma^2||_2`` over the target layers' inputs."""

    def __init__(self, model: nn.Module, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
        modules = dict(model.named_modules())
        self.terms: list[torch.Tensor] = []
        self.handles = []
        for name, (mean, var) in targets.items():
            if name not in modules:
                raise GeneratorError(f"recorded statistics name layer {name!r}, which the model does not have: "
                                     "record them with this model")
            module = modules[name]
            self.handles.append(module.register_forward_pre_hook(self._hook(mean, var, _channel_dim(module))))

    def _hook(self, mean: torch.Tensor, var: torch.Tensor, dim: int):
        def match(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            m, v = _batch_stats(args[0], dim)
            self.terms.append(torch.linalg.vector_norm(m - mean.to(m)) + torch.linalg.vector_norm(v - var.to(v)))
        return match

    def pop(self) -> torch.Tensor:
        """Mean of the terms collected since the last call (one per layer)."""
        total = torch.stack(self.terms).mean() if self.terms else torch.zeros(())
        self.terms = []
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class LabelGenerator(nn.Module):
    """``G(z, t)``: noise ``z`` and a class vector ``t`` (one-hot or mixed) to an image in [0, 1].

    Args:
        num_classes: Classes of the model.
        img_size: Output side (a multiple of 4).
        embed: Initial class embedding, ``(num_classes, dim)`` (the model's classifier weights), or None.
        z_dim: Noise dimensions.
        width: Channels of the first feature map.
    """

    def __init__(self, num_classes: int, img_size: int, embed: torch.Tensor | None = None, z_dim: int = 64,
                 width: int = 128):
        super().__init__()
        if img_size % 4:
            raise GeneratorError(f"generator image size must be a multiple of 4, got {img_size}")
        dim = embed.shape[1] if embed is not None else 64
        self.num_classes, self.img_size, self.z_dim = num_classes, img_size, z_dim
        self.embed = nn.Parameter(embed.detach().clone() / embed.norm(dim=1, keepdim=True).clamp(min=1e-8)
                                  if embed is not None else torch.randn(num_classes, dim))
        self.init = img_size // 4
        self.fc = nn.Linear(z_dim + dim, width * self.init * self.init)
        self.body = nn.Sequential(
            nn.BatchNorm2d(width), nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3,
                                                                                             padding=1),
            nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.2), nn.Conv2d(width // 2, 3, 3, padding=1))
        self.width = width

    def forward(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, target @ self.embed], dim=1)).view(-1, self.width, self.init, self.init)
        return torch.sigmoid(self.body(h))


def _targets(labels: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor, num_classes: int) -> torch.Tensor:
    return ((1 - lam)[:, None] * F.one_hot(labels, num_classes).float()
            + lam[:, None] * F.one_hot(partners, num_classes).float())


def _draw(n: int, num_classes: int, mix: float, gen: torch.Generator, device: torch.device):
    """Labels (balanced), partner classes, mixing weights (0 for pure samples, U(0, 0.5) for a ``mix`` share)."""
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    partners = (labels + torch.randint(1, num_classes, (n,), generator=gen)) % num_classes
    lam = torch.rand(n, generator=gen) * 0.5 * (torch.rand(n, generator=gen) < mix).float()
    return labels.to(device), partners.to(device), lam.to(device)


def sample(generator: LabelGenerator, n: int, mix: float, seed: int, device: torch.device,
           batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated images and their labels (the dominant class of inter-class samples); same seed, same set."""
    gen = torch.Generator().manual_seed(seed)
    labels, partners, lam = _draw(n, generator.num_classes, mix, gen, device)
    z = torch.randn(n, generator.z_dim, generator=gen).to(device)
    generator.eval()
    images = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            images.append(generator(z[sl], _targets(labels[sl], partners[sl], lam[sl], generator.num_classes)))
    return torch.cat(images), labels


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()


def _generator_step(model, generator, optimizer, stat_loss, *, batch_size, mix, stat_weight, beta, attack, gen,
                    device) -> dict[str, float]:
    labels, partners, lam = _draw(batch_size, generator.num_classes, mix, gen, device)
    target = _targets(labels, partners, lam, generator.num_classes)
    z = torch.randn(batch_size, generator.z_dim, generator=gen).to(device)
    generator.train()
    x = generator(z, target)
    ce = _soft_ce(model(x), target)
    stat = stat_loss.pop()
    loss = ce + stat_weight * stat
    adv = torch.zeros(())
    if beta > 0 and attack is not None:
        delta = (attack.perturb(x.detach(), labels) - x.detach()).detach()
        stat_loss.pop()
        adv = _soft_ce(model((x + delta).clamp(0, 1)), target)
        stat_loss.pop()
        loss = loss + beta * adv
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"ce": ce.item(), "stat": stat.item(), "adv": adv.item()}


def _classifier_weight(model: nn.Module) -> torch.Tensor | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head.weight.detach() if isinstance(head, nn.Linear) else None


def train_generator(model: nn.Module, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, num_classes: int,
                    img_size: int, steps: int, batch_size: int = 64, lr: float = 1e-3, mix: float = 0.2,
                    stat_weight: float = 1.0, width: int = 128, seed: int = 0,
                    progress: str | bool = "auto") -> LabelGenerator:
    """Stage 1: a generator whose images the model classifies as their labels, with matched feature statistics.

    Adam (betas 0.5, 0.999, the seed's) with a cosine decay of ``lr`` to 0 over ``steps``: the decay lets the
    generator's own BatchNorm statistics settle, so that images sampled in eval mode are classified like the
    training-mode ones.
    """
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    generator = LabelGenerator(num_classes, img_size, _classifier_weight(model), width=width).to(device)
    model.eval()
    model.requires_grad_(False)
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    stat_loss = NormStatLoss(model, targets)
    gen = torch.Generator().manual_seed(seed + 1)
    try:
        bar = report_progress(range(steps), desc="generator", setting=progress)
        for step in bar:
            logs = _generator_step(model, generator, optimizer, stat_loss, batch_size=batch_size, mix=mix,
                                   stat_weight=stat_weight, beta=0.0, attack=None, gen=gen, device=device)
            schedule.step()
            if step % 20 == 0:
                bar.set_postfix(ce=f"{logs['ce']:.3f}", stat=f"{logs['stat']:.3f}")
    finally:
        stat_loss.remove()
    return generator


def label_accuracy(model: nn.Module, generator: LabelGenerator, n: int = 500, seed: int = 123,
                   batch_size: int = 256) -> float:
    """% of pure-label generated images that the model classifies as their label."""
    x, y = sample(generator, n, 0.0, seed, next(model.parameters()).device)
    return accuracy(model, x, y, batch_size)


@dataclasses.dataclass
class AdjustResult:
    """The adjusted generator, the share of inter-class samples to draw, and the trace of the rounds."""

    generator: LabelGenerator
    mix: float
    beta: float
    clean: float
    robust: float
    history: list[dict[str, float]]


def _probe(model: nn.Module, generator: LabelGenerator, n: int, mix: float, seed: int, spec: AttackSpec,
           device: torch.device) -> tuple[float, float]:
    x, y = sample(generator, n, mix, seed, device)
    return accuracy(model, x, y, 256), robust_accuracy(model, x, y, spec, 256)


def solve_mix(pure: tuple[float, float], mixed: tuple[float, float], target_robust: float) -> float:
    """The share of inter-class samples whose set has ``target_robust`` robust accuracy, clipped to [0, 1].

    A set that draws each sample as inter-class with probability ``s`` has, in expectation, the accuracies
    ``(1 - s) * pure + s * mixed``; ``pure`` and ``mixed`` are the (clean, robust) accuracies of all-pure and
    all-inter-class sets.
    """
    gap = pure[1] - mixed[1]
    if gap <= 0:
        return 0.0 if pure[1] >= target_robust else 1.0
    return min(max((pure[1] - target_robust) / gap, 0.0), 1.0)


def adjust_generator(model: nn.Module, generator: LabelGenerator,
                     targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, target_clean: float,
                     target_robust: float, spec: AttackSpec, rounds: int, steps_per_round: int, batch_size: int = 64,
                     lr: float = 5e-4, mix: float = 0.2, stat_weight: float = 1.0, train_n_iter: int = 5,
                     probe_n: int = 500, tolerance: float = 1.0, seed: int = 0,
                     progress: str | bool = "auto") -> AdjustResult:
    """Stage 2: train on adversarially perturbed samples and re-balance inter-class samples until the model's clean
    and robust accuracy on a fixed probe set are within ``tolerance`` points of the targets (or ``rounds`` run out).

    Every round measures the model on a fixed all-pure and a fixed all-inter-class probe set (``probe_n`` each) and
    sets the share of inter-class samples in closed form (:func:`solve_mix`) so that the expected robust accuracy of
    the mixed set equals ``target_robust``; inter-class samples lower it, pure ones raise it. When even the pure
    samples are less robust than the target (no share can reach it), ``beta`` — the weight of the
    adversarially-perturbed term — rises, which makes the generated images more robust. ``mix`` is the share the
    first training round uses before the first solve.
    """
    from rat.attacks import create_attack

    device = next(model.parameters()).device
    model.eval()
    model.requires_grad_(False)
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    train_attack = create_attack("apgd", model, norm=spec.norm, eps=spec.eps, n_iter=train_n_iter, seed=seed)
    gen = torch.Generator().manual_seed(seed + 2)
    beta = 0.0
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, Any], float, float, float, float] | None = None
    for round_index in report_progress(range(rounds + 1), desc="adjust", setting=progress, every=1):
        pure = _probe(model, generator, probe_n, 0.0, seed + 7, spec, device)
        mixed = _probe(model, generator, probe_n, 1.0, seed + 8, spec, device)
        mix = solve_mix(pure, mixed, target_robust)
        clean = (1 - mix) * pure[0] + mix * mixed[0]
        robust = (1 - mix) * pure[1] + mix * mixed[1]
        err = max(abs(clean - target_clean), abs(robust - target_robust))
        history.append({"round": round_index, "mix": mix, "beta": beta, "clean": clean, "robust": robust,
                        "pure_clean": pure[0], "pure_robust": pure[1], "mixed_clean": mixed[0],
                        "mixed_robust": mixed[1]})
        _logger.info("adjust round %d: mix %.3f beta %.3f -> clean %.2f%% (target %.2f), robust %.2f%% (target %.2f)",
                     round_index, mix, beta, clean, target_clean, robust, target_robust)
        if best is None or err < best[0]:
            best = (err, copy.deepcopy(generator.state_dict()), mix, beta, clean, robust)
        if err <= tolerance or round_index == rounds:
            break
        # the pure samples must be more robust than the target for a share to reach it: raise beta while they are not
        beta = min(max(beta + 4.0 * (target_robust + 5.0 - pure[1]) / 100.0, 0.0), 10.0)
        stat_loss = NormStatLoss(model, targets)
        try:
            for _ in range(steps_per_round):
                _generator_step(model, generator, optimizer, stat_loss, batch_size=batch_size, mix=mix,
                                stat_weight=stat_weight, beta=beta, attack=train_attack, gen=gen, device=device)
        finally:
            stat_loss.remove()
    assert best is not None
    generator.load_state_dict(best[1])
    return AdjustResult(generator, best[2], best[3], best[4], best[5], history)
