"""The bodies of the ``python -m rat.quant`` subcommands (``COMMANDS``): each takes the parsed config (its Sections,
rat/quant/sections.py) and returns the exit status; bad input raises, and ``rat.quant.__main__`` reports it."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rat.config import ConfigError
from rat.models import CheckpointError
from rat.quant.fit import FitError
from rat.quant.formats import FORMATS, parse_format, same_grid_as, sweep_grid
from rat.quant.inputs import (
    attack_spec,
    data_paths,
    fresh_output,
    load_images,
    load_model,
    pick_device,
    read_images,
    split_indices,
)

__all__ = ["COMMANDS", "run_estimate", "run_fit", "run_generate", "run_ptq", "run_sweep"]

_logger = logging.getLogger(__name__)


def run_ptq(cfg: dict[str, Any]) -> int:
    from rat.quant.ptq import calibrate, fold_batchnorm, quantize_model, save_quantized_checkpoint
    from rat.quant.sweep import batches

    if not cfg["ptq"]["format"]:
        raise ConfigError("ptq.format is required, e.g. int8, pot4, float8_e4m3")
    fmt = parse_format(cfg["ptq"]["format"])
    output = fresh_output(cfg["ptq"]["output"], "ptq.output")
    device = pick_device(cfg["qmodel"]["device"])
    model, meta, resolution = load_model(cfg["qmodel"], device)
    calib_path, _ = data_paths(cfg)
    x, _ = load_images(calib_path, cfg["qdata"]["calib_n"], resolution, device, cfg["qdata"]["num_workers"],
                   "qdata.calib_n")
    amax = calibrate(model, batches(x, cfg["qmodel"]["batch_size"]))
    folded = fold_batchnorm(model, x[:cfg["qmodel"]["batch_size"]]) if cfg["qscheme"]["fold_bn"] else {}
    quantized = quantize_model(model, fmt, amax, folded=folded, bias=bool(cfg["qscheme"]["quant_bias"]))
    save_quantized_checkpoint(output, quantized, meta["arch"], meta["model_kwargs"],
                              source={"checkpoint": meta["checkpoint"], "calib_data": calib_path, "calib_n": len(x)})
    print(f"rat.quant ptq: {meta['arch']} quantized to {fmt.name} ({len(quantized.act_scales)} layers, calibrated on "
          f"{len(x)} images of {calib_path}) -> {output}")
    return 0


def run_sweep(cfg: dict[str, Any]) -> int:
    from rat.eval.evaluate import default_model_name
    from rat.quant.sweep import run_sweep, write_csv

    sweep = cfg["sweep"]
    if not sweep["output"]:
        raise ConfigError("sweep.output is required (a results folder)")
    folder = Path(sweep["output"])
    fresh_output(str(folder / "sweep.jsonl"), "sweep.output")
    if sweep["formats"]:
        formats = [parse_format(f) for f in sweep["formats"].split(",") if f.strip()]
    else:
        formats = sweep_grid(tuple(k.upper() for k in sweep["kinds"].split(",") if k.upper() in FORMATS))
    if not sweep["same_grid"]:
        formats = [f for i, f in enumerate(formats) if same_grid_as(f, formats[:i]) is None]
    device = pick_device(cfg["qmodel"]["device"])
    calib_path, data_path = data_paths(cfg)
    model, meta, resolution = load_model(cfg["qmodel"], device, labeled=(data_path,))
    workers = cfg["qdata"]["num_workers"]
    calib, _ = load_images(calib_path, cfg["qdata"]["calib_n"], resolution, device, workers, "qdata.calib_n")
    x, y = load_images(data_path, cfg["qdata"]["n_ex"], resolution, device, workers, "qdata.n_ex")
    name = sweep["name"] or default_model_name(meta["checkpoint"], meta["arch"])
    records = run_sweep(model, name=name, formats=formats, calib=calib, x=x, y=y, spec=attack_spec(cfg, resolution),
                        img_size=resolution, batch_size=cfg["qmodel"]["batch_size"], jsonl=folder / "sweep.jsonl",
                        progress=sweep["progress"], fold_bn=bool(cfg["qscheme"]["fold_bn"]),
                        quant_bias=bool(cfg["qscheme"]["quant_bias"]), bins=sweep["bins"],
                        extra={"arch": meta["arch"], "checkpoint": meta["checkpoint"]})
    write_csv(records, folder / "sweep.csv")
    fp = records[0]
    print(f"rat.quant sweep: {name}: FP clean {fp['clean_acc']:.2f}% robust {fp['robust_acc']:.2f}%, "
          f"{len(records) - 1} formats -> {folder / 'sweep.jsonl'}, {folder / 'sweep.csv'}")
    return 0


def run_fit(cfg: dict[str, Any]) -> int:
    from rat.quant.fit import FIT_SIMILARITIES, TARGETS, fit_sweeps, fit_table, load_records, plot_fits

    fit = cfg["fit"]
    paths = [Path(p) for p in fit["sweeps"].split(",") if p.strip()]
    if not paths:
        raise ConfigError("fit.sweeps is required: comma-separated sweep.jsonl files")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"fit.sweeps: {path} does not exist (write it with python -m rat.quant sweep)")
        if path.suffix != ".jsonl":
            raise FitError(f"fit.sweeps: {path} is not a sweep JSONL: give the sweep.jsonl that python -m rat.quant "
                           "sweep writes beside it")
    output = fresh_output(fit["output"], "fit.output")
    if output.suffix.lower() != ".png":
        raise ConfigError(f"fit.output={output} must be a .png file (the summary goes next to it as .json)")
    fresh_output(str(output.with_suffix(".json")), "fit.output's .json summary")
    records = load_records(paths)
    if not records:
        raise FitError("fit.sweeps hold no quantized points: sweep some formats first")
    summary = fit_sweeps(records, fit["similarity"])  # refuses too few points before anything is written
    recorded = [s for s in FIT_SIMILARITIES if all(s in r for r in records)]
    fits = {s: summary if s == fit["similarity"] else fit_sweeps(records, s) for s in recorded}
    summary["all_similarities"] = {s: {t: fits[s][t] for t in TARGETS} for s in recorded}
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    plot_fits(records, summary, output)
    output.with_suffix(".json").write_text(text)
    for target in TARGETS:
        print(f"rat.quant fit: R² of {target} accuracy loss, per model and all (the seed's table; {len(records)} "
              f"distinct quantized points):")
        print(fit_table([{"similarity": s, "models": summary["models"], **summary["all_similarities"][s]}
                         for s in recorded], target))
    print(f"rat.quant fit: plot ({fit['similarity']}) {output}, summary {output.with_suffix('.json')}")
    return 0


def run_generate(cfg: dict[str, Any]) -> int:
    from rat.eval.data import dataset_size
    from rat.quant.generator import adjust_generator, label_accuracy, record_norm_stats, sample, stat_targets
    from rat.quant.generator import train_generator as train
    from rat.quant.sweep import accuracy, batches, robust_accuracy

    gen_cfg = cfg["generate"]
    output = fresh_output(gen_cfg["output"], "generate.output")
    target_clean, target_robust = gen_cfg["target_clean"], gen_cfg["target_robust"]
    if (target_clean < 0) != (target_robust < 0):
        raise ConfigError("give both generate.target_clean and generate.target_robust (measured on the guide part), "
                          "or neither: rat then measures both on the guide part")
    _, guide_path = data_paths(cfg)
    guide_total = dataset_size(guide_path)
    guide_indices, _ = split_indices(guide_total, cfg["qdata"]["guide_n"], 0)
    device = pick_device(cfg["qmodel"]["device"])
    model, meta, resolution = load_model(cfg["qmodel"], device, labeled=(guide_path,))
    spec = attack_spec(cfg, resolution)
    measured = gen_cfg["rounds"] > 0 and target_clean < 0
    if measured:  # the adjustment's targets, on the guide part only (estimate scores on other images)
        xr, yr = read_images(guide_path, guide_indices, resolution, device, cfg["qdata"]["num_workers"])
        bs = cfg["qmodel"]["batch_size"]
        target_clean, target_robust = accuracy(model, xr, yr, bs), robust_accuracy(model, xr, yr, spec, bs)
        del xr, yr
    guide = {"data": str(Path(guide_path).resolve()), "dataset_size": guide_total, "n": len(guide_indices),
             "indices": guide_indices.tolist(), "rule": "the first guide_n images of rat.eval's seeded order "
             "(rat.eval.data.SUBSET_RULE with n_ex = guide_n)",
             "targets": "measured" if measured else ("given" if target_clean >= 0 else "unused")}
    stats = None
    if cfg["qdata"]["stats_data"]:
        x, _ = load_images(cfg["qdata"]["stats_data"], cfg["qdata"]["stats_n"], resolution, device,
                       cfg["qdata"]["num_workers"], "qdata.stats_n")
        stats = record_norm_stats(model, batches(x, cfg["qmodel"]["batch_size"]))
    targets = stat_targets(model, stats)
    progress = gen_cfg["progress"]
    generator = train(model, targets, num_classes=model.num_classes, img_size=resolution, steps=gen_cfg["steps"],
                      batch_size=gen_cfg["batch_size"], lr=gen_cfg["lr"], mix=gen_cfg["mix"],
                      stat_weight=gen_cfg["stat_weight"], width=gen_cfg["width"], seed=gen_cfg["seed"],
                      progress=progress)
    label_acc = label_accuracy(model, generator)
    mix, beta, history = gen_cfg["mix"], 0.0, []
    # the stage-1 generator's images (before the adjustment), for estimate's PCA view
    before, before_labels = sample(generator, gen_cfg["n_samples"], mix, gen_cfg["seed"] + 1000, device)
    if gen_cfg["rounds"] > 0:
        result = adjust_generator(model, generator, targets, target_clean=target_clean,
                                  target_robust=target_robust, spec=spec, rounds=gen_cfg["rounds"],
                                  steps_per_round=gen_cfg["steps_per_round"], batch_size=gen_cfg["batch_size"],
                                  lr=gen_cfg["lr"] / 2, mix=gen_cfg["mix"], stat_weight=gen_cfg["stat_weight"],
                                  tolerance=gen_cfg["tolerance"], seed=gen_cfg["seed"], progress=progress)
        mix, beta, history = result.mix, result.beta, result.history
    images, labels = sample(generator, gen_cfg["n_samples"], mix, gen_cfg["seed"] + 1000, device)
    state = {"images": (images * 255).round().to(torch.uint8).cpu(), "labels": labels.cpu(),
             "images_before": (before * 255).round().to(torch.uint8).cpu(), "labels_before": before_labels.cpu(),
             "generator": {k: v.cpu() for k, v in generator.state_dict().items()},
             "meta": {"arch": meta["arch"], "checkpoint": meta["checkpoint"], "resolution": resolution, "mix": mix,
                      "num_classes": int(model.num_classes),
                      "beta": beta, "label_accuracy": label_acc, "history": history,
                      "target_clean": target_clean, "target_robust": target_robust, "guide": guide,
                      "norm": spec.norm, "eps": spec.eps, "n_iter": spec.n_iter,
                      "statistics": "batchnorm" if stats is None else "recorded"}}
    from rat.io import atomic_write

    atomic_write(output, lambda handle: torch.save(state, handle))
    last = history[-1] if history else {}
    if measured:
        print(f"rat.quant generate: targets measured on the {guide['n']} guide images of {guide_path}: clean "
              f"{target_clean:.2f}% robust {target_robust:.2f}%")
    print(f"rat.quant generate: label accuracy {label_acc:.1f}%, adjusted mix {mix:.3f} beta {beta:.3f}"
          + (f", FP on generated probe: clean {last['clean']:.2f}% robust {last['robust']:.2f}%" if last else "")
          + f" -> {output}")
    return 0


def _score_part(cfg: dict[str, Any], gen_meta: dict[str, Any], generated: str) -> dict[str, Any]:
    """The real images ``estimate.real`` scores on: the score part of the guide/score split of ``qdata.data``,
    refused (ConfigError) unless it is provably disjoint from the guide images the generated set records."""
    from rat.eval.data import dataset_size

    guide = gen_meta.get("guide")
    if not isinstance(guide, dict) or not isinstance(guide.get("indices"), list):
        raise ConfigError(f"estimate.generated={generated} records no guide images, so real scoring could reuse "
                          "the images its targets came from: regenerate it with python -m rat.quant generate")
    _, data_path = data_paths(cfg)
    data = str(Path(data_path).resolve())
    total = dataset_size(data_path)
    if data != guide["data"] or total != guide["dataset_size"]:
        raise ConfigError(f"qdata.data={data} ({total} images) is not the source of the generated set's guide images "
                          f"({guide['data']}, {guide['dataset_size']} images): score on that source, whose images "
                          "after the guide part are provably apart from it")
    guide_n = guide["n"] if cfg["qdata"]["guide_n"] < 0 else cfg["qdata"]["guide_n"]
    _, score = split_indices(total, guide_n, cfg["qdata"]["n_ex"])
    shared = np.intersect1d(score, np.asarray(guide["indices"], dtype=np.int64))
    if len(shared):
        raise ConfigError(f"{len(shared)} of the {len(score)} scoring images (qdata.guide_n {guide_n}) are among the "
                          f"{guide['n']} images that guided the generator's adjustment: set qdata.guide_n -1 (skip "
                          "the recorded guide part)")
    return {"data": data, "guide_n": guide_n, "n": len(score), "indices": score.tolist()}


def run_estimate(cfg: dict[str, Any]) -> int:
    from scipy.stats import spearmanr

    from rat.models import load_checkpoint_file
    from rat.quant.ptq import calibrate, fold_batchnorm, quantize_model
    from rat.quant.report import classifier_features, plot_pca, plot_relative, relative_accuracy
    from rat.quant.sweep import FP_NAME, batches, collapse_threshold, evaluate_point

    est = cfg["estimate"]
    if not est["generated"]:
        raise ConfigError("estimate.generated is required (the output of python -m rat.quant generate)")
    formats = [parse_format(f) for f in est["formats"].split(",") if f.strip()]
    if not formats:
        raise ConfigError("estimate.formats is required, e.g. int8,int4,pot4")
    output = fresh_output(est["output"], "estimate.output")
    figures = {name: output.with_name(f"{output.stem}_{name}.png") for name in ("relative", "pca")}
    if est["real"]:
        for name, path in figures.items():
            fresh_output(str(path), f"estimate.output's {name} plot")
    try:
        generated = load_checkpoint_file(est["generated"])
    except (FileNotFoundError, CheckpointError) as exc:  # its messages say "checkpoint": name the setting instead
        raise ConfigError(f"estimate.generated: {exc} (write the set with python -m rat.quant generate)") from exc
    if "images" not in generated or "labels" not in generated:
        raise ConfigError(f"estimate.generated={est['generated']} is not a generated set (write one with generate)")
    split = _score_part(cfg, generated.get("meta") or {}, est["generated"]) if est["real"] else None
    device = pick_device(cfg["qmodel"]["device"])
    model, meta, resolution = load_model(cfg["qmodel"], device, labeled=(split["data"],) if split else ())
    xg = generated["images"].to(device).float() / 255
    yg = generated["labels"].to(device)
    if xg.shape[-1] != resolution:
        raise ConfigError(f"the generated set is {xg.shape[-1]} px but the model runs at {resolution}: set "
                          f"qmodel.resolution {xg.shape[-1]}")
    from rat.data.meta import check_classes

    # a set generated for another model's classes; sets that do not record their count show it by a label too large
    classes = (generated.get("meta") or {}).get("num_classes")
    if not isinstance(classes, int) and len(yg) and int(yg.max()) >= model.num_classes:
        classes = int(yg.max()) + 1
    if isinstance(classes, int):
        check_classes(classes, int(model.num_classes), expected_from=f"generated set {est['generated']}",
                      actual_from=f"checkpoint {cfg['qmodel']['checkpoint']}",
                      fix="generate the set from this checkpoint (python -m rat.quant generate)")
    real = None
    if split is not None:
        real = read_images(split["data"], np.asarray(split["indices"]), resolution, device,
                            cfg["qdata"]["num_workers"])
    spec, bs = attack_spec(cfg, resolution), cfg["qmodel"]["batch_size"]
    amax = calibrate(model, batches(xg, bs))  # data-free: ranges from the generated images
    reference = copy.deepcopy(model)
    folded = fold_batchnorm(reference, xg[:bs]) if cfg["qscheme"]["fold_bn"] else {}
    rows = []
    for fmt in [None, *formats]:
        net = model if fmt is None else quantize_model(copy.deepcopy(reference), fmt, amax, folded=folded,
                                                       bias=bool(cfg["qscheme"]["quant_bias"])).model
        row: dict[str, Any] = {"format": FP_NAME if fmt is None else fmt.name}
        row.update({f"est_{k}": v for k, v in evaluate_point(net, xg, yg, spec, bs).items()})
        if real is not None:
            row.update({f"real_{k}": v for k, v in evaluate_point(net, *real, spec, bs).items()})
        rows.append(row)
        _logger.info("%s", row)
    summary: dict[str, Any] = {"model": meta, "generated": est["generated"], "rows": rows,
                               "norm": spec.norm, "eps": spec.eps, "n_iter": spec.n_iter}
    if split is not None:
        summary["guide"], summary["score"] = (generated.get("meta") or {})["guide"], split
    if real is not None:
        collapsed_at = collapse_threshold(int(model.num_classes), len(real[1]))
        ranked = [rows[0], *(r for r in rows[1:] if r["real_clean_acc"] > collapsed_at)]  # collapsed ones left out
        for key in ("clean_acc", "robust_acc"):
            errors = [abs(r[f"est_{key}"] - r[f"real_{key}"]) for r in ranked]
            rho = spearmanr([r[f"est_{key}"] for r in ranked], [r[f"real_{key}"] for r in ranked]).statistic
            summary[f"{key}_mean_abs_error"] = sum(errors) / len(errors)
            summary[f"{key}_fp_error"] = rows[0][f"est_{key}"] - rows[0][f"real_{key}"]
            summary[f"{key}_spearman"] = float(rho)
        summary["collapse_threshold"] = collapsed_at
        summary["relative"] = relative_accuracy(rows, collapsed_at)
        plot_relative(summary["relative"], figures["relative"])
        features = {"test set": classifier_features(model, real[0], bs)}
        labels = {"test set": real[1].cpu()}
        if "images_before" in generated:
            features["generator before adjustment"] = classifier_features(
                model, generated["images_before"].to(device).float() / 255, bs)
            labels["generator before adjustment"] = generated["labels_before"]
        features["generator after adjustment"] = classifier_features(model, xg, bs)
        labels["generator after adjustment"] = yg.cpu()
        plot_pca(features, labels, "test set", figures["pca"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    for r in rows:
        real_part = (f" | real clean {r['real_clean_acc']:6.2f}% robust {r['real_robust_acc']:6.2f}%"
                     if real is not None else "")
        print(f"{r['format']:>14}: estimated clean {r['est_clean_acc']:6.2f}% robust {r['est_robust_acc']:6.2f}%"
              + real_part)
    if real is not None:
        print(f"rat.quant estimate: FP robust error {summary['robust_acc_fp_error']:+.2f} points, mean |error| "
              f"{summary['robust_acc_mean_abs_error']:.2f}, Spearman rho (robust) {summary['robust_acc_spearman']:.3f}"
              f" -> {output}")
        rel = summary["relative"]
        print(f"rat.quant estimate: relative accuracy, generated vs test set, R² clean "
              f"{'–' if rel['clean']['r2'] is None else format(rel['clean']['r2'], '.3f')}, robust "
              f"{'–' if rel['robust']['r2'] is None else format(rel['robust']['r2'], '.3f')} (collapsed, left out: "
              f"{', '.join(rel['collapsed']) or 'none'}) -> {figures['relative']}, {figures['pca']}")
    return 0


COMMANDS = {"ptq": run_ptq, "sweep": run_sweep, "fit": run_fit, "generate": run_generate, "estimate": run_estimate}
