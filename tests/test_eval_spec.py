"""The schema of an evaluation (rat.eval.spec): what it generates (the rat.eval command line, the jobs-file keys, the
identity, the state fingerprint, the runner's stale check) and that results and state files written before it still
count as the same evaluation. The literal references below were computed by the code before the schema (commit
7e3d738: EvalSpec in rat/eval/evaluate.py, the jobs schema, identity and fingerprint written out by hand)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rat.eval.autoattack import STANDARD_N_ITER, STANDARD_N_QUERIES, attack_settings, build_autoattack
from rat.eval.cli import build_parser
from rat.eval.evaluate import check_output, default_output, finished_result
from rat.eval.results import RESULT_FORMAT
from rat.eval.spec import (
    IDENTITY_KEYS,
    JOB_SETTINGS,
    EvalSpec,
    evaluation_identity,
    request_differences,
    spec_argv,
    spec_from_args,
    state_fingerprint,
)
from rat.eval.sweep.jobs import FIELDS, Task, expand_jobs, task_command

SOURCE = SimpleNamespace(arch="convnext_micro_cvst", model_kwargs={"num_classes": 10, "normalize": True},
                         checkpoint_sha256="ab" * 32)
CKPT = Path("/runs/a/checkpoints/last.pt")
DATA = Path("/data/val.beton")


def _custom() -> EvalSpec:
    """A spec with every identity setting away from its default."""
    return EvalSpec(data=DATA, checkpoint=CKPT, norm="L2", eps=2.0, resolution=32, version="custom",
                    attacks=["apgd-ce", "square"], n_ex=8, subset="seeded", batch_size=4, precision="bf16", seed=3,
                    shard=(1, 2), n_iter=2, n_queries=10, use_ema=True)


def test_identity_and_default_file_names_are_those_of_existing_results():
    """The identity keys (and their order, which the "differs in" lines follow) and the default file names, whose
    fingerprint hashes the identity, are unchanged: an existing result is found under its name."""
    assert IDENTITY_KEYS == ("arch", "model_kwargs", "checkpoint_sha256", "use_ema", "norm", "eps", "resolution",
                             "version", "attacks", "n_ex", "batch_size", "precision", "seed", "shard", "n_iter",
                             "n_queries", "data")
    standard = EvalSpec(data=DATA, checkpoint=CKPT, eps=4 / 255, resolution=224)
    identity = evaluation_identity(standard, SOURCE, ["apgd-ce", "apgd-t", "fab-t", "square"])
    assert default_output(standard, identity).name == "aa_Linf-4_255_r224_standard_n5000_last_ee52dd71.json"
    identity = evaluation_identity(_custom(), SOURCE, ["apgd-ce", "square"])
    assert default_output(_custom(), identity).name == "aa_L2-2_r32_custom_n8_shard1of2_last-ema_625c2454.json"
    assert identity == {
        "arch": "convnext_micro_cvst", "model_kwargs": {"num_classes": 10, "normalize": True},
        "checkpoint_sha256": "ab" * 32, "use_ema": True, "norm": "L2", "eps": 2.0, "resolution": 32,
        "version": "custom", "attacks": ["apgd-ce", "square"], "n_ex": 8, "batch_size": 4, "precision": "bf16",
        "seed": 3, "shard": {"index": 1, "count": 2}, "n_iter": 2, "n_queries": 10, "data": "/data/val.beton",
        "subset": "seeded"}


def test_a_state_file_written_before_resumes():
    """The state fingerprint of an interrupted evaluation is the one the code before wrote."""
    identity = evaluation_identity(_custom(), SOURCE, ["apgd-ce", "square"])
    settings = {"apgd": {"n_iter": 2}, "square": {"n_queries": 10}, "seed": 3}
    subset = {"name": "seeded", "dataset_size": 300}
    assert json.loads(json.dumps(state_fingerprint(identity, settings, subset))) == {
        "arch": "convnext_micro_cvst", "attack_settings": settings, "attacks": ["apgd-ce", "square"],
        "batch_size": 4, "checkpoint_sha256": "ab" * 32, "eps": 2.0,
        "model_kwargs": {"normalize": True, "num_classes": 10}, "n_ex": 8, "norm": "L2", "precision": "bf16",
        "resolution": 32, "shard": {"count": 2, "index": 1}, "subset": subset, "use_ema": True}


def _old_result(identity: dict) -> dict:
    """A result as rat.eval wrote it before the schema (keys in its order; per-example flags of 2 images)."""
    keys = ("arch", "model_kwargs", "checkpoint_sha256", "use_ema", "norm", "eps", "resolution", "version", "attacks",
            "n_iter", "n_queries", "n_ex", "data", "shard", "batch_size", "precision", "seed")
    return {"format": RESULT_FORMAT, "model": "a-last", **{k: identity[k] for k in keys},
            "subset": {"name": "seeded"}, "clean_accuracy": 0.5, "robust_accuracy": 0.0,
            "robust_accuracy_after": {"apgd-ce": 0.0, "square": 0.0}, "time_s": 1.0, "finished": "2026-01-01",
            "per_example": {"indices": [3, 7], "clean": "10", "apgd-ce": "00", "square": "00"}}


def test_an_existing_result_is_reused_and_another_evaluations_is_never_replaced(tmp_path: Path):
    identity = evaluation_identity(_custom(), SOURCE, ["apgd-ce", "square"])
    output = tmp_path / "result.json"
    output.write_text(json.dumps(_old_result(identity)))
    assert finished_result(output, identity, "seeded") == _old_result(identity)
    other = evaluation_identity(dataclasses.replace(_custom(), seed=4, batch_size=2), SOURCE, ["apgd-ce", "square"])
    with pytest.raises(ValueError, match=r"different evaluation \(differs in batch_size, seed\); refusing to replace"):
        check_output(output, other)


def test_autoattacks_standard_budget_is_pyautoattacks():
    """The budget a request without --n-iter/--n-queries is compared with is what pyautoattack configures."""
    settings = attack_settings(build_autoattack(torch.nn.Flatten(), norm="Linf", eps=4 / 255,
                                                attacks=["apgd-ce"], device="cpu"))
    assert settings["apgd"]["n_iter"] == settings["apgd-t"]["n_iter"] == settings["fab"]["n_iter"] == STANDARD_N_ITER
    assert settings["square"]["n_queries"] == STANDARD_N_QUERIES


def test_every_setting_reaches_the_command_line_the_jobs_file_and_back(tmp_path: Path):
    """Each field of EvalSpec is a rat.eval flag (spec_from_args reads every one): a spec with every field set
    survives spec → command line → parse, and so does every jobs-file setting through a job's rat.eval command."""
    parser = build_parser()
    spec = dataclasses.replace(_custom(), model_kwargs={"num_classes": 10}, normalize=False, arch="resnet10t",
                               device="cpu", num_workers=2, output=tmp_path / "r.json", name="m")
    assert spec_from_args(parser.parse_args(spec_argv(spec))) == spec
    assert spec_from_args(parser.parse_args(["--data", str(DATA)])) == EvalSpec(data=DATA)
    assert set(JOB_SETTINGS) <= set(FIELDS)
    entry = {"checkpoint": str(CKPT), "name": "m", "threats": ["L2:2"], "resolutions": [32], "versions": ["custom"],
             "shards": 2, **{k: getattr(spec, k) for k in JOB_SETTINGS}, "data": str(DATA)}
    job = expand_jobs([entry], tmp_path)[0]
    task = Task(job, 1)
    args = parser.parse_args(task_command(task, "cpu")[3:])
    assert spec_from_args(args) == dataclasses.replace(spec, output=task.output)


