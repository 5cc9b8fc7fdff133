"""Accuracy of full-precision and quantized models on in-memory image tensors, and the whole-grid sweep.

Clean accuracy is top-1; robust accuracy is APGD's (``rat.attacks.create_attack('apgd', ...)``, gradients through the
quantizers straight-through) and, on request, AutoAttack's (``rat.eval.autoattack``). Each sweep point is one format
at one bit width: the model is quantized from the same full-precision weights and the same calibrated activation
ranges, then evaluated on the same images; results go to a JSONL file as they come (one line per point) and to a CSV
at the end.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rat.logging import progress as report_progress
from rat.quant.formats import QuantFormat, same_grid_as
from rat.quant.ptq import calibrate, fold_batchnorm, layer_tensors, quantize_model
from rat.quant.similarity import DEFAULT_BINS, layer_flops, layer_params, model_similarity

__all__ = ["AttackSpec", "FP_NAME", "HIST_PREFIX", "accuracy", "batches", "collapse_threshold", "evaluate_point",
           "robust_accuracy", "run_sweep", "write_csv"]

_logger = logging.getLogger(__name__)

FP_NAME = "FP32"
HIST_PREFIX = "hist_"  # record keys of the histogram measure: hist_js_flops, ...


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """The robust evaluation: APGD-CE with ``n_iter`` steps in ``norm``/``eps``, optionally AutoAttack too."""

    norm: str = "Linf"
    eps: float = 4 / 255
    n_iter: int = 10
    autoattack: str = ""  # '' = off, else an AutoAttack version: 'standard' or 'fast'
    seed: int = 0


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``x`` along the first dimension."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy in % (model in eval mode)."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(batches(x, batch_size),
                                                                             batches(y, batch_size)))
    return 100.0 * correct / max(len(y), 1)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, batch_size: int) -> float:
    """APGD-CE robust accuracy in %."""
    from rat.attacks import create_attack

    model.eval()
    attack = create_attack("apgd", model, norm=spec.norm, eps=spec.eps, n_iter=spec.n_iter, seed=spec.seed)
    correct = 0
    for xb, yb in zip(batches(x, batch_size), batches(y, batch_size)):
        x_adv = attack.perturb(xb, yb)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == yb).sum())
    return 100.0 * correct / max(len(y), 1)


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
                        batch_size: int) -> float:
    """AutoAttack (``spec.autoattack`` version) robust accuracy in %, through rat's wrapper: a point is robust when
    every attack of the version leaves it correctly classified."""
    from rat.eval.autoattack import build_autoattack, resolve_attacks, robust_after_attack

    model.eval()
    attacks = resolve_attacks(spec.autoattack)
    adversary = build_autoattack(model, norm=spec.norm, eps=spec.eps, attacks=attacks, device=x.device,
                                 seed=spec.seed)
    robust = 0
    for xb, yb in zip(batches(x, batch_size), batches(y, batch_size)):
        flags = torch.ones(len(yb), dtype=torch.bool)
        for attack in attacks:
            flags &= robust_after_attack(adversary, attack, xb.contiguous(), yb)
        robust += int(flags.sum())
    return 100.0 * robust / max(len(y), 1)


def evaluate_point(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
                   batch_size: int) -> dict[str, float]:
    """``{'clean_acc', 'robust_acc'[, 'aa_acc']}`` of one model."""
    result = {"clean_acc": accuracy(model, x, y, batch_size),
              "robust_acc": robust_accuracy(model, x, y, spec, batch_size)}
    if spec.autoattack:
        result["aa_acc"] = autoattack_accuracy(model, x, y, spec, batch_size)
    return result


def _loss(fp: float, q: float) -> float:
    """Relative accuracy loss ``(fp - q) / fp`` (0 when the full-precision accuracy is 0)."""
    return (fp - q) / fp if fp > 0 else 0.0


def collapse_threshold(num_classes: int, n: int) -> float:
    """Clean accuracy (%) at or below which a quantized model counts as collapsed: chance ``100 / num_classes`` plus
    three binomial standard deviations of a chance-level classifier on ``n`` images."""
    chance = 100.0 / num_classes
    return chance + 3.0 * (chance * (100.0 - chance) / max(n, 1)) ** 0.5


def _robust_loss(fp: float, q: float, collapsed: bool) -> float:
    """``(fp - q) / fp``, signed (negative: the quantized model is more robust on these images), and 1 for a
    collapsed model, whose robust accuracy (a constant or near-constant prediction that attacks cannot change) says
    nothing about robustness: it has lost everything the FP model had."""
    return 1.0 if collapsed else _loss(fp, q)


def run_sweep(model: nn.Module, *, name: str, formats: Sequence[QuantFormat], calib: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor, spec: AttackSpec, img_size: int, batch_size: int, jsonl: str | Path,
              progress: str | bool = "auto", extra: dict[str, Any] | None = None, fold_bn: bool = True,
              quant_bias: bool = True, bins: int = DEFAULT_BINS) -> list[dict[str, Any]]:
    """Evaluate ``model`` in full precision and at every format; returns the records (also appended to ``jsonl``).

    Args:
        model: Full-precision model (left unchanged; each point quantizes a copy).
        name: Model name in the records (the fit groups points by it).
        formats: The grid (``rat.quant.formats.sweep_grid()`` for the whole one).
        calib: Calibration images ([0, 1], on the model's device).
        x: Evaluation images.
        y: Their labels.
        spec: Robust evaluation.
        img_size: Resolution (for per-layer FLOPs).
        batch_size: Images per forward pass.
        jsonl: Results file; one JSON object per line, written as each point finishes.
        progress: ``auto``, ``1`` or ``0`` (or a bool): a tqdm bar or plain log lines (:func:`rat.logging.progress`).
        extra: Fields added to every record (arch, checkpoint, ...).
        fold_bn: Fold BatchNorm into the convolutions before quantizing (``rat.quant.ptq.fold_batchnorm``).
        quant_bias: Quantize biases at the accumulator scale.
        bins: Bins of the histogram measure (recorded as ``hist_js_*`` beside the seed's ``js_*``).

    A format whose grid equals an earlier one's (FLOAT<b>_E1 = INT<b>, FLOAT<b>_E<b-1>M0 = POT<b>) is recorded with
    ``same_grid_as``; ``rat.quant.fit`` leaves those points out. A quantized model at or below
    :func:`collapse_threshold` is ``collapsed`` and its robust loss is 1.
    """
    model = model.eval()
    model.requires_grad_(False)
    act_amax = calibrate(model, batches(calib, batch_size))
    reference = copy.deepcopy(model)  # the full-precision model the quantized ones start from (BN folded)
    folded = fold_batchnorm(reference, calib[:batch_size]) if fold_bn else {}
    fp_tensors = layer_tensors(reference, folded)
    params = layer_params(fp_tensors)
    flops, macs = layer_flops(model, list(fp_tensors), img_size)
    num_classes = int(getattr(model, "num_classes", 0) or int(y.max()) + 1)
    collapsed_at = collapse_threshold(num_classes, len(y))
    base = {"model": name, "n_ex": int(len(y)), "n_calib": int(len(calib)), "norm": spec.norm, "eps": spec.eps,
            "n_iter": spec.n_iter, "img_size": img_size, "macs": macs, "fold_bn": bool(fold_bn),
            "quant_bias": bool(quant_bias), "bins": bins, "collapse_threshold": round(collapsed_at, 3),
            **(extra or {})}
    fp_result = evaluate_point(model, x, y, spec, batch_size)
    zero_js = {key: 0.0 for key in ("js_param", "js_flops", "js_flops_wt_log", "js_flops_wt_cbrt")}
    records = [{**base, "format": FP_NAME, "kind": FP_NAME, "bits": 32, "exp_bits": 8, **fp_result,
                "acc_loss": 0.0, "robust_loss": 0.0, "collapsed": False, **zero_js,
                **{HIST_PREFIX + k: v for k, v in zero_js.items()}}]
    jsonl = Path(jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with jsonl.open("a") as out:
        out.write(json.dumps(records[0]) + "\n")
        for index, fmt in enumerate(report_progress(formats, desc=f"sweep {name}", setting=progress, every=1)):
            start = time.time()
            qmodel = copy.deepcopy(reference)
            quantized = quantize_model(qmodel, fmt, act_amax, folded=folded, bias=quant_bias)
            q_tensors = layer_tensors(qmodel, folded)
            sim = model_similarity(fp_tensors, q_tensors, params, flops, macs, "softmax")
            hist = model_similarity(fp_tensors, q_tensors, params, flops, macs, "histogram", bins)
            result = evaluate_point(qmodel, x, y, spec, batch_size)
            collapsed = result["clean_acc"] <= collapsed_at
            twin = same_grid_as(fmt, formats[:index])
            record = {**base, "format": fmt.name, "kind": fmt.kind, "bits": fmt.bits, "exp_bits": fmt.exp_bits,
                      **({"same_grid_as": twin.name} if twin is not None else {}),
                      **result, "acc_loss": _loss(fp_result["clean_acc"], result["clean_acc"]),
                      "robust_loss": _robust_loss(fp_result["robust_acc"], result["robust_acc"], collapsed),
                      "collapsed": collapsed, **{k: v for k, v in sim.items() if k != "js_layers"},
                      **{HIST_PREFIX + k: v for k, v in hist.items() if k != "js_layers"},
                      "time_s": round(time.time() - start, 2)}
            if "aa_acc" in result:
                record["aa_loss"] = _robust_loss(fp_result["aa_acc"], result["aa_acc"], collapsed)
            for handle in quantized.handles:
                handle.remove()
            records.append(record)
            out.write(json.dumps(record) + "\n")
            out.flush()
            _logger.info("%s %s: clean %.2f%% robust %.2f%% js_flops %.4g", name, fmt.name, result["clean_acc"],
                         result["robust_acc"], sim["js_flops"])
    return records


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The records as a CSV table (columns: the union of their keys, in first-seen order)."""
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return path
