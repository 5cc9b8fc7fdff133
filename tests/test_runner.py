"""Tests of runner_aa_eval.py (rat.eval.sweep): jobs files, commands, GPU/CPU slots, a real sweep on CPU slots."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from eval_support import tiny_checkpoint

from rat.eval.cli import build_parser
from rat.eval.results import RESULT_FORMAT, load_result
from rat.eval.sweep.jobs import JobsError, Task, expand_jobs, load_jobs_file, task_command, tasks_for
from rat.eval.sweep.runner import main
from rat.eval.sweep.scheduler import is_finished, result_differences
from rat.eval.sweep.slots import Slots

REPO = Path(__file__).resolve().parents[1]
CONVNEXT = "convnext_micro_cvst"


def _docs_jobs_file(tmp_path: Path) -> Path:
    """The example jobs file of docs/eval.md, as a file."""
    text = (REPO / "docs" / "eval.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    path = tmp_path / "jobs.yaml"
    path.write_text(blocks[0])
    return path


def test_documented_jobs_file_expands_and_its_commands_parse(tmp_path: Path):
    jobs, output_dir = load_jobs_file(_docs_jobs_file(tmp_path))
    assert output_dir == Path("runs/aa_eval")
    # 4 threats × 3 resolutions, + 2 checkpoints × 1 × 1, + 1 custom job
    assert len(jobs) == 12 + 2 + 1
    assert len(tasks_for(jobs)) == 12 * 2 + 2 + 1  # the first entry is split in 2 shards
    first = jobs[0]
    assert (first.name, first.spec.norm, first.spec.resolution, first.spec.version, first.spec.precision,
            first.spec.use_ema) == ("convnext_b_cvst_linf4", "Linf", 224, "standard", "bf16", True)
    assert first.output == Path("runs/aa_eval/convnext_b_cvst_linf4/Linf-4_255_r224_standard_n5000.json")
    custom = jobs[-1]
    assert custom.spec.attacks == ["apgd-ce", "square"] and custom.spec.arch == "vit_base_patch16_cvst"
    parser = build_parser()
    for task in tasks_for(jobs):
        cmd = task_command(task, "cuda")
        assert cmd[:3] == [sys.executable, "-m", "rat.eval"]
        args = parser.parse_args(cmd[3:])  # exits (SystemExit) on a command rat.eval cannot parse
        job = task.job
        assert (args.norm, args.eps, args.resolution, args.version, args.n_ex) == (
            job.spec.norm, job.spec.eps, job.spec.resolution, job.spec.version, job.spec.n_ex)
        assert args.output == task.output and args.use_ema == job.spec.use_ema and args.arch == job.spec.arch
        assert args.shard == (None if task.shard is None else (task.shard, job.shards))
        assert args.attacks == (list(job.spec.attacks) if job.spec.attacks else None)


@pytest.mark.parametrize("entry, message", [
    ({"checkpoint": "a.pth", "data": "v", "typo": 1}, "unknown key"),
    ({"checkpoint": "a.pth"}, "needs data"),
    ({"data": "v"}, "needs checkpoint"),
    ({"checkpoint": "a.pth", "data": "v", "threats": ["Linf:x"]}, "Linf:x"),
    ({"checkpoint": "a.pth", "data": "v", "threats": ["L3"]}, "norm must be one of"),
    ({"checkpoint": "a.pth", "data": "v", "versions": ["custom"]}, "needs --attacks"),
    ({"checkpoints": ["x/a.pth", "x/./a.pth"], "data": "v"}, "distinct names"),
    ({"checkpoints": ["a.pth", "b.pth"], "name": "n", "data": "v"}, "single checkpoint"),
])
def test_bad_jobs_are_refused_clearly(entry: dict, message: str):
    with pytest.raises(JobsError, match=message):
        expand_jobs([entry], "out")


def test_gpu_slots_come_from_gputil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """GPUtil reads nvidia-smi; a stand-in nvidia-smi on PATH reports one idle, one busy and one excluded GPU."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    rows = ["0, GPU-0, 2, 81920, 500, 81420, 550.54, NVIDIA H100, 0, Disabled, Disabled, 30",
            "1, GPU-1, 97, 81920, 60000, 21920, 550.54, NVIDIA H100, 1, Disabled, Disabled, 70",
            "2, GPU-2, 0, 81920, 10, 81910, 550.54, NVIDIA H100, 2, Disabled, Disabled, 30",
            "3, GPU-3, 0, 81920, 10, 81910, 550.54, NVIDIA H100, 3, Disabled, Disabled, 30"]
    fake.write_text("#!/bin/sh\nprintf '" + "\\n".join(rows) + "\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    slots = Slots(gpus=True, cpu_slots=1, max_load=0.1, max_memory=0.1, exclude=[3])
    assert slots.n_gpus == 4
    assert slots.free([]) == [0, 2]
    assert slots.free([0]) == [2]  # a GPU running one of our jobs is not handed out again
    env = slots.env(2)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    cpu = Slots(gpus=False, cpu_slots=2, max_load=0.1, max_memory=0.1, exclude=[])
    assert cpu.free([1]) == [0] and cpu.env(0)["CUDA_VISIBLE_DEVICES"] == ""


def _write_jobs(tmp_path: Path, data: Path, ckpt: Path) -> Path:
    jobs = {
        "output_dir": str(tmp_path / "aa"),
        "defaults": {"data": str(data), "versions": ["fast"], "n_ex": 8, "batch_size": 4, "num_workers": 1,
                     "n_iter": 2},
        "jobs": [
            {"checkpoint": str(ckpt), "name": "convnext", "threats": ["Linf:1/255"], "resolutions": [32]},
            {"checkpoint": str(ckpt), "name": "broken", "arch": "vit_micro_patch16_cvst", "threats": ["Linf"],
             "resolutions": [32]},  # the checkpoint holds a ConvNeXt: this job fails
            {"checkpoint": str(ckpt), "name": "convnext", "threats": ["L2:0.1"], "resolutions": [40], "shards": 2},
        ],
    }
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(jobs))
    return path


