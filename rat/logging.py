"""Logging for rat: module loggers everywhere, console output on the primary rank only, metrics as JSON lines.

rat's command-line entry points own the ``rat`` logger (and the ``py.warnings`` logger of captured warnings) for the
duration of their ``main`` only: :func:`logging_scope` decorates each ``main`` and restores both loggers as it found
them, and :func:`setup_logging` installs rat's handlers inside it, replacing any it installed before. The root logger
and third-party loggers are never touched, so calling several entry points in one process (tests, notebooks, a sweep
script) prints each line once and leaves no handler behind on a stream that has since been closed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The loggers an entry point owns while it runs: rat's own, and the one captured warnings are logged to.
_OWNED = ("rat", "py.warnings")


class _StderrHandler(logging.StreamHandler):
    """A console handler that writes to ``sys.stderr`` as it is when a record is emitted, not as it was when the
    handler was made (a redirected or captured stream may have been closed since)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the live sys.stderr is always used
        pass


def setup_logging(rank: int = 0, log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Install rat's handlers on the ``rat`` logger (and on captured warnings), replacing those of an earlier call.

    Rank 0 logs to stderr (and to ``log_file`` when given); other ranks only log warnings and errors, so a DDP run
    prints each message once. Call it inside :func:`logging_scope` (every entry point's ``main`` is decorated with
    it), which removes the handlers again when ``main`` returns.
    """
    handlers: list[logging.Handler] = [_StderrHandler()]
    handlers[0].setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    if log_file is not None and rank == 0:
        handlers.append(logging.FileHandler(log_file))
        handlers[1].setFormatter(logging.Formatter(_FORMAT))
    for name in _OWNED:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, "rat_owned", False)]:
            logger.removeHandler(handler)
            handler.close()
        for handler in handlers:
            handler.rat_owned = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(level if rank == 0 else logging.WARNING)
        logger.propagate = False  # a host application's root handlers would print every line a second time
    logging.captureWarnings(True)


@contextlib.contextmanager
def logging_scope() -> Iterator[None]:
    """Restore the loggers :func:`setup_logging` configures, and the capture of warnings, on exit. Used as a
    decorator on every entry point's ``main``."""
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in _OWNED}
    showwarning = warnings.showwarning
    try:
        yield
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            for handler in logger.handlers:
                if handler not in handlers:
                    handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        if warnings.showwarning is not showwarning:  # captured in this scope: hand warnings back
            logging.captureWarnings(False)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per call to ``path`` (JSON lines), flushed at once so a killed run keeps its metrics;
    after :meth:`open_tensorboard`, also every record's numbers as TensorBoard scalars."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard: Any = None

    def open_tensorboard(self, folder: str | Path, resumed_at: int | None = None) -> None:
        """Write every record from now on also to TensorBoard event files in ``folder`` (``torch.utils.tensorboard``):
        each number of a record as the scalar ``<kind>/<key>`` (``step/loss``, ``epoch/ema_robust_top1``...) at the
        record's global ``step``. A run resumed from the checkpoint of step ``resumed_at`` appends a new event file
        with ``purge_step = resumed_at + 1``, so the steps a killed run wrote after that checkpoint (and which the
        resumed run writes again) are shown once, as TensorBoard documents for restarts."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(log_dir=str(folder),
                                         purge_step=None if resumed_at is None else resumed_at + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        if self.tensorboard is not None:
            kind, step = record.get("kind", "metrics"), record.get("step")
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, global_step=step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


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


# --- Progress: tqdm bars on a terminal, plain log lines everywhere else (a SLURM job's stdout is a file). ------------
# The one rule every entry point follows (``--logging.progress``, ``rat.eval --progress``, the runner, write_ffcv's
# ``--cfg.progress``, rat.quant's ``progress`` settings).
PROGRESS_SETTINGS = ("auto", "1", "0")
PROGRESS_HELP = "progress bars: auto = only when stderr is a terminal, 1 = always, 0 = never (plain log lines instead)"
_PROGRESS_LINES = 20  # plain lines per loop when the caller gives no interval


def progress_setting(value: Any) -> str:
    """``auto``, ``1`` or ``0`` from a flag, a YAML value (0/1 as numbers) or a library caller's bool.

    Raises:
        ValueError: anything else.
    """
    text = str(int(value)) if isinstance(value, (bool, int)) else str(value).strip()
    if text not in PROGRESS_SETTINGS:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_SETTINGS)}, got {value!r}")
    return text


def bars_enabled(setting: Any) -> bool:
    """Whether progress is drawn as tqdm bars: ``1`` always, ``0`` never, ``auto`` when stderr (where tqdm draws)
    is a terminal."""
    text = progress_setting(setting)
    return text == "1" or (text == "auto" and sys.stderr.isatty())


class LineProgress:
    """tqdm's interface (``update``, ``set_postfix``, ``close``, iteration) as plain log lines: one line every
    ``every`` units and one at the end, ``DESC: n/total (pct%) key=value ... elapsed H:MM:SS, ETA H:MM:SS``, through
    ``logger`` (so that a file log gets them too). No carriage returns, and the number of lines is bounded by
    ``total / every + 1``."""

    def __init__(self, iterable: Any = None, *, total: int | None = None, desc: str = "", every: int | None = None,
                 initial: int = 0, logger: logging.Logger | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.desc = desc
        self.n = self.initial = initial
        self.every = max(1, every if every is not None else -(-(total or 0) // _PROGRESS_LINES) or 1)
        self.logger = logger if logger is not None else logging.getLogger("rat.progress")
        self.postfix: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._next = initial + self.every
        self._shown = initial
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def set_postfix(self, **fields: Any) -> None:
        """Fields shown on the next line."""
        self.postfix = fields

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or (self.total is not None and self.n >= self.total):
            self._line()
            while self._next <= self.n:
                self._next += self.every

    def close(self) -> None:
        if not self.closed and self.n != self._shown:
            self._line()
        self.closed = True

    def _line(self) -> None:
        from tqdm import tqdm

        self._shown = self.n
        elapsed = time.perf_counter() - self._start
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        done = self.n - self.initial
        eta = ""
        if self.total and done > 0:
            eta = f", ETA {tqdm.format_interval((self.total - self.n) * elapsed / done)}"
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}{eta}")
        self.logger.info("%s", " ".join(parts))


def progress(iterable: Any = None, *, total: int | None = None, desc: str = "", setting: Any = "auto",
             every: int | None = None, initial: int = 0, logger: logging.Logger | None = None, **tqdm_kwargs: Any):
    """A progress reporter by the one rule of :func:`bars_enabled`: a tqdm bar (``tqdm_kwargs`` go to it), or a
    :class:`LineProgress` writing a plain line every ``every`` units (default: about 20 lines per loop)."""
    if bars_enabled(setting):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, every=every, initial=initial, logger=logger)


def lines_around_bar(bar: Any) -> contextlib.AbstractContextManager:
    """While ``bar`` is a tqdm bar, route rat's console log lines through ``tqdm.write`` so they do not tear it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm([logging.getLogger("rat")]) if isinstance(bar, tqdm) else contextlib.nullcontext()
