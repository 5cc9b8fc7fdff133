"""GPU figures that the CPU machine cannot give: AT step throughput and MFU, attack overhead, fast-AA images/s.

Prints one JSON object per measurement (and writes them all to ``--out`` as JSON lines). Everything runs on synthetic
inputs already on the device (uniform [0, 1] pixels, channels_last), so the figures are the model + attack + update
cost without the data loader; the trainer's own engine (``rat.train.engine.train_one_epoch``) runs the steps, with
timm ``Mixup`` (mixup 0.8 / cutmix 1.0, label smoothing 0.1) and ``SoftTargetCrossEntropy`` as in the paper configs.
The batched RandAugment / random erasing of ``rat.data`` is left out (it needs ffcv at import). ``tools/gpu_check.py``
times the same steps side by side with a plain PyTorch loop, with ``torch.compile`` off and on, and the loader.

Measurements (``--model`` at ``--res`` px, batch ``--batch-size``, ``--precision`` autocast, channels_last):

* ``train_clean``: the training step without attack (forward + backward + AdamW);
* ``train_apgd``: the APGD-``--n-iter`` Linf ε = 4/255 adversarial-training step (rat's training APGD);
* ``attack_only``: ``attack.perturb`` alone on the same batch; ``fwd_bwd``: one forward + input-gradient backward;
* ``fast_aa``: AutoAttack (pyautoattack) ``apgd-ce`` + ``apgd-t`` (the ``fast`` version of ``rat.eval``) on
  ``--aa-n`` images whose labels are the model's own clean predictions (so every image is attacked); with random
  weights APGD-CE breaks most points, so ``fast_aa_worst`` also times APGD-T on all points (the cost per image of a
  robust model, where nothing breaks).

MFU counts the model's matmul/conv FLOPs (torch ``FlopCounterMode``, F per image forward): an update step is 3F, each
attack step a forward + input-gradient backward 2F (no weight gradients), APGD's best-iterate scoring forward F;
peak = ``--peak-tflops`` (H200/H100 SXM dense bf16 datasheet: 989.4).

    python tools/bench_gpu.py --model convnext_tiny_cvst --res 224 --batch-size 128 --out bench_gpu.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _timing import OnDeviceBatches, seconds_per_call, seconds_per_train_step, sync
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import rat.models
from rat.attacks import create_attack, per_sample_loss
from rat.augment import Augmentation
from rat.models.flops import count_flops
from rat.precision import autocast
from rat.train.engine import StepOptions, train_one_epoch
from rat.train.optim import build_optimizer
from rat.train.state import TrainState
from rat.train.task import AdversarialTask


def _emit(record: dict, sink: list[dict]) -> None:
    sink.append(record)
    print(json.dumps(record), flush=True)


def _timed_epoch(model, attack, criterion, x, y, optimizer, mixup, args, steps: int) -> float:
    """Seconds per step of ``train_one_epoch`` over ``steps`` steps, after ``args.warmup`` warm-up steps."""
    task = AdversarialTask(model, attack, criterion)
    options = StepOptions(lr=lambda step: 1e-4, precision=args.precision)

    augmentation = Augmentation(mixup=mixup)

    def epoch(n: int) -> None:
        train_one_epoch(task, OnDeviceBatches(x, y, n), TrainState(model, optimizer, attack, augmentation=augmentation),
                        options)

    return seconds_per_train_step(epoch, x.device, steps, args.warmup)


class _AutocastLogits(torch.nn.Module):
    """The model under autocast with fp32 logits: what ``rat.eval --precision bf16`` hands to AutoAttack."""

    def __init__(self, model: torch.nn.Module, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.precision):
            return self.model(x).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny_cvst")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-iter", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--aa-n", type=int, default=256)
    parser.add_argument("--aa-batch-size", type=int, default=256)
    parser.add_argument("--aa-worst-n", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=989.4)
    parser.add_argument("--skip-aa", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run of the script only")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device; pass --device cpu for a smoke run of the script", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    records: list[dict] = []
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    _emit({"what": "env", "torch": torch.__version__, "gpu": gpu,
           "model": args.model, "res": args.res, "batch_size": args.batch_size, "precision": args.precision,
           "channels_last": True}, records)

    model = rat.models.create_model(args.model, normalize=False, num_classes=args.num_classes)
    model = model.to(device).to(memory_format=torch.channels_last)
    flops = count_flops(model, args.res)  # forward FLOPs per image
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.res, args.res, device=device, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device, generator=gen)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=args.num_classes)
    criterion = SoftTargetCrossEntropy()
    optimizer = build_optimizer(model, "adamw", 1e-4, 0.05)

    none = create_attack("none", model)
    apgd = create_attack("apgd", model, norm="Linf", eps=4 / 255, n_iter=args.n_iter)
    t_clean = _timed_epoch(model, none, criterion, x, y, optimizer, mixup, args, args.steps)
    t_adv = _timed_epoch(model, apgd, criterion, x, y, optimizer, mixup, args, args.steps)
    peak = args.peak_tflops * 1e12
    adv_flops = (3 + 2 * args.n_iter + 1) * flops
    _emit({"what": "train_clean", "img_per_s": args.batch_size / t_clean, "step_ms": 1e3 * t_clean,
           "fwd_gflops_per_img": flops / 1e9,
           "mfu": args.batch_size * 3 * flops / t_clean / peak}, records)
    _emit({"what": "train_apgd", "n_iter": args.n_iter, "img_per_s": args.batch_size / t_adv,
           "step_ms": 1e3 * t_adv, "flops_per_img": adv_flops, "mfu": args.batch_size * adv_flops / t_adv / peak,
           "slowdown_vs_clean": t_adv / t_clean}, records)

    model.eval()

    def attack_once():
        with autocast(device, args.precision):
            apgd.perturb(x, y)

    def fwd_bwd():
        xr = x.clone().requires_grad_(True)
        with autocast(device, args.precision):
            loss = per_sample_loss(model(xr).float(), y, "ce").sum()
        torch.autograd.grad(loss, xr)

    t_attack = seconds_per_call(attack_once, device, 10)
    t_fb = seconds_per_call(fwd_bwd, device, 10)
    t_fwd = seconds_per_call(lambda: _no_grad_forward(model, x, device, args.precision), device, 10)
    _emit({"what": "attack_only", "n_iter": args.n_iter, "attack_ms": 1e3 * t_attack, "fwd_bwd_ms": 1e3 * t_fb,
           "forward_ms": 1e3 * t_fwd, "ratio": t_attack / (args.n_iter * t_fb),
           "ratio_vs_algorithm": t_attack / (args.n_iter * t_fb + t_fwd),
           "attack_share_of_at_step": t_attack / t_adv}, records)

    if not args.skip_aa:
        from pyautoattack import AutoAttack
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

        wrapped = _AutocastLogits(model, args.precision).eval()
        xa = torch.rand(args.aa_n, 3, args.res, args.res, device=device, generator=gen)
        # NCHW-contiguous: AutoAttack views gradients as (N, -1); the model's weights stay channels_last
        with torch.no_grad():
            ya = torch.cat([wrapped(chunk).argmax(1) for chunk in xa.split(args.aa_batch_size)])
        adversary = AutoAttack(wrapped, norm="Linf", eps=4 / 255, version="standard", seed=0, device=device)
        adversary.attacks_to_run = ["apgd-ce", "apgd-t"]  # rat.eval's "fast" version
        sync(device)
        start = time.perf_counter()
        x_adv, _ = adversary.run_standard_evaluation(xa, ya, batch_size=args.aa_batch_size)
        sync(device)
        t_aa = time.perf_counter() - start
        with torch.no_grad():
            robust = torch.cat([wrapped(c).argmax(1) for c in x_adv.split(args.aa_batch_size)]).eq(ya).float().mean()
        _emit({"what": "fast_aa", "n": args.aa_n, "seconds": t_aa, "img_per_s": args.aa_n / t_aa,
               "robust_acc_random_weights": robust.item()}, records)
        # Worst case (a robust model: nothing breaks early): APGD-CE and one APGD-T target run all their
        # iterations on every point, and fast AA runs 9 targets, so the cost per image is t_ce + 9 t_t.
        xw, yw = xa[:args.aa_worst_n], ya[:args.aa_worst_n]
        ce = APGDAttack(wrapped, norm="Linf", eps=4 / 255, n_iter=100, n_restarts=1, seed=0, device=device)
        targeted = APGDAttack_targeted(wrapped, norm="Linf", eps=4 / 255, n_iter=100, n_restarts=1, seed=0,
                                       device=device)
        targeted.n_target_classes = 1
        t_ce = seconds_per_call(lambda: ce.perturb(xw, yw), device, 1)
        t_t = seconds_per_call(lambda: targeted.perturb(xw, yw), device, 1)
        _emit({"what": "fast_aa_worst", "n": args.aa_worst_n, "apgd_ce_s_per_img": t_ce / args.aa_worst_n,
               "apgd_t_one_target_s_per_img": t_t / args.aa_worst_n,
               "img_per_s": args.aa_worst_n / (t_ce + 9 * t_t)}, records)
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0


@torch.no_grad()
def _no_grad_forward(model, x, device, precision):
    with autocast(device, precision):
        return model(x)


if __name__ == "__main__":
    sys.exit(main())
