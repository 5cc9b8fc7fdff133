"""``python -m rat.eval``: one AutoAttack evaluation of a checkpoint; writes a JSON result and a log, prints one line.

Example::

    python -m rat.eval --checkpoint runs/convnext_b/checkpoint.pth --data /data/imagenet/val.beton \\
        --norm Linf --eps 4/255 --resolution 224 --version standard --n-ex 5000 --batch-size 100 --precision bf16

Run the same command again after an interruption to resume; see docs/eval.md. The flags are those of
:class:`rat.eval.spec.EvalSpec` (:mod:`rat.eval.cli`).
"""
import sys

from rat.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
