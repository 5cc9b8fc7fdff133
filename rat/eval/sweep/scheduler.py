"""The runner's scheduler: which results count as finished, shard merging, and the loop that runs each task in a free
slot (:mod:`rat.eval.sweep.slots`: a ``python -m rat.eval`` subprocess or a SLURM job), with claims that make several
runners on one jobs file safe, and signal forwarding.

* Each task (a job, or one shard) is claimed with a lock file next to its result (:class:`rat.io.FileLock`, a
  ``flock``) before it starts. Two runners on the same jobs file therefore never run a task twice: the second one
  leaves a claimed task to its owner, and counts it as finished when the owner's result appears. A runner that dies
  (even by SIGKILL) loses its claims with its process, so its tasks are taken over and resume from their state files.
* SIGTERM or SIGINT (Ctrl-C) to the runner is forwarded to its running evaluations (which run in their own sessions,
  so a terminal's Ctrl-C reaches only the runner); it waits for them, releases its claims and returns. A runner that
  is killed outright (SIGKILL, the OOM killer) takes its evaluations with it: on Linux each is started with a
  parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), so none is left running unclaimed.
* With ``SubmititSlots`` the tasks run as SLURM jobs (submitit; its local executor for tests) instead of local
  subprocesses, under the same claims, skips, failure marks and merges: the runner holds a task's claim while its job
  runs and treats the job's exit status as it treats a subprocess's.
* A task that failed is not started again by another runner of the same sweep: a runner skips a task whose failure
  mark (written by whoever ran it) is newer than the runner's own start, and counts it failed. The next run of the
  sweep retries it.
* A result file that exists but does not count (stale settings, a changed checkpoint, unreadable) is moved aside to
  ``<name>.stale-<time>.json`` before its job runs again, never overwritten.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from rat.eval.evaluate import file_sha256
from rat.eval.results import ResultError, load_result, merge_results
from rat.eval.spec import request_differences
from rat.eval.state import atomic_write_json
from rat.eval.sweep.jobs import Job, Task
from rat.eval.sweep.slots import Slots, SubmititJob, SubmititSlots
from rat.io import FileLock
from rat.logging import lines_around_bar, progress

__all__ = ["is_finished", "merge_job", "result_differences", "run_tasks", "valid_result"]

_logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 120.0  # after forwarding SIGTERM, how long to wait for an evaluation before SIGKILL


_HASHES: dict[tuple[str, int, int], str] = {}


def _checkpoint_sha256(path: str) -> str | None:
    """SHA-256 of a checkpoint, computed once per file version (path, mtime, size); None if it does not exist."""
    try:
        info = Path(path).stat()
    except FileNotFoundError:
        return None
    key = (str(Path(path).resolve()), info.st_mtime_ns, info.st_size)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def result_differences(result: dict[str, Any], job: Job, shard: int | None = None) -> list[str]:
    """The settings in which a result differs from what ``job`` (or one of its shards) would compute
    (:func:`rat.eval.spec.request_differences`), and whether its checkpoint file changed since."""
    spec = Task(job, shard).spec
    differs = request_differences(result, spec)
    if spec.checkpoint is not None and result.get("checkpoint_sha256") != _checkpoint_sha256(spec.checkpoint):
        differs.append("checkpoint (file changed since)")
    return differs


def valid_result(path: Path, job: Job, shard: int | None = None, *, explain: bool = False) -> dict[str, Any] | None:
    """The result at ``path`` if it is a complete result of ``job`` (or of its shard), else None."""
    try:
        result = load_result(path)
    except ResultError as exc:
        if explain and path.exists():
            _logger.warning("%s; the job runs again", exc)
        return None
    differs = result_differences(result, job, shard)
    if differs:
        if explain:
            _logger.warning("stale result %s (differs in %s); the job runs again", path, ", ".join(differs))
        return None
    return result


def is_finished(task: Task, explain: bool = False) -> bool:
    """Whether a task's result (or, for a shard, the merged job result) exists, is valid and fits the job: same
    settings and the same checkpoint file (SHA-256). With ``explain``, log why an existing result does not count."""
    if valid_result(task.job.output, task.job, explain=explain and task.shard is None) is not None:
        return True
    return task.shard is not None and valid_result(task.output, task.job, task.shard, explain=explain) is not None


def merge_job(job: Job) -> bool:
    """Merge a sharded job's shard results into its result, once all are there; returns whether it did."""
    results = [valid_result(Task(job, s).output, job, s) for s in range(job.shards)]
    if any(r is None for r in results):
        return False
    merged = merge_results(results)
    merged["output"] = str(job.output)
    if valid_result(job.output, job) is None:
        _move_aside(job.output)  # a stale merged result is kept, not overwritten
    atomic_write_json(job.output, merged)
    _logger.info("merged %d shards into %s", job.shards, job.output)
    return True


def _move_aside(path: Path) -> None:
    """Rename an existing result that does not count to ``<stem>.stale-<time>.json`` (nothing is overwritten)."""
    if not path.exists():
        return
    target = path.with_name(f"{path.stem}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{path.suffix}")
    path.rename(target)
    _logger.warning("moved the stale result %s aside to %s", path, target.name)


@dataclasses.dataclass
class _Running:
    task: Task
    process: subprocess.Popen | SubmititJob
    slot: int
    log: IO[str] | None  # a local subprocess's log, open in the runner; a SLURM job writes its own
    started: float
    claim: FileLock


