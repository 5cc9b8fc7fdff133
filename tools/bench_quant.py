"""The rat.quant evidence run: train small models on the demo data, sweep every format, fit, generate and estimate.

    python tools/bench_quant.py --out runs/quant_bench               # GPU: ~5 min; CPU (2 cores): much longer
    python tools/bench_quant.py --out runs/quant_bench --quick       # smaller everything, a CPU smoke run

Steps (numbers go to ``<out>/summary.json`` and a Markdown table on stdout, which docs/benchmarks.md quotes):

1. Train each model (default ``BN_MODELS``, three BatchNorm timm CNNs at small widths; rat's LayerNorm
   convnext_micro_cvst on request) with a plain loop on the in-memory demo arrays (downscaled to 32 px): AdamW,
   APGD-2 (``--cpu``: FGSM-RS) Linf 4/255
   adversarial training with a mixed clean/adversarial loss and an eps warm-up (as configs/demo.yaml), so that robust
   accuracy is not zero. Checkpoints are rat
   trainer checkpoints (``model``, ``arch``, ``model_kwargs``), so ``python -m rat.quant`` and ``rat.eval`` read them.
2. Sweep the whole grid (INT 2–16, POT 2–8, FLOAT 3–8 every e) per model on the 300 demo val images: clean and APGD-10
   (``--cpu``: APGD-5) robust accuracy, js_param, js_flops (``rat.quant.run_sweep``); then fit loss vs js_flops
   (``rat.quant.fit``).
3. Per model: train + adjust the generator to the model's real FP clean/robust accuracy (the CvSt model uses
   activation statistics recorded on 256 demo *train* images), then estimate FP and quantized robust accuracy on the
   generated set (quantized models calibrated on generated images) and compare with the real val numbers (Spearman ρ
   of the ranking).

Runs without FFCV (the demo arrays are decoded in memory), so it also runs on a bare GPU machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from rat.attacks import create_attack, eps_warmup_factor
from rat.data.demo import load_demo_arrays
from rat.models import create_model_from_checkpoint
from rat.quant import (
    AttackSpec,
    adjust_generator,
    calibrate,
    evaluate_point,
    fit_sweeps,
    label_accuracy,
    parse_format,
    plot_fits,
    quantize_model,
    record_norm_stats,
    run_sweep,
    sample,
    stat_targets,
    sweep_grid,
    train_generator,
)
from rat.quant.sweep import batches

_logger = logging.getLogger("bench_quant")

RES = 32
EPS = 4 / 255
MODELS = {
    "resnet10t_w8": ("resnet10t", {"channels": (8, 16, 32, 64), "stem_width": 8}),
    "resnet18_w8": ("resnet18", {"channels": (8, 16, 32, 64)}),
    "resnet14t_w8": ("resnet14t", {"channels": (8, 16, 32, 64), "stem_width": 8}),
    "mobilenetv3_small_050": ("mobilenetv3_small_050", {}),
    "convnext_micro_cvst": ("convnext_micro_cvst", {}),
}
BN_MODELS = ("resnet10t_w8", "resnet18_w8", "resnet14t_w8")  # the default set: small BatchNorm timm CNNs
# Quantized variants whose robust ranking the generated set has to predict: a spread from harmless to ruinous.
ESTIMATE_FORMATS = ("INT8", "INT5", "INT4", "INT3", "POT4", "POT3", "FLOAT6_E3M2", "FLOAT4_E2M1", "FLOAT4_E3M0")


def demo_tensors(split: str, device: torch.device, data: str = "demo") -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] RGB images at RES px and labels: the demo photo digits, or (``data='digits'``) scikit-learn's plain
    8x8 digits that the demo set is composited from (last 300 = val), which tiny nets learn in a few hundred steps."""
    if data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images).float().div(16).unsqueeze(1).repeat(1, 3, 1, 1)
        y = torch.from_numpy(digits.target).long()
        x, y = (x[:-300], y[:-300]) if split == "train" else (x[-300:], y[-300:])
    else:
        images, labels = load_demo_arrays(split)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
        y = torch.from_numpy(labels).long()
    x = F.interpolate(x, size=(RES, RES), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x.to(device), y.to(device)


def train(arch: str, kwargs: dict, x: torch.Tensor, y: torch.Tensor, steps: int, path: Path, seed: int,
          attack_name: str = "apgd") -> dict:
    from rat.models import create_model

    torch.manual_seed(seed)
    model_kwargs = {"num_classes": 10, "normalize": True, "img_size": RES, **kwargs}
    model = create_model(arch, **model_kwargs).to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    attack = create_attack(attack_name, model, norm="Linf", eps=EPS, n_iter=2 if attack_name == "apgd" else 1,
                           seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen).to(x.device)
        xb, yb = x[idx], y[idx]
        shift = torch.randint(-3, 4, (2,), generator=gen).tolist()
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        attack.set_eps_scale(eps_warmup_factor(step, 0.3 * steps))
        x_adv = attack.perturb(xb, yb)
        model.train()
        loss = 0.5 * F.cross_entropy(model(xb), yb) + 0.5 * F.cross_entropy(model(x_adv), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            _logger.info("%s step %d loss %.3f", arch, step, loss.item())
    state = {"model": model.state_dict(), "arch": arch, "model_kwargs": model_kwargs, "epoch": 1}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def estimate(model, name, x_val, y_val, calib_real, spec, args, out: Path) -> dict:
    """Generate + adjust for one model, then estimated vs real accuracy of FP and quantized variants."""
    fp = evaluate_point(model, x_val, y_val, spec, 300)
    stats = None if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) else \
        record_norm_stats(model, batches(calib_real, 128))
    targets = stat_targets(model, stats)
    t0 = time.time()
    generator = train_generator(model, targets, num_classes=10, img_size=RES, steps=args.gen_steps,
                                width=args.gen_width, seed=0, progress=False)
    label_acc = label_accuracy(model, generator)
    result = adjust_generator(model, generator, targets, target_clean=fp["clean_acc"],
                              target_robust=fp["robust_acc"], spec=spec, rounds=args.rounds,
                              steps_per_round=args.steps_per_round, seed=0, progress=False)
    xg, yg = sample(result.generator, args.n_generated, result.mix, 1000, x_val.device)
    gen_time = time.time() - t0
    amax = calibrate(model, batches(xg, 128))
    rows = []
    for fmt_name in ("FP32", *ESTIMATE_FORMATS):
        net = model if fmt_name == "FP32" else quantize_model(copy.deepcopy(model), parse_format(fmt_name), amax).model
        est = evaluate_point(net, xg, yg, spec, 500)
        real = evaluate_point(net, x_val, y_val, spec, 300)
        rows.append({"format": fmt_name, "est_clean": est["clean_acc"], "est_robust": est["robust_acc"],
                     "real_clean": real["clean_acc"], "real_robust": real["robust_acc"]})
    rho_robust = spearmanr([r["est_robust"] for r in rows], [r["real_robust"] for r in rows]).statistic
    rho_clean = spearmanr([r["est_clean"] for r in rows], [r["real_clean"] for r in rows]).statistic
    summary = {"model": name, "statistics": "batchnorm" if stats is None else "recorded (256 demo train images)",
               "label_accuracy": label_acc, "mix": result.mix, "beta": result.beta, "history": result.history,
               "fp_real_clean": fp["clean_acc"], "fp_real_robust": fp["robust_acc"],
               "fp_est_clean": rows[0]["est_clean"], "fp_est_robust": rows[0]["est_robust"],
               "fp_robust_error": rows[0]["est_robust"] - rows[0]["real_robust"],
               "mean_abs_robust_error": sum(abs(r["est_robust"] - r["real_robust"]) for r in rows) / len(rows),
               "spearman_robust": float(rho_robust), "spearman_clean": float(rho_clean), "rows": rows,
               "generator_time_s": round(gen_time, 1)}
    (out / f"estimate_{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quant_bench"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few steps, a small grid: a smoke run")
    parser.add_argument("--models", nargs="+", default=list(BN_MODELS), choices=list(MODELS))
    parser.add_argument("--data", choices=["demo", "digits"], default="demo",
                        help="demo photo digits (default) or scikit-learn's plain digits (a smoke run)")
    parser.add_argument("--report", action="store_true",
                        help="only fit the sweeps and tabulate the estimates already in --out (after running the "
                             "models as separate processes, e.g. one per core)")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU budget: APGD-5, FGSM-RS training, a narrower generator and fewer generator "
                             "steps (still the whole grid and all 300 val images)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.train_steps = 60 if args.quick else 1500 if args.cpu else 2000
    args.gen_steps = 60 if args.quick else 300 if args.cpu else 600
    args.gen_width = 32 if args.quick or args.cpu else 128
    args.rounds = 2 if args.quick else 4 if args.cpu else 8
    args.steps_per_round = 10 if args.quick else 20 if args.cpu else 40
    args.n_generated = 200 if args.quick else 500 if args.cpu else 1000
    n_val = 100 if args.quick else 300
    args.train_attack = "fgsm" if args.cpu or args.quick else "apgd"
    device = torch.device(args.device)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(out)
    x_train, y_train = demo_tensors("train", device, args.data)
    x_val, y_val = demo_tensors("val", device, args.data)
    keep = torch.randperm(len(y_val), generator=torch.Generator().manual_seed(0))[:n_val].sort().values.to(device)
    x_val, y_val = x_val[keep], y_val[keep]
    calib = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:256].to(device)]
    spec = AttackSpec(norm="Linf", eps=EPS, n_iter=5 if args.cpu or args.quick else 10)
    grid = sweep_grid()
    if args.quick:
        grid = [parse_format(f) for f in ("INT8", "INT4", "INT2", "POT3", "E4M3")]
    jsonls, estimates, timings, models = [], [], {}, {}
    for name in args.models:  # phase 1: train and sweep every model, then fit (partial results survive a timeout)
        arch, kwargs = MODELS[name]
        ckpt = out / name / "checkpoint.pt"
        t0 = time.time()
        state = torch.load(ckpt, weights_only=True) if ckpt.exists() else train(arch, kwargs, x_train, y_train,
                                                                                  args.train_steps, ckpt, seed=0,
                                                                                  attack_name=args.train_attack)
        timings[f"train_{name}"] = round(time.time() - t0, 1)
        model = create_model_from_checkpoint(state).to(device).eval()
        model.requires_grad_(False)
        models[name] = model
        jsonl = out / name / "sweep.jsonl"
        jsonl.unlink(missing_ok=True)
        t0 = time.time()
        run_sweep(model, name=name, formats=grid, calib=calib, x=x_val, y=y_val, spec=spec, img_size=RES,
                  batch_size=300, jsonl=jsonl, progress=False, extra={"arch": arch})
        timings[f"sweep_{name}"] = round(time.time() - t0, 1)
        jsonls.append(jsonl)
    fit_all(out)
    for name, model in models.items():  # phase 2: generate, adjust, estimate
        t0 = time.time()
        estimates.append(estimate(model, name, x_val, y_val, calib, spec, args, out))
        timings[f"estimate_{name}"] = round(time.time() - t0, 1)
        _logger.info("%s: %s", name, {k: v for k, v in estimates[-1].items() if k not in ("rows", "history")})
    (out / f"timings_{'_'.join(args.models)}.json").write_text(json.dumps(timings) + "\n")
    return report(out)


