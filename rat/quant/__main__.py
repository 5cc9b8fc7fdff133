"""``python -m rat.quant SUBCOMMAND``: post-training quantization, sweeps, fits and data-free robustness estimation.

Subcommands (each with its own fastargs Sections, rat/quant/sections.py, and its body in rat/quant/commands.py;
``--help`` after the subcommand lists them)::

    python -m rat.quant ptq --qmodel.checkpoint runs/demo/checkpoints/best.pt --ptq.format int8 --ptq.output q.pt
    python -m rat.quant sweep --qmodel.checkpoint CKPT --sweep.output runs/quant/demo
    python -m rat.quant fit --fit.sweeps a/sweep.jsonl,b/sweep.jsonl --fit.output runs/quant/fit.png
    python -m rat.quant generate --qmodel.checkpoint CKPT --qdata.guide_n 100 --generate.output runs/quant/gen.pt
    python -m rat.quant estimate --qmodel.checkpoint CKPT --estimate.generated runs/quant/gen.pt --qdata.n_ex 200 \\
        --estimate.formats int8,int4,pot4 --estimate.real 1 --estimate.output runs/quant/estimate.json

``generate`` measures its targets on the guide part of ``qdata.data`` (or takes them as given, measured there);
``estimate.real`` scores only on the images after it and refuses any overlap (docs/quant.md).

Bad input (unknown format, bits out of range, invalid e/m split, no quantizable layer, too few calibration images,
an output that exists) is one ``rat.quant: error:`` line and exit status 2; nothing is written.
"""
from __future__ import annotations

import sys

from rat.config import ConfigError, config_to_dict, make_config
from rat.data.meta import ClassMismatchError
from rat.logging import logging_scope, setup_logging
from rat.models import CheckpointError
from rat.quant.commands import COMMANDS
from rat.quant.fit import FitError
from rat.quant.formats import FormatError
from rat.quant.generator import GeneratorError
from rat.quant.ptq import QuantizationError
from rat.quant.sections import QUANT_SUBCOMMANDS, declare_quant_sections

_USAGE = f"usage: python -m rat.quant {{{','.join(QUANT_SUBCOMMANDS)}}} [--config-file F] [--section.param V ...]"
_BAD_INPUT = (ConfigError, FormatError, QuantizationError, GeneratorError, CheckpointError, FitError,
              ClassMismatchError, FileNotFoundError, FileExistsError)
_SUBCOMMAND_HELP = {
    "ptq": "quantize one checkpoint to one format",
    "sweep": "clean/robust accuracy and similarity of one model at every format",
    "fit": "fit accuracy loss against similarity across sweeps (R² per model and overall, plot)",
    "generate": "train and adjust a label-conditioned generator (data-free evaluation set)",
    "estimate": "clean/robust accuracy of FP and quantized models on a generated set",
}


@logging_scope()
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"{_USAGE}\n\nsubcommands:")
        for sub in QUANT_SUBCOMMANDS:
            print(f"  {sub:<9} {_SUBCOMMAND_HELP[sub]}")
        print("\n`python -m rat.quant SUBCOMMAND --help` lists a subcommand's parameters; see docs/quant.md.")
        return 0
    if not argv or argv[0] not in QUANT_SUBCOMMANDS:
        given = f" (got {argv[0]!r})" if argv else ""
        print(f"rat.quant: error: give a subcommand first{given}\n{_USAGE}", file=sys.stderr)
        return 2
    sub = argv[0]
    setup_logging(0)
    try:
        config = make_config(argv[1:], prog=f"python -m rat.quant {sub}", description=f"rat.quant {sub}",
                             declare=declare_quant_sections(sub))
        return COMMANDS[sub](config_to_dict(config))
    except _BAD_INPUT as err:
        print(f"rat.quant: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
