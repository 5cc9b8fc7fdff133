"""The argument parser of every rat command line: a bad flag is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["ArgumentParser", "EXIT_BAD_INPUT", "EXIT_FAILED"]

EXIT_FAILED = 1  # a failure during a run (the message says what is intact)
EXIT_BAD_INPUT = 2  # bad input, found before anything ran or was written


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``prog: error: ...; see --help``), not usage + error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")
        sys.exit(EXIT_BAD_INPUT)
