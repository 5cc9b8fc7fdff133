"""The rat.quant evidence run, through the documented CLI: train small models on the demo data, then
``python -m rat.quant sweep`` each one and ``python -m rat.quant fit`` them all.

    python tools/bench_quant.py --out runs/quant_bench                  # train + sweep + fit (CPU: ~10-15 min)
    python tools/bench_quant.py --out runs/quant_bench --report         # fit the sweeps already in --out

Steps (each CLI command is printed before it runs, so every number can be reproduced by hand):

1. Train each model (default ``BN_MODELS``, three BatchNorm timm CNNs at small widths) with a plain loop (rat.quant
   has no trainer; the images are the demo train beton read the way ``python -m rat.quant`` reads images, rat.eval's
   preprocessing at 32 px): AdamW one-cycle, FGSM-RS Linf 4/255 adversarial training with a mixed clean/adversarial
   loss and an eps warm-up (as configs/demo.yaml). The checkpoints are rat trainer checkpoints (``model``, ``arch``,
   ``model_kwargs``), which ``python -m rat.quant`` and ``rat.eval`` read.
2. ``python -m rat.quant sweep`` per model on the demo val beton (the grid without the formats whose grid repeats an
   earlier one, ``--sweep.same_grid 0``: 36 of 49), then ``python -m rat.quant fit`` over all sweeps: the seed's R²
   table for every similarity (default softmax JS and the histogram JS, each weighted four ways) and the plots of
   ``js_flops`` and ``hist_js_flops``.

The sweep JSONL files are the raw data behind docs/quant.md and docs/benchmarks.md; they are committed under
docs/data/quant/ so that ``python -m rat.quant fit --fit.sweeps docs/data/quant/<model>.jsonl,...`` regenerates the
table and the figures without rerunning anything.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rat.attacks import create_attack, eps_warmup_factor
from rat.data.demo import demo_root, ensure_demo_betons
from rat.eval.data import dataset_size, iter_eval_batches

_logger = logging.getLogger("bench_quant")

RES = 32
EPS = 4 / 255
MODELS = {
    "resnet10t_w8": ("resnet10t", {"channels": (8, 16, 32, 64), "stem_width": 8}),
    "resnet18_w8": ("resnet18", {"channels": (8, 16, 32, 64)}),
    "resnet14t_w8": ("resnet14t", {"channels": (8, 16, 32, 64), "stem_width": 8}),
    "convnext_micro_cvst": ("convnext_micro_cvst", {}),
}
BN_MODELS = ("resnet10t_w8", "resnet18_w8", "resnet14t_w8")  # the default set: small BatchNorm timm CNNs


def beton_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a beton at RES px, preprocessed as ``python -m rat.quant`` preprocesses (rat.eval.data)."""
    n = dataset_size(path)
    xs, ys = [], []
    for x, y in iter_eval_batches(path, np.arange(n), [n], resolution=RES, device=torch.device("cpu"), num_workers=1):
        xs.append(x.float())
        ys.append(y.long())
    return torch.cat(xs), torch.cat(ys)


def train(arch: str, kwargs: dict, x: torch.Tensor, y: torch.Tensor, steps: int, path: Path, seed: int) -> None:
    """FGSM-RS adversarial training with a plain loop; writes a rat checkpoint to ``path``."""
    from rat.models import create_model

    torch.manual_seed(seed)
    model_kwargs = {"num_classes": 10, "normalize": True, "img_size": RES, **kwargs}
    model = create_model(arch, **model_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    attack = create_attack("fgsm", model, norm="Linf", eps=EPS, n_iter=1, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        xb, yb = x[idx], y[idx]
        xb = torch.roll(xb, shifts=torch.randint(-3, 4, (2,), generator=gen).tolist(), dims=(2, 3))
        attack.set_eps_scale(eps_warmup_factor(step, 0.3 * steps))
        x_adv = attack.perturb(xb, yb)
        model.train()
        loss = 0.5 * F.cross_entropy(model(xb), yb) + 0.5 * F.cross_entropy(model(x_adv), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            _logger.info("%s step %d loss %.3f", arch, step, loss.item())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "arch": arch, "model_kwargs": model_kwargs, "epoch": 1}, path)


def quant_cli(*args: str) -> None:
    """Run ``python -m rat.quant ARGS`` (printed first); a failure stops the bench."""
    cmd = [sys.executable, "-m", "rat.quant", *args]
    print("$ python -m rat.quant " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def fit_all(out: Path) -> None:
    """``python -m rat.quant fit`` over every ``<out>/*/sweep.jsonl``: the R² table, fit.png and fit_hist.png."""
    sweeps = ",".join(str(p) for p in sorted(out.glob("*/sweep.jsonl")))
    for name, similarity in (("fit", "js_flops"), ("fit_hist", "hist_js_flops")):
        for stale in (out / f"{name}.png", out / f"{name}.json"):
            stale.unlink(missing_ok=True)
        quant_cli("fit", "--fit.sweeps", sweeps, "--fit.similarity", similarity, "--fit.output",
                  str(out / f"{name}.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quant_bench"))
    parser.add_argument("--models", nargs="+", default=list(BN_MODELS), choices=list(MODELS))
    parser.add_argument("--train-steps", type=int, default=800, help="FGSM-RS training steps per model")
    parser.add_argument("--n-ex", type=int, default=300, help="val images of each sweep point (the demo val set has "
                        "300)")
    parser.add_argument("--n-iter", type=int, default=5, help="APGD-CE steps of the robust accuracy")
    parser.add_argument("--report", action="store_true", help="only fit the sweeps already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        fit_all(out)
        return 0
    train_beton, val_beton = ensure_demo_betons(demo_root(""))
    x_train, y_train = beton_tensors(train_beton)
    timings = {}
    for name in args.models:
        arch, kwargs = MODELS[name]
        ckpt = out / name / "checkpoint.pt"
        t0 = time.time()
        if not ckpt.exists():
            train(arch, kwargs, x_train, y_train, args.train_steps, ckpt, seed=0)
        timings[f"train_{name}"] = round(time.time() - t0, 1)
        sweep = out / name
        (sweep / "sweep.jsonl").unlink(missing_ok=True)
        t0 = time.time()
        quant_cli("sweep", "--qmodel.checkpoint", str(ckpt), "--qmodel.device", "cpu", "--qdata.data", str(val_beton),
                  "--qdata.calib_data", str(train_beton), "--qdata.n_ex", str(args.n_ex), "--qdata.num_workers", "1",
                  "--qattack.n_iter", str(args.n_iter), "--sweep.same_grid", "0", "--sweep.name", name,
                  "--sweep.progress", "0", "--sweep.output", str(sweep))
        timings[f"sweep_{name}"] = round(time.time() - t0, 1)
    (out / f"timings_{'_'.join(args.models)}.json").write_text(json.dumps(timings) + "\n")
    print(json.dumps(timings))
    fit_all(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
