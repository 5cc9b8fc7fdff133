#!/usr/bin/env python
"""Write an evaluated model's entry in RobustBench's model-info JSON format.

RobustBench keeps one JSON per model in ``model_info/<dataset>/<threat model>/<ModelName>.json`` with the fields
``link, name, authors, additional_data, number_forward_passes, dataset, venue, architecture, eps, clean_acc,
reported, autoattack_acc, footnote, unreliable``; accuracies are percentages as strings with two decimals and
``eps`` is a string such as ``4/255``. This tool fills ``dataset, eps, clean_acc, autoattack_acc`` (and ``reported``,
the same number unless given) from a rat.eval result and takes the paper metadata from flags.

RobustBench's leaderboards use full AutoAttack (``standard``) on 5000 ImageNet val images at the model's
resolution; the tool refuses other results unless ``--allow-nonstandard`` is given, and then says so in ``footnote``.

Whether the model normalizes its input decides which function RobustBench must build around the weights, so the
entry's ``footnote`` states it. It comes from the result (``rat.eval`` records it) or from ``--normalize 0|1``; a
result that does not record it (written before rat recorded it) needs the flag, and a flag that contradicts the
result is refused.

Example::

    python tools/export_robustbench.py runs/aa_eval/convnext_b/Linf-4_255_r224_standard_n5000.json \\
        --model-name Singh2023Revisiting_ConvNeXt-B-ConvStem --architecture "ConvNeXt-B + ConvStem" \\
        --link https://arxiv.org/abs/2303.01870 --venue "NeurIPS 2023" \\
        --paper-name "Revisiting Adversarial Training for ImageNet: ..." \\
        --authors "Naman D Singh, Francesco Croce, Matthias Hein" --out-dir robustbench/model_info
"""
from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rat.cli import EXIT_BAD_INPUT, ArgumentParser
from rat.eval.results import ResultError, format_eps, load_result
from rat.io import atomic_write
from rat.logging import logging_scope, setup_logging

_logger = logging.getLogger("rat.tools.export_robustbench")

ROBUSTBENCH_N_EX = 5000
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


class ExportError(ValueError):
    """A result that cannot be exported as asked."""


def robustbench_entry(result: dict[str, Any], *, link: str | None = None, name: str | None = None,
                      authors: str | None = None, additional_data: bool = False, venue: str | None = None,
                      architecture: str | None = None, reported: float | None = None, footnote: str | None = None,
                      dataset: str = "imagenet", allow_nonstandard: bool = False,
                      normalize: bool | None = None) -> dict[str, Any]:
    """The RobustBench model-info dict of a rat.eval result.

    Args:
        result: a rat.eval result (``rat.eval.results.load_result``).
        link: paper URL.
        name: paper title.
        authors: comma-separated authors.
        additional_data: whether training used data beyond the dataset's train split.
        venue: e.g. ``NeurIPS 2023``.
        architecture: e.g. ``ConvNeXt-B + ConvStem`` (default: the result's arch).
        reported: the robust accuracy the paper reports, in %; default the evaluated one.
        footnote: free text.
        dataset: RobustBench dataset name.
        allow_nonstandard: export a result that is not full AutoAttack with standard settings on 5000 images.
        normalize: whether the model normalizes its input; None: what the result records.

    Raises:
        ExportError: a non-standard result without ``allow_nonstandard``, a sharded (partial) result, or an unknown
            or contradicting input normalization.
    """
    recorded = result.get("normalize")
    if recorded is None and normalize is None:
        raise ExportError("the result does not record whether the model normalizes its input (it predates rat "
                          "recording it): pass --normalize 1 (ImageNet mean/std inside the model) or --normalize 0")
    if recorded is not None and normalize is not None and bool(recorded) != bool(normalize):
        raise ExportError(f"--normalize {int(normalize)} contradicts the result, which was evaluated with "
                          f"normalize={bool(recorded)}: drop --normalize")
    normalize = bool(recorded if recorded is not None else normalize)
    if result.get("shard"):
        raise ExportError("this is one shard of an evaluation: merge the shards first (python -m rat.eval.merge)")
    problems = []
    if result["version"] != "standard":
        problems.append(f"AutoAttack version {result['version']}")
    if not result.get("standard_settings", True):
        problems.append("non-standard attack settings (--n-iter/--n-queries)")
    if result["n_ex"] != ROBUSTBENCH_N_EX:
        problems.append(f"{result['n_ex']} images instead of {ROBUSTBENCH_N_EX}")
    if problems and not allow_nonstandard:
        raise ExportError(f"RobustBench entries are full AutoAttack on {ROBUSTBENCH_N_EX} images; this result has "
                          f"{'; '.join(problems)}. Pass --allow-nonstandard to export it anyway (noted in footnote)")
    notes = [footnote] if footnote else []
    notes.append("Input normalization inside the model: ImageNet mean/std." if normalize else
                 "No input normalization (the model takes [0, 1] pixels).")
    if problems:
        notes.append(f"Evaluated with {'; '.join(problems)}.")
    note = " ".join(notes)
    robust = 100 * result["robust_accuracy"]
    return {
        "link": link,
        "name": name,
        "authors": authors,
        "additional_data": additional_data,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": venue,
        "architecture": architecture or result.get("arch"),
        "eps": format_eps(result["norm"], result["eps"]),
        "clean_acc": f"{100 * result['clean_accuracy']:.2f}",
        "reported": f"{reported if reported is not None else robust:.2f}",
        "autoattack_acc": f"{robust:.2f}",
        "footnote": note,
        "unreliable": False,
    }


