"""Shared fixtures: the embedded demo dataset written once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_betons(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.beton, val.beton) of the embedded demo dataset, written once per session to a tmp dir that parallel
    workers (pytest-xdist) share: ``ensure_demo_betons`` lets one of them write while the others wait."""
    from rat.data.demo import ensure_demo_betons

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "demo"
    return ensure_demo_betons(root)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the two workers share the machine's cores: one intra-op thread each, instead of each
    worker's torch spreading over every core and the two fighting for them."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        import torch

        torch.set_num_threads(1)
