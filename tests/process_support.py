"""Helpers for tests that drive real runs: the environment of a subprocess, ``python -m rat.train`` in this process,
or SIGTERM to a run."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """``tools/<name>.py`` as a module, imported as the script sees itself (tools/ on the path, for ``_timing``)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "tools"))


def stop_after_checks(n: int):
    """Epoch hooks whose stop request (as SIGTERM's) comes at the ``n``-th check: ``train_one_epoch`` checks once per
    loader batch (micro-batch), and stops at the end of the optimizer step in progress."""
    from rat.train.engine import EpochHooks

    class StopAfterChecks(EpochHooks):
        def __init__(self) -> None:
            self.calls = 0

        def stop_requested(self) -> bool:
            self.calls += 1
            return self.calls >= n

    return StopAfterChecks()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: rat importable, one OpenMP thread (the cores are shared with the other
    xdist worker), and this interpreter for the shell scripts (``run_train.sh`` reads ``PYTHON``), plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def signal_group_after_first_metrics(proc: subprocess.Popen, metrics: Path, signals: list[int],
                                     timeout: float = 300) -> str:
    """Wait until the run has written its first metrics line (so that a signal arrives mid-epoch), send each of
    ``signals`` to the whole process group of ``proc`` (started with ``start_new_session=True``), as a terminal's
    Ctrl-C or scancel send them, wait for it to exit and return its stderr."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)
    for signum in signals:
        os.killpg(proc.pid, signum)
        time.sleep(0.2)
    _, stderr = proc.communicate(timeout=timeout)
    return stderr


@contextlib.contextmanager
def _process_state_restored():
    """Undo the SIGTERM and SIGINT handlers ``rat.train`` installs for its process (its ``main`` restores logging
    itself), so that runs in this process leave pytest and the next run as they found them."""
    sigterm, sigint = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        signal.signal(signal.SIGINT, sigint)


def train_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m rat.train ARGV`` in this process: its exit status and what it wrote to stderr."""
    from rat.train.__main__ import main

    stderr = io.StringIO()
    with _process_state_restored(), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return subprocess.CompletedProcess(["rat.train", *argv], status, "", stderr.getvalue())


def layernorm_classifier() -> torch.nn.Module:
    """A tiny LayerNorm classifier (ConvNeXt's channel LayerNorm, timm ``LayerNorm2d``, and a LayerNorm before the
    head), the same initial weights at every call: an image's output does not depend on the rest of its batch, so
    gradient accumulation and data parallelism must reproduce one large batch (the in-process and torchrun checks)."""
    import torch
    from timm.layers import LayerNorm2d
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), LayerNorm2d(8), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2),
                             nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 10))


def fixed_images(n: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fixed random images of ``size`` px in [0, 1] and labels of 10 classes (the same in every process)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)
