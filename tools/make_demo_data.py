"""Build the embedded demo dataset ("photo digits", 64 px, 10 classes) as train/val .beton files (cached).

    python tools/make_demo_data.py --out DIR     # writes DIR/train.beton, DIR/val.beton and their classes files
"""
from __future__ import annotations

import argparse
import logging
import sys

from rat.data.demo import ensure_demo_betons
from rat.logging import logging_scope, setup_logging


@logging_scope()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        train, val = ensure_demo_betons(args.out)
    except OSError as err:
        print(f"make_demo_data: error: cannot write to {args.out}: {err}", file=sys.stderr)
        return 1
    logging.getLogger("rat.tools.make_demo_data").info("demo dataset ready: %s %s", train, val)
    return 0


if __name__ == "__main__":
    sys.exit(main())