@logging_scope()
def main(argv: Sequence[str] | None = None) -> int:
    """Write the entry to ``<out-dir>/<dataset>/<norm>/<model-name>.json`` (or stdout); 0 on success, 2 on error."""
    parser = ArgumentParser(prog="export_robustbench.py",
                            description="Write an evaluated model's entry in RobustBench's model-info JSON format.")
    parser.add_argument("result", type=Path, help="rat.eval result JSON")
    parser.add_argument("--model-name", required=True, help="RobustBench id, <Author><Year><FirstWord>_<Arch>")
    parser.add_argument("--link")
    parser.add_argument("--paper-name", help="paper title (RobustBench field 'name')")
    parser.add_argument("--authors")
    parser.add_argument("--venue")
    parser.add_argument("--architecture")
    parser.add_argument("--additional-data", action="store_true")
    parser.add_argument("--reported", type=float, help="robust accuracy reported in the paper, in %%")
    parser.add_argument("--footnote")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--allow-nonstandard", action="store_true", help="export a fast/custom or <5000-image result")
    parser.add_argument("--out-dir", type=Path, help="RobustBench model_info folder; default: print to stdout")
    parser.add_argument("--normalize", type=int, choices=(0, 1),
                        help="whether the model normalizes its input (default: what the result records)")
    args = parser.parse_args(argv)
    setup_logging(0)
    if not _MODEL_NAME.match(args.model_name):
        _logger.error("--model-name %r: use letters, digits and _.+- only (it is a file name)", args.model_name)
        return EXIT_BAD_INPUT
    if args.reported is not None and not 0 <= args.reported <= 100:
        _logger.error("--reported %g: a robust accuracy in %%, between 0 and 100", args.reported)
        return EXIT_BAD_INPUT
    try:
        result = load_result(args.result)
        entry = robustbench_entry(result, link=args.link, name=args.paper_name, authors=args.authors,
                                  additional_data=args.additional_data, venue=args.venue,
                                  architecture=args.architecture, reported=args.reported, footnote=args.footnote,
                                  dataset=args.dataset, allow_nonstandard=args.allow_nonstandard,
                                  normalize=None if args.normalize is None else bool(args.normalize))
    except (ResultError, ExportError) as exc:
        _logger.error("%s", exc)
        return EXIT_BAD_INPUT
    text = json.dumps(entry, indent=2) + "\n"
    if args.out_dir is None:
        sys.stdout.write(text)
        return 0
    path = args.out_dir / args.dataset / result["norm"] / f"{args.model_name}.json"
    if path.is_file() and path.read_text() != text:  # never replace another result's entry without a word
        _logger.error("%s already holds a different entry for %s; refusing to replace it: remove it first, or pass "
                      "another --model-name or --out-dir", path, args.model_name)
        return EXIT_BAD_INPUT
    try:
        atomic_write(path, lambda handle: handle.write(text), mode="w")
    except OSError as exc:
        _logger.error("cannot write %s (%s): choose another --out-dir", path, exc.strerror or exc)
        return EXIT_BAD_INPUT
    _logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
