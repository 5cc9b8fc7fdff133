"""Helpers for tests that drive a real training process."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigterm_after_first_metrics(proc: subprocess.Popen, metrics: Path, timeout: float = 300) -> str:
    """Wait until the run has written its first metrics line, send it SIGTERM (so the signal arrives mid-epoch), wait
    for it to exit and return its stderr."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=timeout)
    return stderr
