"""Resumable evaluation state: per-batch, per-attack robust flags, saved atomically after every attack of every batch.

The state file (JSON, next to the result: ``<result>.state.json``) holds

* ``fingerprint``: everything the numbers depend on (checkpoint hash, architecture, threat model, resolution, attacks
  and their settings, seed, batch size, the image indices, precision). A state whose fingerprint differs from the
  current evaluation is refused, never mixed in.
* ``batches``: for every batch id, the flags after each finished step (``clean``, then each attack in order) as
  strings of ``0``/``1`` and the seconds spent on it.
* ``runs``: one record per process that worked on it, with how many batches and attack steps it computed, so a
  resumed run can show that it did not redo finished work.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the old state (and the folder
fsync'ed), so a process killed at any moment leaves either the old or the new state, never a torn file; the next
start removes the temporary file a killed write left. While a process works on an evaluation it holds a lock
(``<state>.lock``, :class:`rat.io.FileLock`): a second process on the same result is refused instead of interleaving
its batches, and a killed process's lock never blocks the next start.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rat.io import FileLock, atomic_write, remove_stale_temps

__all__ = ["EvalState", "StateBusyError", "StateMismatchError", "atomic_write_json"]

_logger = logging.getLogger(__name__)

STATE_FORMAT = "rat.eval.state/1"


class StateMismatchError(ValueError):
    """A state file belongs to another evaluation."""


class StateBusyError(ValueError):
    """Another live process is computing the same evaluation."""


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`rat.io.atomic_write`)."""
    def write(handle) -> None:
        json.dump(obj, handle, indent=1)
        handle.write("\n")

    atomic_write(path, write, mode="w")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def flags_to_str(flags: Any) -> str:
    """Bool flags (tensor, array or list) as a string of 0/1."""
    return "".join("1" if bool(f) else "0" for f in flags)


def str_to_flags(text: str) -> list[bool]:
    """The inverse of ``flags_to_str``."""
    return [c == "1" for c in text]


_LOCKS: dict[Path, FileLock] = {}


def _diff(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))


class EvalState:
    """The progress of one evaluation (see the module docstring); ``save()`` after every change.

    Args:
        path: the state file.
        fingerprint: the evaluation's fingerprint (JSON-serializable dict).
        steps: ``['clean', attack1, attack2, ...]``.
    """

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], steps: list[str]):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalized as it will be read back
        self.steps = list(steps)
        self.batches: dict[int, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        lock_path = self.path.with_name(self.path.name + ".lock")
        # One lock per state file and process: an in-process retry after a failed run (the API, tests) reuses it.
        self.lock = _LOCKS.setdefault(lock_path.resolve(), FileLock(lock_path))

    @classmethod
    def load_or_create(cls, path: str | Path, fingerprint: dict[str, Any], steps: list[str]) -> EvalState:
        """Read the state at ``path`` if there is one (it must have the same fingerprint), else start a new one.

        Raises:
            StateMismatchError: the file belongs to a different evaluation or is not a rat state file.
            StateBusyError: another live process works on this evaluation.
        """
        state = cls(path, fingerprint, steps)
        if not state.lock.held and not state.lock.try_acquire():
            raise StateBusyError(f"another process ({state.lock.holder()}) is computing this evaluation "
                                 f"({state.path}): wait for it to finish, or pass another --output")
        for tmp in remove_stale_temps(state.path.parent, state.path.name):
            _logger.info("removed %s, left by a killed write", tmp)
        try:
            state._read()
        except BaseException:
            state.close(finished=False)
            raise
        state.runs.append({"started": _now(), "batches_computed": 0, "steps_computed": 0})
        return state

    def _read(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StateMismatchError(f"state file {self.path} is not valid JSON ({exc}): delete it to start "
                                     "the evaluation over") from exc
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise StateMismatchError(f"{self.path} is not a rat.eval state file: delete it or pass another --output")
        if data["fingerprint"] != self.fingerprint:
            differs = ", ".join(_diff(self.fingerprint, data["fingerprint"]))
            raise StateMismatchError(
                f"state file {self.path} was written by a different evaluation (differs in: {differs}); "
                "delete it to start over, or pass another --output")
        self.batches = {int(k): v for k, v in data["batches"].items()}
        self.runs = list(data["runs"])

    def close(self, finished: bool) -> None:
        """Release the lock; with ``finished`` (the result is written) delete the state file first."""
        if finished:
            self.path.unlink(missing_ok=True)
        self.lock.release()
        _LOCKS.pop(self.lock.path.resolve(), None)

    def done_steps(self, batch: int) -> list[str]:
        """The steps finished for ``batch``, in order."""
        entry = self.batches.get(batch)
        return [] if entry is None else [s for s in self.steps if s in entry["flags"]]

    def is_done(self, batch: int) -> bool:
        """Whether every step of ``batch`` is finished."""
        return len(self.done_steps(batch)) == len(self.steps)

    def flags(self, batch: int, step: str) -> list[bool]:
        """The flags of ``batch`` after ``step``."""
        return str_to_flags(self.batches[batch]["flags"][step])

    def record(self, batch: int, step: str, flags: Any, seconds: float) -> None:
        """Record a finished step of a batch and save the state."""
        entry = self.batches.setdefault(batch, {"flags": {}, "time_s": 0.0})
        entry["flags"][step] = flags_to_str(flags)
        entry["time_s"] += seconds
        run = self.runs[-1]
        run["steps_computed"] += 1
        if len(self.done_steps(batch)) == len(self.steps):
            run["batches_computed"] += 1
        self.save()

    def total_time(self) -> float:
        """Seconds spent on all recorded steps, over every run."""
        return float(sum(entry["time_s"] for entry in self.batches.values()))

    def save(self) -> None:
        """Write the state atomically."""
        atomic_write_json(self.path, {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "steps": self.steps,
            "batches": {str(k): v for k, v in sorted(self.batches.items())},
            "runs": self.runs,
        })
