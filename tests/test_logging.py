"""rat's logging set-up: entry points own the ``rat`` logger only while their ``main`` runs (issue 19)."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from rat.eval.merge import main as merge_main
from rat.eval.sweep.runner import main as runner_main


def _logger_state(name: str | None) -> tuple:
    logger = logging.getLogger(name)
    return list(logger.handlers), logger.level, logger.propagate


def test_two_entry_points_in_one_process_log_each_line_once_and_leave_nothing_behind(tmp_path: Path):
    """The fresh-machine failure: a handler bound to a since-closed stream received matplotlib's INFO record
    'generated new fontManager' (logged on its first import) and logging printed a traceback."""
    before = {name: _logger_state(name) for name in (None, "rat", "py.warnings")}
    showwarning = warnings.showwarning
    missing_jobs, missing_shard = tmp_path / "jobs.yaml", tmp_path / "shard.json"

    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        assert runner_main(["--jobs", str(missing_jobs)]) == 2
    assert first.getvalue().count(f"cannot read jobs file {missing_jobs}") == 1, first.getvalue()
    first.close()  # as pytest closes a test's captured stream

    second = io.StringIO()
    with contextlib.redirect_stderr(second):
        logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
        logging.getLogger("rat.data").warning("a rat warning between two entry points")
        for _ in range(2):
            assert merge_main([str(missing_shard), "--output", str(tmp_path / "merged.json")]) == 2
    err = second.getvalue()
    assert "Logging error" not in err and "closed file" not in err, err
    assert "fontManager" not in err, err  # third-party INFO records are not rat's to print
    assert err.count(f"no result file {missing_shard}") == 2, err  # once per call, not once per call so far
    assert "ERROR rat.eval.merge:" in err, err  # formatted by rat's handler, not logging's last resort
    assert "cannot read jobs file" not in err, err
    assert {name: _logger_state(name) for name in before} == before
    assert warnings.showwarning is showwarning


def test_a_log_file_receives_rat_lines_and_is_closed_when_main_returns(tmp_path: Path):
    from rat.logging import logging_scope, setup_logging

    log = tmp_path / "run.log"

    @logging_scope()
    def main() -> None:
        setup_logging(0, log)
        setup_logging(0, log)  # idempotent: the second call replaces the first's handlers
        logging.getLogger("rat.train").info("one line")
        logging.getLogger("timm").info("not rat's")

    with contextlib.redirect_stderr(io.StringIO()) as err:
        main()
    assert log.read_text().count("INFO rat.train: one line") == 1 and "not rat's" not in log.read_text()
    assert err.getvalue().count("one line") == 1
    assert not logging.getLogger("rat").handlers