def test_dry_run_lists_without_running(tmp_path: Path, capsys: pytest.CaptureFixture):
    jobs = _write_jobs(tmp_path, tmp_path / "val.beton", tmp_path / "ckpt.pth")
    assert main(["--jobs", str(jobs), "--dry-run", "--cpu", "--cpu-slots", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("run  ") == 4 and "4 of 4 tasks would run on 2 CPU slot(s)" in out
    assert "--shard 1/2" in out and "--device cpu" in out
    assert not (tmp_path / "aa").exists()


@pytest.mark.ffcv
def test_runner_on_cpu_slots(tmp_path: Path, demo_betons, tmp_path_factory: pytest.TempPathFactory):
    ckpt = tiny_checkpoint(tmp_path_factory.getbasetemp(), CONVNEXT)
    jobs = _write_jobs(tmp_path, demo_betons[1], ckpt)
    cmd = [sys.executable, str(REPO / "runner_aa_eval.py"), "--jobs", str(jobs), "--cpu-slots", "2",
           "--poll-interval", "0.2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    log = first.stderr
    assert first.returncode == 1, log  # one job failed ...
    starts = [m.start() for m in re.finditer(r"start on CPU slot", log)]
    ends = [m.start() for m in re.finditer(r"done in |FAILED", log)]
    assert len(starts) == 4 and len(ends) == 4
    assert starts[1] < ends[0]  # two jobs ran at the same time
    assert "CPU slot 0" in log and "CPU slot 1" in log
    out = tmp_path / "aa"
    broken_log = out / "broken" / "Linf-4_255_r32_fast_n8.log"
    assert f"log: {broken_log}" in log and "holds a convnext_micro_cvst" in broken_log.read_text()
    assert "3 done, 0 skipped (already finished), 1 failed" in log  # ... the others did not
    for name in ("Linf-1_255_r32_fast_n8", "L2-0.1_r40_fast_n8"):
        result = load_result(out / "convnext" / f"{name}.json")
        assert result["n_ex"] == 8 and len(result["per_example"]["indices"]) == 8
    merged = load_result(out / "convnext" / "L2-0.1_r40_fast_n8.json")
    assert merged["shard"] is None and len(merged["merged_from"]) == 2
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["norm"], r["resolution"]) for r in rows) == [("L2", "40"), ("Linf", "32")]
    assert "| convnext | L2 ε=0.1 | 40 |" in (out / "summary.md").read_text()
    assert (out / "robust_vs_resolution.png").stat().st_size > 1000

    # The same sweep again, its tasks handed to SLURM through submitit (its local executor): the same skips, and the
    # failing job runs again as a job, fails and leaves its failure mark; the summary table is unchanged.
    summary = (out / "summary.md").read_bytes()
    failed_mark = Task(load_jobs_file(jobs)[0][1]).failed_mark
    failed_mark.unlink()
    second = subprocess.run([*cmd, "--launcher", "submitit-local", "--slurm-gpus", "0", "--slurm-cpus", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 1
    assert second.stderr.count("skip (finished)") == 3  # one job and the two shards of another
    assert len(re.findall(r"start on local job slot", second.stderr)) == 1  # only the failing job runs again
    assert "0 done, 3 skipped (already finished), 1 failed" in second.stderr
    assert failed_mark.exists() and (out / "summary.md").read_bytes() == summary


def test_summary_tables_and_plots_from_rows(tmp_path: Path):
    """The runner's aggregation: rows sorted by model, threat model and resolution; the plot's x axis is resolution
    when a threat model was evaluated at several resolutions, eps when a norm was evaluated at several radii."""
    from PIL import Image

    from rat.eval.sweep.aggregate import choose_axis, plot_rows, write_csv, write_markdown

    def row(norm: str, eps: float, resolution: int, robust: float) -> dict:
        return {"model": "m", "arch": "convnext_micro_cvst", "norm": norm, "eps": eps,
                "eps_text": "4/255" if norm == "Linf" else str(eps), "resolution": resolution, "version": "standard",
                "n_ex": 100, "clean_acc": 0.8, "robust_acc": robust, "standard_settings": True, "result": "r.json"}

    by_resolution = [row("Linf", 4 / 255, 224, 0.4), row("Linf", 4 / 255, 160, 0.3), row("L2", 2.0, 224, 0.5)]
    by_eps = [row("L2", 2.0, 224, 0.5), row("L2", 1.0, 224, 0.6), row("Linf", 4 / 255, 224, 0.4)]
    assert choose_axis(by_resolution) == "resolution" and choose_axis(by_eps) == "eps"
    for rows, axis in ((by_resolution, "resolution"), (by_eps, "eps")):
        png = plot_rows(rows, tmp_path / f"robust_vs_{axis}.png")
        assert Image.open(png).size[0] > 500
    with write_csv(by_resolution, tmp_path / "summary.csv").open() as handle:
        ordered = [(r["norm"], r["resolution"]) for r in csv.DictReader(handle)]
    assert ordered == [("L2", "224"), ("Linf", "160"), ("Linf", "224")]
    table = write_markdown(by_resolution, tmp_path / "summary.md").read_text().splitlines()
    assert table[3] == "| m | Linf ε=4/255 | 160 | standard | 100 | 80.0 | 30.0 |"
    with pytest.raises(ValueError, match="plot axis must be"):
        plot_rows(by_eps, tmp_path / "x.png", x="n_ex")


def test_finished_task_detection(tmp_path: Path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights v1")
    job = expand_jobs([{"checkpoint": str(ckpt), "data": "v", "threats": ["Linf"], "versions": ["fast"], "n_ex": 2,
                        "batch_size": 2}], tmp_path / "aa")[0]
    assert job.name == "run-last"
    task = Task(job)
    assert not is_finished(task)
    task.output.parent.mkdir(parents=True)
    task.output.write_text("{not json")
    assert not is_finished(task)
    result = {"format": RESULT_FORMAT, "model": job.name, "arch": CONVNEXT, "norm": "Linf", "eps": 4 / 255,
              "resolution": 224, "version": "fast", "attacks": ["apgd-ce", "apgd-t"], "n_ex": 2, "shard": None,
              "use_ema": False, "precision": "fp32", "seed": 0, "batch_size": 2,
              "attack_settings": {"apgd": {"n_iter": 100}, "square": {"n_queries": 5000}},
              "checkpoint_sha256": hashlib.sha256(b"weights v1").hexdigest(), "clean_accuracy": 0.5,
              "robust_accuracy": 0.0, "robust_accuracy_after": {"apgd-ce": 0.0, "apgd-t": 0.0},
              "per_example": {"indices": [3, 7], "clean": "10", "apgd-ce": "00", "apgd-t": "00"}}
    task.output.write_text(json.dumps(result))
    assert is_finished(task)
    task.output.write_text(json.dumps({**result, "batch_size": 1}))
    assert not is_finished(task)
    assert result_differences({**result, "batch_size": 1, "eps": 1.0}, job) == [
        "threat model, resolution, version or n_ex", "batch_size"]
    task.output.write_text(json.dumps(result))
    time.sleep(0.01)
    ckpt.write_bytes(b"weights v2, retrained")  # a retrained checkpoint is evaluated again
    assert not is_finished(task)
    assert result_differences(result, job) == ["checkpoint (file changed since)"]


def test_jobs_file_and_eval_cli_share_their_defaults():
    """One spec: a jobs entry without settings evaluates exactly what `python -m rat.eval` does without flags."""
    job = expand_jobs([{"checkpoint": "a.pt", "data": "v"}], "out")[0]
    args = build_parser().parse_args(["--data", "v", "--checkpoint", "a.pt"])
    for key in ("norm", "version", "n_ex", "batch_size", "precision", "num_workers", "seed", "n_iter", "n_queries",
                "use_ema"):
        assert getattr(job.spec, key) == getattr(args, key), key


def test_use_ema_must_be_a_real_boolean():
    assert expand_jobs([{"checkpoint": "a.pt", "data": "v", "use_ema": False}], "out")[0].spec.use_ema is False
    with pytest.raises(JobsError, match="use_ema: 'false' must be true or false"):
        expand_jobs([{"checkpoint": "a.pt", "data": "v", "use_ema": "false"}], "out")


@pytest.mark.ffcv
def test_runner_hands_its_tasks_to_submitit(tmp_path: Path, demo_betons, tmp_path_factory: pytest.TempPathFactory,
                                            capsys: pytest.CaptureFixture):
    """--launcher submitit-local: a sharded job's shards as SLURM jobs through submitit's local executor; the merged
    result equals one in-process evaluation of the whole job, the summary table is written, and a second run skips
    what is finished without submitting anything (failures through submitit: test_runner_on_cpu_slots)."""
    import torch

    from rat.eval import EvalSpec, run_evaluation

    ckpt = tiny_checkpoint(tmp_path_factory.getbasetemp(), CONVNEXT)
    settings = {"data": str(demo_betons[1]), "versions": ["fast"], "n_ex": 8, "batch_size": 4, "num_workers": 1,
                "n_iter": 2}
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "aa"), "defaults": settings, "jobs": [
        {"checkpoint": str(ckpt), "name": "convnext", "threats": ["L2:0.1"], "resolutions": [32], "shards": 2}]}))
    argv = ["--jobs", str(jobs), "--launcher", "submitit-local", "--slurm-gpus", "0", "--slurm-cpus", "1",
            "--poll-interval", "0.2"]
    assert main(argv) == 0  # the runner in this process; the jobs are submitit's processes
    first = capsys.readouterr().err
    assert len(re.findall(r"start on local job slot", first)) == 2
    assert "2 done, 0 skipped (already finished), 0 failed" in first
    out = tmp_path / "aa"
    merged = load_result(out / "convnext" / "L2-0.1_r32_fast_n8.json")
    assert merged["shard"] is None and len(merged["merged_from"]) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the jobs (--threads 1), for bit-identical float math
    try:
        whole = run_evaluation(EvalSpec(data=demo_betons[1], checkpoint=ckpt, output=tmp_path / "whole.json",
                                        norm="L2", eps=0.1, resolution=32, version="fast", n_ex=8, batch_size=4,
                                        num_workers=1, n_iter=2, device="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert merged["per_example"] == whole["per_example"]
    assert (merged["clean_accuracy"], merged["robust_accuracy"]) == (whole["clean_accuracy"],
                                                                     whole["robust_accuracy"])
    assert "| convnext | L2 ε=0.1 | 32 |" in (out / "summary.md").read_text()
    assert not list(out.rglob("*.lock"))
    assert main(argv) == 0
    second = capsys.readouterr().err
    assert second.count("skip (finished)") == 2
    assert "start on" not in second and "0 done, 2 skipped (already finished), 0 failed" in second
