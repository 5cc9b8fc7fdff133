"""Overhead of a rat attack over the model passes it cannot avoid; prints one JSON object.

For a model, batch size and number of steps N it measures (median over ``--repeats`` runs, attack and baseline
interleaved so that machine noise hits both alike):

* ``attack_s``: one ``attack.perturb(x, y)`` call;
* ``passes_s``: N forward passes plus input-gradient backward passes (``torch.autograd.grad(loss, x)``) of the same
  model and batch size, in eval mode, back to back on N different inputs — the attack's unavoidable work
  (``fwd_bwd_s = passes_s / N``);
* ``forward_s``: one forward pass under ``torch.no_grad()``;
* ``ratio = attack_s / passes_s`` — the figure of merit, target ≤ 1.10;
* ``ratio_vs_algorithm = attack_s / (N × fwd_bwd_s + extra_forwards × forward_s)``: APGD and PGD with
  ``use_best`` evaluate the loss of the last iterate to pick the best one (one forward pass, no backward), so this
  ratio isolates the implementation overhead (projections, bookkeeping) from that algorithmic cost;
* ``*_min_s`` and ``ratio_min`` / ``ratio_vs_algorithm_min``: the same from the fastest run of each measurement,
  the usual estimate on a shared machine, where other processes only ever add time.

Example (on a shared CPU machine ``--threads 1 --clock cpu`` keeps other processes out of the figures):
    python tools/bench_attack.py --model convnext_micro_cvst --batch-size 32 --img-size 64 --attack apgd \\
        --norm Linf --n-iter 2 --device cpu --threads 1 --clock cpu
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from _timing import sync

import rat.models
from rat.attacks import APGDAttack, PGDAttack, create_attack, per_sample_loss
from rat.logging import logging_scope, setup_logging

_logger = logging.getLogger("rat.tools.bench_attack")


def _timed(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def _extra_forwards(attack: object) -> int:
    if isinstance(attack, APGDAttack):
        return attack.n_restarts if attack.n_iter > 0 and attack.use_best else 0
    if isinstance(attack, PGDAttack):
        runs = max(1, attack.random_restarts)
        return runs if (attack.use_best or runs > 1) else 0
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnext_micro_cvst", help="any rat/timm model name")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attack", default="apgd", choices=["apgd", "pgd", "fgsm"])
    parser.add_argument("--norm", default="Linf", choices=["Linf", "L2", "L1"])
    parser.add_argument("--eps", type=float, default=None, help="default: the ImageNet default of the norm")
    parser.add_argument("--n-iter", type=int, default=None, help="default: the attack's (apgd 2, pgd 10, fgsm 1)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", type=int, default=1, choices=[0, 1])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: time.perf_counter; cpu: process CPU time (on a shared CPU machine with --threads 1 "
                             "this ignores the time other processes hold the core)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each measurement first")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each measurement")
    parser.add_argument("--use-best", type=int, default=1, choices=[0, 1],
                        help="apgd / pgd: 1 returns the best-loss iterate (one extra forward pass), 0 the last one")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@logging_scope()
def main(argv: Sequence[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = rat.models.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size).to(device)
    model.eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    x = x.to(device).contiguous(memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
    options = {"use_best": bool(args.use_best)} if args.attack in ("apgd", "pgd") else {}
    attack = create_attack(args.attack, model, norm=args.norm, eps=args.eps, n_iter=args.n_iter, seed=args.seed,
                           **options)
    n_iter = attack.n_iter
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def autocast() -> torch.autocast:
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)

    def run_attack() -> None:
        with autocast():
            attack.perturb(x, y)

    # The baseline runs its N passes back to back on N different inputs, like the attack's N iterates (repeating one
    # input would keep it artificially cache-hot).
    inputs = [(x + 1e-3 * k).clamp(0.0, 1.0).contiguous(memory_format=memory_format) for k in range(n_iter + 1)]

    def run_passes() -> None:
        with autocast():
            for x_k in inputs[:n_iter]:
                x_in = x_k.detach().requires_grad_(True)
                loss = per_sample_loss(model(x_in), y, "ce").sum()
                torch.autograd.grad(loss, [x_in])

    def run_forward() -> None:
        with autocast(), torch.no_grad():
            per_sample_loss(model(inputs[n_iter]), y, "ce")

    for _ in range(args.warmup):
        run_attack()
        run_passes()
        run_forward()
    attack_times, passes_times, forward_times = [], [], []
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for _ in range(args.repeats):
        attack_times.append(_timed(run_attack, device, clock))
        passes_times.append(_timed(run_passes, device, clock))
        forward_times.append(_timed(run_forward, device, clock))
    attack_s = statistics.median(attack_times)
    passes_s = statistics.median(passes_times)
    forward_s = statistics.median(forward_times)
    extra = _extra_forwards(attack)
    result = {
        "model": args.model,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "attack": repr(attack),
        "n_iter": n_iter,
        "device": str(device),
        "precision": args.precision,
        "channels_last": bool(args.channels_last),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "repeats": args.repeats,
        "attack_s": round(attack_s, 6),
        "passes_s": round(passes_s, 6),
        "fwd_bwd_s": round(passes_s / n_iter, 6),
        "forward_s": round(forward_s, 6),
        "extra_forwards": extra,
        "ratio": round(attack_s / passes_s, 4),
        "ratio_vs_algorithm": round(attack_s / (passes_s + extra * forward_s), 4),
        "attack_min_s": round(min(attack_times), 6),
        "passes_min_s": round(min(passes_times), 6),
        "forward_min_s": round(min(forward_times), 6),
        "ratio_min": round(min(attack_times) / min(passes_times), 4),
        "ratio_vs_algorithm_min": round(min(attack_times) / (min(passes_times) + extra * min(forward_times)), 4),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
