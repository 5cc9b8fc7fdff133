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


class MetricsError(ValueError):
    """A metrics file that cannot be read back (a damaged line other than a torn last one)."""


def read_metrics(path: str | Path, torn: list[str] | None = None) -> list[dict[str, Any]]:
    """Read a JSON-lines metrics file back. A last line cut short by a kill is skipped (and appended to ``torn``,
    when given); any other unreadable line raises :class:`MetricsError` naming it."""
    lines = Path(path).read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if not any(rest.strip() for rest in lines[number:]):  # the last line: a write cut short
                if torn is not None:
                    torn.append(line)
                continue
            raise MetricsError(f"{path} line {number} is not JSON ({exc.msg}): the file is damaged") from exc
        if not isinstance(record, dict):
            raise MetricsError(f"{path} line {number} is not a metrics record")
        records.append(record)
    return records
