"""Self-describing training checkpoints, written atomically, and the RNG state that makes a resumed run exact."""
from __future__ import annotations

import logging
import random
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rat.io import atomic_write, remove_stale_temps
from rat.models import CheckpointError, load_checkpoint_file
from rat.train.distributed import broadcast_object

_logger = logging.getLogger(__name__)

LAST = "last.pt"
# Settings that may differ between a checkpoint's recorded config and the config that resumes it: those that do not
# change what the run computes (where it logs, how often it saves or validates, where the data lives, how it is
# launched), and the schedule knobs that apply cleanly from the next step on (epochs, the lr schedule, gradient
# clipping). Everything else (architecture, classes, optimizer, attack, augmentation, batch size, precision, seed...)
# is refused on resume: it would crash mid-epoch or silently mix two different runs.
RESUME_MAY_CHANGE = ("training.epochs", "lr.*", "training.grad_clip", "training.resume", "training.save_every",
                     "training.limit_batches",
                     "training.device", "logging.*", "validation.*", "dist.*", "data.num_workers", "data.in_memory",
                     "data.train_dataset", "data.val_dataset", "data.demo_root", "model.init_checkpoint",
                     "model.compile", "model.channels_last", "ema.cpu", "training.fused",
                     "training.cudnn_benchmark")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is intact."""


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`rat.io.atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def save_training_checkpoint(state: dict[str, Any], checkpoint_dir: str | Path, names: list[str],
                             keep: int | None = None) -> Path:
    """Write ``state`` under each of ``names`` (e.g. ``epoch_0003.pt``, ``best.pt``), then as ``last.pt``, which is
    therefore always the newest complete checkpoint; then, when an ``epoch_NNNN.pt`` was among them and ``keep`` is
    given, delete all but the newest ``keep`` epoch files (:func:`prune_epoch_checkpoints`).

    Raises:
        CheckpointWriteError: a write failed (its temporary file is removed; ``last.pt`` is the previous one, and
            nothing was deleted).
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / LAST
    try:
        for name in names:
            path = checkpoint_dir / name
            save_atomic(state, path)
        path = checkpoint_dir / LAST
        save_atomic(state, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError (inline_container.cc)
        last = checkpoint_dir / LAST
        intact = f"the previous checkpoint {last} is intact" if last.exists() else "no earlier checkpoint exists"
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
        raise CheckpointWriteError(f"could not write checkpoint {path} ({reason}); {intact}: free disk space (or fix "
                                   "the folder's permissions) and resume with --training.resume auto") from exc
    if keep is not None and any(_epoch_number(Path(name)) is not None for name in names):
        prune_epoch_checkpoints(checkpoint_dir, keep)
    return path


def _epoch_number(path: Path) -> int | None:
    """N of a file named ``epoch_N.pt``, else None."""
    stem = path.name.removeprefix("epoch_").removesuffix(".pt")
    return int(stem) if path.name.startswith("epoch_") and path.name.endswith(".pt") and stem.isdigit() else None


def epoch_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """The ``epoch_N.pt`` files of a run, oldest first (by N, so that epoch 10000 comes after epoch 9999)."""
    found = [p for p in Path(checkpoint_dir).glob("epoch_*.pt") if _epoch_number(p) is not None]
    return sorted(found, key=_epoch_number)


def prune_epoch_checkpoints(checkpoint_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` (>= 1) ``epoch_N.pt`` files; ``best.pt``, ``last.pt`` and anything else stay.
    Returns the deleted paths.

    Called only right after a new epoch file and ``last.pt`` were written whole (atomically), so the newest epoch file
    always stays: with ``last.pt``, two complete copies of the newest state, and a damaged ``last.pt`` still leaves
    ``--training.resume auto`` a readable checkpoint. A file that cannot be deleted is a warning, not a failure.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least the newest epoch checkpoint")
    removed = []
    for path in epoch_checkpoints(checkpoint_dir)[:-keep]:
        try:
            path.unlink()
        except OSError as exc:
            _logger.warning("could not delete %s (%s): it stays", path, exc.strerror or exc)
            continue
        removed.append(path)
    if removed:
        _logger.info("deleted %s (logging.keep_checkpoints=%d)", ", ".join(p.name for p in removed), keep)
    return removed


def save_on_primary(state: dict[str, Any], checkpoint_dir: str | Path, names: list[str], *,
                    primary: bool, keep: int | None = None) -> Path | None:
    """Rank 0 writes ``state`` (:func:`save_training_checkpoint`, deleting old epoch files as ``keep`` says), and every
    rank learns whether it did (a collective).

    Returns the path written on rank 0, None on the others.

    Raises:
        CheckpointWriteError: on every rank when rank 0's write failed, so that the other ranks stop with the same
            message instead of waiting, in their next collective, for a rank that has gone.
    """
    path, error = None, None
    if primary:
        try:
            path = save_training_checkpoint(state, checkpoint_dir, names, keep)
        except CheckpointWriteError as err:
            error = err
    message = broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointWriteError(message)
    return path


def remove_failed_writes(checkpoint_dir: str | Path) -> list[Path]:
    """Remove (and return) the temporary files of checkpoint writes that a killed run left behind."""
    removed = remove_stale_temps(checkpoint_dir)
    for tmp in removed:
        _logger.warning("removed %s, the temporary file of a checkpoint write that was killed", tmp)
    return removed


def load_resume_checkpoint(resume: str, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """Resolve and read ``training.resume``: '' → None; 'auto' → ``run_dir/checkpoints/last.pt``, or, when that is
    unreadable (a damaged disk, a copy cut short), the newest readable ``epoch_NNNN.pt`` with a warning naming both;
    None when the run has no checkpoint yet; otherwise the given path.

    Raises:
        FileNotFoundError: an explicit path that does not exist.
        CheckpointError: an explicit checkpoint, or every checkpoint of the run, is unreadable.
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"training.resume={resume}: no such checkpoint file (use 'auto' to resume the run "
                                    "directory's newest checkpoint, or '' to start fresh)")
        return path, load_checkpoint_file(path)
    folder = Path(run_dir) / "checkpoints"
    candidates = [p for p in [folder / LAST] if p.is_file()] + epoch_checkpoints(folder)[::-1]
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint_file(path)
        except CheckpointError as exc:
            problems.append((path, exc))
            continue
        if problems:
            _logger.warning("%s is unreadable (%s); resuming from %s, the newest readable checkpoint, instead",
                            problems[0][0], problems[0][1], path)
        return path, state
    if problems:
        raise CheckpointError(f"no readable checkpoint in {folder}: {problems[0][1]}; move the damaged files away "
                              "and resume from a copy, or start fresh with --training.resume ''")
    return None


def config_changes(recorded: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]],
                   ) -> tuple[list[str], list[str]]:
    """The settings that differ between a checkpoint's recorded config and the current one, as ``section.name: old ->
    new``, split into (refused, allowed) by ``RESUME_MAY_CHANGE``. Keys one side does not have (written by another rat
    version) are not compared."""
    refused, allowed = [], []
    for section, values in current.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            old = recorded.get(section, {}).get(name, value)
            if old != value:
                may = any(fnmatch(key, pattern) for pattern in RESUME_MAY_CHANGE)
                (allowed if may else refused).append(f"{key}: {old!r} -> {value!r}")
    return refused, allowed


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
