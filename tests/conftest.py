"""Shared fixtures: the embedded demo dataset written once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_betons(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.beton, val.beton) of the embedded demo dataset, written to a session tmp dir."""
    from rat.data.demo import ensure_demo_betons

    return ensure_demo_betons(tmp_path_factory.mktemp("demo"))
