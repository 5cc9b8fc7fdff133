"""Where a runner's task runs: a local ``python -m rat.eval`` subprocess on a free GPU (GPUtil) or CPU slot
(:class:`Slots`), or a SLURM job through submitit (:class:`SubmititSlots`, its local executor for tests).

Both give the scheduler (:mod:`rat.eval.sweep.scheduler`) the same things: the free slots, a task's command line
(:func:`rat.eval.sweep.jobs.task_command`) and a started process it can ``poll``, ``terminate``, ``wait`` for and
``kill``. A local evaluation runs in its own session (a terminal's Ctrl-C reaches only the runner, which forwards it)
and, on Linux, dies with the runner (a parent-death signal), so none is left running unclaimed.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from rat.eval.sweep.jobs import Task, task_command

__all__ = ["Slots", "SubmititJob", "SubmititSlots", "cpu_count", "has_gpus"]

_logger = logging.getLogger(__name__)


class Slots:
    """GPU slots (GPUtil) or CPU slots."""

    def __init__(self, *, gpus: bool, cpu_slots: int, max_load: float, max_memory: float, exclude: Sequence[int]):
        self.gpus = gpus
        self.cpu_slots = cpu_slots
        self.max_load = max_load
        self.max_memory = max_memory
        self.exclude = list(exclude)
        self.n_gpus = 0
        if gpus:
            import GPUtil

            self.n_gpus = len(GPUtil.getGPUs())

    def free(self, busy: Sequence[int]) -> list[int]:
        """Slots that can take a job now."""
        if not self.gpus:
            return [s for s in range(self.cpu_slots) if s not in busy]
        import GPUtil

        return list(GPUtil.getAvailable(order="first", limit=self.n_gpus, maxLoad=self.max_load,
                                        maxMemory=self.max_memory, excludeID=self.exclude + list(busy)))

    def env(self, slot: int) -> dict[str, str]:
        """The environment of a job in ``slot``."""
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # nvidia-smi's (GPUtil's) numbering
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["OMP_NUM_THREADS"] = str(self.threads())
        return env

    def threads(self) -> int:
        """CPU threads per CPU slot."""
        return max(1, cpu_count() // self.cpu_slots)

    def describe(self, slot: int) -> str:
        """``GPU 3`` or ``CPU slot 1``."""
        return f"GPU {slot}" if self.gpus else f"CPU slot {slot}"

    def command(self, task: Task) -> list[str]:
        """The task's ``python -m rat.eval`` command in these slots."""
        return task_command(task, "cuda" if self.gpus else "cpu", None if self.gpus else self.threads())

    def start(self, task: Task, cmd: list[str], slot: int, log: IO[str]) -> subprocess.Popen:
        """Start the evaluation as a subprocess of the runner: in its own session (a terminal's Ctrl-C reaches only
        the runner, which forwards it), dying with the runner (Linux parent-death signal)."""
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(slot), start_new_session=True,
                                preexec_fn=_die_with_parent(os.getpid()))


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when the runner dies, even by SIGKILL
    (``prctl(PR_SET_PDEATHSIG)``); None elsewhere (there, a killed runner's evaluations finish on their own)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    return functools.partial(_set_pdeathsig, prctl, parent)


def _set_pdeathsig(prctl: Any, parent: int) -> None:
    pr_set_pdeathsig = 1
    prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent:  # the runner died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _run_logged(cmd: list[str], log: str, header: str) -> int:
    """The body of a SLURM job (run by submitit on the node): ``python -m rat.eval`` with the task's arguments, in the
    job's own process (no second interpreter start), its output appended to the task's log; returns its exit
    status."""
    import contextlib

    from rat.eval.cli import main

    with open(log, "a") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        handle.write(header)
        handle.flush()
        try:
            return main(cmd[3:])  # cmd is [python, -m, rat.eval, ...] (task_command)
        except SystemExit as exc:  # a bad argument (argparse) exits 2
            return exc.code if isinstance(exc.code, int) else 1


class SubmititJob:
    """A submitit job seen as the scheduler sees a subprocess (``poll``, ``terminate``, ``wait``, ``kill``)."""

    def __init__(self, job: Any):
        self.job = job
        self.pid = job.job_id

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return int(self.job.result())
        except (FailedJobError, UncompletedJobError) as exc:  # node failure, timeout, cancelled: its log says more
            _logger.error("SLURM job %s failed: %s", self.job.job_id, str(exc).strip().splitlines()[-1:])
            return 1

    def terminate(self) -> None:
        self.job.cancel(check=False)

    kill = terminate

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(f"SLURM job {self.pid}", timeout)
            time.sleep(0.5)
        return code


class SubmititSlots:
    """Tasks as SLURM jobs through submitit: ``cluster='slurm'``, or ``'local'`` (submitit's local executor, which
    runs the same job code in local processes: tests, or trying a sweep's SLURM route without a cluster).

    Args:
        folder: submitit's folder (job scripts, pickles, its own logs).
        cluster: ``slurm`` or ``local``.
        parallel: at most this many jobs submitted at a time.
        gpus: GPUs per job (0: CPU jobs, ``--device cpu`` with ``cpus_per_task`` threads).
        cpus_per_task, timeout_min, mem_gb, partition, extra: the job's resources (``extra``: further
            ``#SBATCH`` options, e.g. ``{"account": "x", "qos": "y"}``).
    """

    def __init__(self, *, folder: str | os.PathLike, cluster: str, parallel: int, gpus: int, cpus_per_task: int,
                 timeout_min: int, mem_gb: float | None = None, partition: str | None = None,
                 extra: dict[str, str] | None = None):
        import submitit

        self.cluster = cluster
        self.parallel = parallel
        self.gpus = gpus
        self.cpus_per_task = cpus_per_task
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        params: dict[str, Any] = {"timeout_min": timeout_min, "gpus_per_node": gpus, "cpus_per_task": cpus_per_task,
                                  "tasks_per_node": 1, "nodes": 1, "name": "rat-eval"}
        if mem_gb is not None:
            params["mem_gb"] = mem_gb
        if partition:
            params["slurm_partition"] = partition
        if extra:
            params["slurm_additional_parameters"] = dict(extra)
        self.executor.update_parameters(**params)

    def free(self, busy: Sequence[int]) -> list[int]:
        return [s for s in range(self.parallel) if s not in busy]

    def describe(self, slot: int) -> str:
        return f"{self.cluster} job slot {slot}"

    def command(self, task: Task) -> list[str]:
        return task_command(task, "cuda" if self.gpus else "cpu", None if self.gpus else self.cpus_per_task)

    def start(self, task: Task, cmd: list[str], slot: int, log: IO[str]) -> SubmititJob:
        header = f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {self.cluster} job: {shlex.join(cmd)}\n"
        job = self.executor.submit(_run_logged, cmd, str(task.log), header)
        return SubmititJob(job)



def cpu_count() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def has_gpus() -> bool:
    import GPUtil

    return len(GPUtil.getGPUs()) > 0
