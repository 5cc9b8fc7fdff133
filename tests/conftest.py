"""Shared fixtures: the embedded demo dataset written once per test session, and expensive runs made once."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from rat.io import FileLock


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tmp dir of this session that every pytest-xdist worker sees (each worker's own basetemp is below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@pytest.fixture(scope="session")
def demo_betons(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.beton, val.beton) of the embedded demo dataset, written once per session to a tmp dir that parallel
    workers (pytest-xdist) share: ``ensure_demo_betons`` lets one of them write while the others wait."""
    from rat.data.demo import ensure_demo_betons

    return ensure_demo_betons(_shared_root(tmp_path_factory) / "demo")


@pytest.fixture(scope="session")
def once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], None]], Path]:
    """``once(name, build)``: a folder that ``build(folder)`` has filled, built by one worker of the session only.

    pytest-xdist runs a module's tests on either worker (worksteal), and a module- or session-scoped fixture then runs
    on each worker that needs it; for runs of 15-40 s (torchrun starts, a trained model) the other worker waits for the
    first one's folder instead. A build that fails leaves no folder marked done, so the next caller builds again."""
    root = _shared_root(tmp_path_factory) / "once"

    def get(name: str, build: Callable[[Path], None]) -> Path:
        folder = root / name
        with FileLock(root / f"{name}.lock").acquire():
            if not (folder / ".done").exists():
                folder.mkdir(parents=True, exist_ok=True)
                build(folder)
                (folder / ".done").touch()
        return folder

    return get


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the two workers share the machine's cores: one intra-op thread each, instead of each
    worker's torch spreading over every core and the two fighting for them."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        import torch

        torch.set_num_threads(1)
