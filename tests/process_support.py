"""Helpers for tests that drive real runs: the environment of a subprocess, ``python -m rat.train`` in this process,
or SIGTERM to a run."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: rat importable, one OpenMP thread (the cores are shared with the other
    xdist worker), and this interpreter for the shell scripts (``run_train.sh`` reads ``PYTHON``), plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def sigterm_after_first_metrics(proc: subprocess.Popen, metrics: Path, timeout: float = 300) -> str:
    """Wait until the run has written its first metrics line, send it SIGTERM (so the signal arrives mid-epoch), wait
    for it to exit and return its stderr."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)  # a run that ends before its first metrics line is a failure: report it, do not wait
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=timeout)
    return stderr


@contextlib.contextmanager
def _process_state_restored():
    """Undo the SIGTERM handler ``rat.train`` installs for its process (its ``main`` restores logging itself), so
    that runs in this process leave pytest and the next run as they found them."""
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def train_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m rat.train ARGV`` in this process: its exit status and what it wrote to stderr."""
    from rat.train.__main__ import main

    stderr = io.StringIO()
    with _process_state_restored(), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return subprocess.CompletedProcess(["rat.train", *argv], status, "", stderr.getvalue())
