"""Cost of Adversarial AutoAugment against RandAugment: augmentation alone, and the whole training step.

Prints one JSON object:

* ``augment``: images/s of the augmentation alone on ``--device`` — RandAugment ``rand-m9-mstd0.5-inc1`` on the
  batch, and the adversarial policy (controller sampling + M policies applied per image, M·K images out);
* ``controller_ms``: one controller update (REINFORCE on M policies) on the CPU;
* ``step``: seconds per training step (augmentation, forward, backward, optimizer step; ``--attack apgd`` adds the
  attack on the augmented images) for RandAugment on B images, the adversarial policy at the same images per step
  (K = B / M, the cost control), and as in the paper (K = B, M·B images per step); ``overhead_same_images`` and
  ``cost_paper`` are their ratios to RandAugment.

Example::

    python tools/bench_aaa.py --model convnext_micro_cvst --batch-size 64 --img-size 64 --num-policies 8
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from _timing import seconds_per_call
from torch import nn

from rat.attacks import adversarial_loss, create_attack
from rat.augment import AdversarialAugment, PolicySpace, build_augment
from rat.models import create_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnext_micro_cvst")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--num-policies", type=int, default=8)
    parser.add_argument("--attack", choices=["none", "apgd"], default="none")
    parser.add_argument("--n-iter", type=int, default=2, help="attack steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.batch_size % args.num_policies:
        print(f"bench_aaa: error: --batch-size {args.batch_size} must be a multiple of --num-policies "
              f"{args.num_policies} (the same-images comparison uses K = B / M)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    b, m = args.batch_size, args.num_policies
    x = torch.rand(b, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (b,), device=device)
    rand_augment = build_augment("rand-m9-mstd0.5-inc1", re_prob=0.0)
    generator = torch.Generator().manual_seed(0)

    def policy(fraction: float) -> AdversarialAugment:
        return AdversarialAugment(PolicySpace(), num_policies=m, batch_fraction=fraction, seed=0,
                                  augment_generator=torch.Generator().manual_seed(0))

    paper, same = policy(1.0), policy(1.0 / m)
    result: dict = {"settings": {**vars(args), "torch": torch.__version__, "python": platform.python_version(),
                                 "cpu_threads": torch.get_num_threads(),
                                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}
    t_ra = seconds_per_call(lambda: rand_augment(x, generator), device, args.repeats)
    t_paper = seconds_per_call(lambda: paper.expand(x, y), device, args.repeats)
    result["augment"] = {"randaugment_img_s": b / t_ra, "adversarial_img_s": m * b / t_paper,
                         "adversarial_ms_per_step": 1000 * t_paper, "randaugment_ms_per_step": 1000 * t_ra}

    stepwise = AdversarialAugment(PolicySpace(), num_policies=m, schedule="step", seed=0)

    def update() -> None:  # one sample and one REINFORCE update (every step under aaa.schedule step, once per epoch)
        stepwise.tokens = stepwise.sample()
        stepwise.record(torch.rand(m, dtype=torch.float64))

    result["controller_ms"] = 1000 * seconds_per_call(update, torch.device("cpu"), args.repeats)

    model = create_model(args.model, num_classes=10).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    attack = create_attack(args.attack, model, norm="Linf", eps=4 / 255, n_iter=args.n_iter, seed=0)
    criterion = nn.CrossEntropyLoss()
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]

    def step(augment_policy: AdversarialAugment | None) -> None:
        if augment_policy is None:
            xs, ys = rand_augment(x, generator), y
        else:
            xs, ys = augment_policy.expand(x, y)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = adversarial_loss(model, attack, criterion, xs, ys)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if augment_policy is not None:
            augment_policy.record(augment_policy.rewards(criterion, out.output, ys))

    model.train()
    t_step_ra = seconds_per_call(lambda: step(None), device, args.repeats)
    t_step_same = seconds_per_call(lambda: step(same), device, args.repeats)
    t_step_paper = seconds_per_call(lambda: step(paper), device, max(1, args.repeats // 2))
    result["step"] = {"randaugment_s": t_step_ra, "adversarial_same_images_s": t_step_same,
                      "adversarial_paper_s": t_step_paper, "overhead_same_images": t_step_same / t_step_ra,
                      "cost_paper": t_step_paper / t_step_ra}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
