"""Logging for rat: module loggers everywhere, console output on the primary rank only, metrics as JSON lines."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int = 0, log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger once per process.

    Rank 0 logs to stderr (and to ``log_file`` when given); other ranks only log warnings and errors, so a DDP run
    prints each message once.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(file_handler)
    logging.captureWarnings(True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per call to ``path`` (JSON lines), flushed at once so a killed run keeps its metrics."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines metrics file back."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