def fit_all(out: Path) -> dict:
    """Fit every ``<out>/*/sweep.jsonl`` together; writes fit.png and fit.json."""
    from rat.quant import load_records

    records = load_records(sorted(out.glob("*/sweep.jsonl")))
    summary = fit_sweeps(records)
    plot_fits(records, summary, out / "fit.png")
    (out / "fit.json").write_text(json.dumps(summary, indent=2) + "\n")
    _logger.info("fit: %s", {t: {"overall": summary[t]["overall"]["r2"],
                                 **{m: f["r2"] for m, f in summary[t]["models"].items()}} for t in ("clean", "robust")})
    return summary


def report(out: Path) -> int:
    """Fit all sweeps in ``out`` and print the Markdown table of docs/benchmarks.md."""
    summary = fit_all(out)
    fps = {}
    for path in sorted(out.glob("*/sweep.jsonl")):
        first = json.loads(path.read_text().splitlines()[0])
        fps[first["model"]] = first
    estimates = {e["model"]: e for e in (json.loads(p.read_text()) for p in sorted(out.glob("estimate_*.json")))}
    (out / "summary.json").write_text(json.dumps({"fit": summary, "estimates": estimates}, indent=2) + "\n")
    print("| model | FP clean | FP APGD | R² clean loss (js_flops) | R² robust loss | generator label acc | est. FP "
          "robust (real) | mean abs robust error | Spearman ρ robust | ρ clean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, fp in fps.items():
        est = estimates.get(m)
        gen = (f"{est['label_accuracy']:.1f} | {est['fp_est_robust']:.1f} ({est['fp_real_robust']:.1f}) | "
               f"{est['mean_abs_robust_error']:.1f} | {est['spearman_robust']:.3f} | {est['spearman_clean']:.3f}"
               if est else "– | – | – | – | –")
        print(f"| {m} | {fp['clean_acc']:.1f} | {fp['robust_acc']:.1f} | {summary['clean']['models'][m]['r2']:.3f} | "
              f"{summary['robust']['models'][m]['r2']:.3f} | {gen} |")
    print(f"| all models | | | {summary['clean']['overall']['r2']:.3f} | {summary['robust']['overall']['r2']:.3f} "
          "| | | | | |")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
