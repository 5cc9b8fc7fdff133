"""AutoAttack evaluation of rat models: ``python -m rat.eval`` (one evaluation), ``runner_aa_eval.py`` (sweeps).

Public API:

* ``EvalSpec``, ``run_evaluation(spec) -> dict``: one resumable evaluation writing a JSON result.
* ``load_result(path)``, ``merge_results(results)``, ``summary_line(result)``: result files and shards.
* ``rat.eval.autoattack``: the thin wrapper over ``pyautoattack`` (AutoAttack).
* ``rat.eval.jobs``, ``rat.eval.scheduler``, ``rat.eval.runner``: the jobs-file schema, the scheduler and the command
  line of the bulk runner ``runner_aa_eval.py``.
"""
from rat.eval.evaluate import CheckpointError, EvalSpec, resolve, run_evaluation
from rat.eval.results import ResultError, load_result, merge_results, summary_line

__all__ = [
    "CheckpointError", "EvalSpec", "ResultError", "load_result", "merge_results", "resolve", "run_evaluation",
    "summary_line",
]