def test_a_result_is_stale_in_each_setting_it_was_computed_without():
    spec = dataclasses.replace(_custom(), normalize=True, arch="convnext_micro_cvst")
    result = {**_old_result(evaluation_identity(spec, SOURCE, ["apgd-ce", "square"])), "normalize": True,
              "attack_settings": {"apgd": {"n_iter": 2}, "square": {"n_queries": 10}}}
    assert request_differences(result, spec) == []
    changes = {"n_iter": None, "n_queries": None, "subset": "robustbench", "normalize": False, "shard": None,
               "arch": "resnet10t", "use_ema": False, "eps": 2.5, "batch_size": 2}
    expected = {**{key: key for key in changes}, "eps": "threat model, resolution, version or n_ex"}
    for key, value in changes.items():
        assert request_differences(result, dataclasses.replace(spec, **{key: value})) == [expected[key]], key
    # Not asked for: any normalization, the subset auto resolves to, the data wherever it is now.
    assert request_differences(result, dataclasses.replace(spec, normalize=None, subset="auto", data="v")) == []


@pytest.mark.parametrize("field, value, message", [
    ("norm", "L3", "must be one of Linf, L2, L1"), ("precision", "fp8", "must be one of"),
    ("batch_size", 0, "must be >= 1"), ("n_ex", 0, "must be >= 1"), ("eps", -1.0, "eps must be a positive number"),
    ("version", "quick", "must be one of"), ("attacks", ["apgd-x"], "must be one of"),
    ("use_ema", 1, "must be true or false"), ("model_kwargs", [1], "must be a mapping"),
])
def test_the_python_api_checks_each_setting_by_its_rule(field, value, message):
    """run_evaluation's spec goes through the same rules as the command line and the jobs file (one vocabulary)."""
    from rat.eval.spec import check_spec

    check_spec(_custom())  # a valid spec passes
    with pytest.raises(ValueError, match=f"{field}=.*{message}"):
        check_spec(dataclasses.replace(_custom(), **{field: value}))
