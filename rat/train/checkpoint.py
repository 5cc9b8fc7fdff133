"""Self-describing training checkpoints, written atomically, and the RNG state that makes a resumed run exact."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rat.io import atomic_write

_logger = logging.getLogger(__name__)

LAST = "last.pt"


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`rat.io.atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def save_training_checkpoint(state: dict[str, Any], checkpoint_dir: str | Path, names: list[str]) -> Path:
    """Write ``state`` under each of ``names`` (e.g. ``epoch_0003.pt``, ``best.pt``), then as ``last.pt``, which is
    therefore always the newest complete checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    for name in names:
        save_atomic(state, checkpoint_dir / name)
    return save_atomic(state, checkpoint_dir / LAST)


def find_resume_checkpoint(resume: str, run_dir: str | Path) -> Path | None:
    """Resolve ``training.resume``: '' → None, 'auto' → ``run_dir/checkpoints/last.pt`` if it exists, else a path."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(run_dir) / "checkpoints" / LAST
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"training.resume={resume}: no such checkpoint file (use 'auto' to resume the run "
                                "directory's newest checkpoint, or '' to start fresh)")
    return path


def rng_state(augment_generator: torch.Generator | None) -> dict[str, Any]:
    """This process's RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "augment": augment_generator.get_state() if augment_generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], augment_generator: torch.Generator | None) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if augment_generator is not None and state.get("augment") is not None:
        augment_generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