class _StopRequest:
    """Records SIGTERM/SIGINT while installed (the loop forwards them to the evaluations)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _sleep(seconds: float, stop: _StopRequest) -> None:
    deadline = time.time() + seconds
    while stop.signum is None and time.time() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.time())))


def run_tasks(tasks: Sequence[Task], slots: Slots | SubmititSlots, *, poll_interval: float = 10.0,
              progress_setting: str = "auto") -> tuple[dict[Task, str], int | None]:
    """Run tasks in free slots until each is finished, by this runner or another one; returns each task's status
    (``done``, ``skipped`` = finished before or by another runner, ``failed``, ``stopped``) and the signal that
    stopped the runner (None when it was not stopped). Progress over the tasks: a tqdm bar or a log line per finished
    task (``progress_setting``, :func:`rat.logging.progress`)."""
    status: dict[Task, str] = {}
    pending: list[Task] = []
    for task in tasks:
        if is_finished(task, explain=True):
            status[task] = "skipped"
            _logger.info("skip (finished): %s -> %s", task.label, task.output)
        else:
            pending.append(task)
    for job in {t.job for t in tasks if t.shard is not None and status.get(t) == "skipped"}:
        if valid_result(job.output, job) is None:
            merge_job(job)
    running: list[_Running] = []
    started = time.time()
    last_wait_note = started
    bar = progress(total=len(tasks), initial=len(status), desc="tasks", setting=progress_setting, every=1,
                   logger=_logger, unit="task")
    with _StopRequest() as stop, lines_around_bar(bar):
        while (pending or running) and stop.signum is None:
            for run in list(running):
                code = run.process.poll()
                if code is not None:
                    running.remove(run)
                    status[run.task] = _finish(run, code)
            for task in list(pending):  # finished meanwhile by another runner
                if not FileLock(task.lock).path.exists() and is_finished(task):
                    pending.remove(task)
                    status[task] = "skipped"
                    _logger.info("skip (finished by another runner): %s", task.label)
            free = slots.free([r.slot for r in running]) if pending else []
            for task in list(pending):
                if not free:
                    break
                claim = FileLock(task.lock)
                if not claim.try_acquire():
                    continue
                if is_finished(task):
                    claim.release()
                    pending.remove(task)
                    status[task] = "skipped"
                    _logger.info("skip (finished by another runner): %s", task.label)
                    continue
                if _failed_since(task, started):
                    claim.release()
                    pending.remove(task)
                    status[task] = "failed"
                    _logger.error("not retried: %s failed in another runner of this sweep; log: %s", task.label,
                                  task.log)
                    continue
                pending.remove(task)
                running.append(_launch(task, free.pop(0), slots, claim))
            if pending and not running and time.time() - last_wait_note > 300:
                claimed = [t for t in pending if FileLock(t.lock).path.exists()]
                _logger.info("waiting: %d task(s) claimed by other runners (e.g. %s), %d for a free slot",
                             len(claimed), FileLock(claimed[0].lock).holder() if claimed else "-",
                             len(pending) - len(claimed))
                last_wait_note = time.time()
            if len(status) > bar.n:
                bar.set_postfix(**{s: sum(v == s for v in status.values()) for s in ("done", "skipped", "failed")})
                bar.update(len(status) - bar.n)
            if pending or running:
                _sleep(poll_interval, stop)
        if stop.signum is not None:
            _stop(running, status, stop.signum)
    bar.close()
    return status, stop.signum


def _finish(run: _Running, code: int) -> str:
    if run.log is not None:
        run.log.close()
    took = time.time() - run.started
    try:
        if code == 0 and is_finished(run.task):
            _logger.info("done in %.0fs: %s -> %s", took, run.task.label, run.task.output)
            if run.task.shard is not None:
                merge_job(run.task.job)
            return "done"
        _logger.error("FAILED (exit %s) after %.0fs: %s; log: %s", code, took, run.task.label, run.task.log)
        atomic_write_json(run.task.failed_mark, {"exit": code, "time": time.time()})
        return "failed"
    finally:
        run.claim.release()


def _failed_since(task: Task, since: float) -> bool:
    """Whether the task's evaluation failed (in any runner) after ``since``."""
    try:
        return task.failed_mark.stat().st_mtime > since
    except FileNotFoundError:
        return False


def _stop(running: list[_Running], status: dict[Task, str], signum: int) -> None:
    """Forward SIGTERM to the running evaluations, wait for them (SIGKILL after ``STOP_GRACE_S``), release claims."""
    name = signal.Signals(signum).name
    for run in running:
        _logger.warning("%s: stopping %s (pid %d); run the runner again to resume it", name, run.task.label,
                        run.process.pid)
        run.process.terminate()
    for run in running:
        try:
            run.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait()
        if run.log is not None:
            run.log.close()
        run.claim.release()
        status[run.task] = "stopped"


def _launch(task: Task, slot: int, slots: Slots | SubmititSlots, claim: FileLock) -> _Running:
    cmd = slots.command(task)
    _move_aside(task.output)
    task.failed_mark.unlink(missing_ok=True)
    task.log.parent.mkdir(parents=True, exist_ok=True)
    log = None
    if isinstance(slots, Slots):
        log = task.log.open("a")
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} on {slots.describe(slot)}: {shlex.join(cmd)}\n")
        log.flush()
    process = slots.start(task, cmd, slot, log)
    _logger.info("start on %s (pid %s): %s", slots.describe(slot), process.pid, task.label)
    return _Running(task, process, slot, log, time.time(), claim)


