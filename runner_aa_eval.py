#!/usr/bin/env python
"""Bulk AutoAttack evaluations: checkpoints × threat models × resolutions × versions on free GPUs or CPU slots.

Usage::

    python runner_aa_eval.py --jobs configs/eval/jobs_example.yaml --dry-run
    python runner_aa_eval.py --jobs jobs.yaml --max-load 0.1 --max-memory 0.1 --exclude-gpus 7
    python runner_aa_eval.py --checkpoints a.pth b.pth --data val.beton --threats Linf L2 L1 \\
        --resolutions 224 256 --versions standard --output-dir runs/aa_eval

See ``rat.eval.sweep.runner`` and docs/eval.md.
"""
import sys

from rat.eval.sweep.runner import main

if __name__ == "__main__":
    sys.exit(main())
