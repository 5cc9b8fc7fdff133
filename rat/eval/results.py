"""The JSON result of one evaluation: reading, validating, naming, formatting and merging shards.

A result (``format: rat.eval/1``) holds the model, checkpoint hash, threat model, resolution, AutoAttack version and
settings, the image subset, clean accuracy, robust accuracy after each attack, times and software versions, plus
``per_example``: the image indices and, for ``clean`` and each attack, a string of 0/1 flags (robust after that
attack, cumulative). The per-example flags make shards mergeable exactly (``merge_results``).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rat.attacks import NORMS
from rat.eval.spec import SHARD_INVARIANT
from rat.io import DuplicateKeyError, read_json

__all__ = [
    "RESULT_FORMAT", "ResultError", "eps_tag", "format_eps", "load_result", "merge_results",
    "summary_line",
]

RESULT_FORMAT = "rat.eval/1"
_REQUIRED = ("model", "norm", "eps", "resolution", "version", "attacks", "n_ex", "clean_accuracy", "robust_accuracy",
             "robust_accuracy_after", "per_example")


class ResultError(ValueError):
    """A result file is missing, unreadable or inconsistent."""


def format_eps(norm: str, eps: float) -> str:
    """Human form of eps: ``4/255`` for a multiple of 1/255 under Linf, else the shortest float text (``2``, ``75``)."""
    if norm == "Linf":
        k = eps * 255
        if abs(k - round(k)) < 1e-6 and round(k) > 0:
            return f"{round(k)}/255"
    return f"{eps:g}"


def eps_tag(norm: str, eps: float) -> str:
    """``format_eps`` for file names (``4_255``)."""
    return format_eps(norm, eps).replace("/", "_")


def load_result(path: str | Path) -> dict[str, Any]:
    """Read and validate a result JSON.

    Raises:
        ResultError: the file is missing, not JSON, or not a complete rat.eval result.
    """
    path = Path(path)
    try:
        result = read_json(path)
    except FileNotFoundError as exc:
        raise ResultError(f"no result file {path}") from exc
    except OSError as exc:  # a folder on the way is a file, no permission, an I/O error
        raise ResultError(f"cannot read result file {path} ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, DuplicateKeyError) as exc:
        raise ResultError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT:
        raise ResultError(f"{path} is not a {RESULT_FORMAT} result")
    missing = [k for k in _REQUIRED if k not in result]
    if missing:
        raise ResultError(f"{path} lacks {', '.join(missing)}")
    problem = _invalid_value(result)
    if problem:
        raise ResultError(f"{path} is not a valid result: {problem} (edited by hand? evaluate again)")
    n = len(result["per_example"]["indices"])
    if any(len(result["per_example"][s]) != n for s in ["clean", *result["attacks"]]):
        raise ResultError(f"{path}: per-example flags do not cover the {n} indices")
    return result


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _invalid_value(result: dict[str, Any]) -> str | None:
    """What is impossible in a result's values (a norm rat does not have, an accuracy outside [0, 1]...), or None."""
    if result["norm"] not in NORMS:
        return f"norm {result['norm']!r} is not one of {', '.join(NORMS)}"
    eps = result["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        return f"eps {eps!r} is not a positive number"
    after = result["robust_accuracy_after"]
    accuracies_ = {"clean_accuracy": result["clean_accuracy"], "robust_accuracy": result["robust_accuracy"],
                   **({f"robust_accuracy_after.{k}": v for k, v in after.items()} if isinstance(after, dict) else {})}
    bad = [f"{k}={v!r}" for k, v in accuracies_.items() if not _is_fraction(v)]
    if bad or not isinstance(after, dict):
        return f"accuracies must be fractions in [0, 1], got {', '.join(bad) or 'robust_accuracy_after=' + repr(after)}"
    if not isinstance(result["per_example"], dict) or "indices" not in result["per_example"]:
        return "per_example lacks the image indices"
    return None


def summary_line(result: dict[str, Any]) -> str:
    """One line: model, threat model, resolution, version, n, clean and robust accuracy, time."""
    shard = result.get("shard")
    shard_text = f" shard {shard['index']}/{shard['count']}" if shard else ""
    after = " ".join(f"{a}={acc:.2%}" for a, acc in result["robust_accuracy_after"].items())
    return (f"{result['model']} {result['norm']} eps={format_eps(result['norm'], result['eps'])} "
            f"res={result['resolution']} {result['version']} n={len(result['per_example']['indices'])}{shard_text}: "
            f"clean {result['clean_accuracy']:.2%} robust {result['robust_accuracy']:.2%} ({after}) "
            f"in {result['time_s']:.1f}s")


def accuracies(per_example: dict[str, Any], attacks: Sequence[str]) -> tuple[float, dict[str, float]]:
    """Clean accuracy and robust accuracy after each attack from per-example flag strings."""
    n = len(per_example["indices"])

    def mean(flags: str) -> float:
        return flags.count("1") / n

    return mean(per_example["clean"]), {a: mean(per_example[a]) for a in attacks}


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the shard results of one evaluation into the result of the whole evaluation.

    The shards must come from the same evaluation (same model hash, threat model, resolution, attacks, subset, batch
    size, seed...) and together cover every shard exactly once. Per-example flags are concatenated in index order and
    the accuracies recomputed from them, so the merge equals an unsharded run.

    Raises:
        ResultError: shards of different evaluations, duplicate or missing shards.
    """
    if not results:
        raise ResultError("no shard results to merge")
    first = results[0]
    for result in results[1:]:
        differs = [k for k in SHARD_INVARIANT if result.get(k) != first.get(k)]
        if differs:
            raise ResultError(f"shards of different evaluations (differ in {', '.join(differs)})")
    shards = [r.get("shard") for r in results]
    if any(s is None for s in shards):
        raise ResultError("only shard results (written with --shard) can be merged")
    count = shards[0]["count"]
    got = sorted(s["index"] for s in shards)
    if any(s["count"] != count for s in shards) or got != list(range(count)):
        raise ResultError(f"need each of the {count} shards exactly once, got shard indices {got}")
    ordered = sorted(results, key=lambda r: r["shard"]["index"])
    steps = ["clean", *first["attacks"]]
    per_example: dict[str, Any] = {"indices": [i for r in ordered for i in r["per_example"]["indices"]]}
    for step in steps:
        per_example[step] = "".join(r["per_example"][step] for r in ordered)
    if len(per_example["indices"]) != first["n_ex"] or per_example["indices"] != sorted(set(per_example["indices"])):
        raise ResultError(f"merged shards hold {len(per_example['indices'])} images in a wrong order or with "
                          f"duplicates, expected the {first['n_ex']} subset images once each")
    clean, after = accuracies(per_example, first["attacks"])
    merged = {k: v for k, v in first.items() if k not in ("shard", "per_example", "log", "output")}
    merged.update({
        "shard": None,
        "merged_from": [r.get("output") for r in ordered],
        "clean_accuracy": clean,
        "robust_accuracy_after": after,
        "robust_accuracy": after[first["attacks"][-1]],
        "time_s": sum(r["time_s"] for r in ordered),
        "wall_s": max(r["wall_s"] for r in ordered),
        "per_example": per_example,
    })
    return merged
