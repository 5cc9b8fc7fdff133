"""Bulk AutoAttack evaluations (``runner_aa_eval.py``): checkpoints × threat models × resolutions × versions.

* :mod:`rat.eval.sweep.jobs`: the jobs file (its keys are :class:`rat.eval.spec.EvalSpec`'s settings plus the sweep's
  axes), expanded into jobs and tasks (a job, or one shard of it), and each task's ``python -m rat.eval`` command.
* :mod:`rat.eval.sweep.scheduler`: which results count as finished, shard merging, and the loop that runs tasks in
  free slots under lock-file claims, with signal forwarding.
* :mod:`rat.eval.sweep.slots`: where a task runs: a local subprocess on a free GPU or CPU slot, or a SLURM job.
* :mod:`rat.eval.sweep.aggregate`: summary tables and plots of the results.
* :mod:`rat.eval.sweep.runner`: the command line (``runner_aa_eval.py``).
"""
