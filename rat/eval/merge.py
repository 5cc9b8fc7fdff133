"""``python -m rat.eval.merge SHARD.json ... --output RESULT.json``: merge the shard results of one evaluation.

The runner merges shards itself; this is for shards run by hand (``python -m rat.eval ... --shard i/K`` on K GPUs or
K machines). The merged result equals an unsharded run: see ``rat.eval.results.merge_results``.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rat.cli import EXIT_BAD_INPUT, ArgumentParser
from rat.eval.results import ResultError, load_result, merge_results, summary_line
from rat.eval.state import atomic_write_json
from rat.logging import logging_scope, setup_logging

_logger = logging.getLogger("rat.eval.merge")


@logging_scope()
def main(argv: Sequence[str] | None = None) -> int:
    """Merge shard results; returns 0 on success, 2 when the shards do not form one evaluation."""
    parser = ArgumentParser(prog="python -m rat.eval.merge",
                                     description="Merge the shard results of one evaluation.")
    parser.add_argument("shards", nargs="+", type=Path, help="shard result JSON files (written with --shard)")
    parser.add_argument("--output", type=Path, required=True, help="merged result JSON")
    args = parser.parse_args(argv)
    setup_logging(0)
    from rat.eval.evaluate import check_output
    from rat.eval.spec import IDENTITY_KEYS

    try:
        merged = merge_results([load_result(p) for p in args.shards])
        # never replace another result (or one of the shards): only this same evaluation's merged result
        check_output(args.output, {k: merged.get(k) for k in IDENTITY_KEYS})
    except (ResultError, ValueError) as exc:
        _logger.error("%s", exc)
        return EXIT_BAD_INPUT
    merged["output"] = str(args.output)
    atomic_write_json(args.output, merged)
    print(summary_line(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
