"""AutoAttack evaluation of rat models: ``python -m rat.eval`` (one evaluation), ``runner_aa_eval.py`` (sweeps).

Public API:

* ``EvalSpec`` (``rat.eval.spec``: the schema of an evaluation, from which the command line, the jobs file and the
  identity of a result are generated), ``run_evaluation(spec) -> dict``: one resumable evaluation writing a JSON
  result.
* ``load_result(path)``, ``merge_results(results)``, ``summary_line(result)``: result files and shards.
* ``rat.eval.autoattack``: the thin wrapper over ``pyautoattack`` (AutoAttack).
* ``rat.eval.sweep``: the bulk runner ``runner_aa_eval.py`` (jobs file, scheduler, slots, summaries).
"""
from rat.eval.evaluate import resolve, run_evaluation
from rat.eval.results import ResultError, load_result, merge_results, summary_line
from rat.eval.spec import EvalSpec
from rat.models import CheckpointError

__all__ = [
    "CheckpointError", "EvalSpec", "ResultError", "load_result", "merge_results", "resolve", "run_evaluation",
    "summary_line",
]
