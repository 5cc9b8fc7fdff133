"""End-to-end trainer runs on CPU: the demo learns, resume is bit-exact, SIGTERM and NaN stop cleanly, bf16, EMA.

Every run is a real ``python -m rat.train`` process on the embedded demo data (FFCV betons written once per session).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ffcv, pytest.mark.slow]

# A small, fast run: 4 batches of 16 per epoch at 32 px, APGD-2, no robust eval unless asked.
SMALL = ["--model.arch", "convnext_micro_cvst", "--resolution.min_res", "32", "--resolution.max_res", "32",
         "--training.batch_size", "16", "--training.limit_batches", "4", "--training.precision", "fp32",
         "--adv.attack", "apgd", "--adv.n_iter", "2", "--validation.robust_n_ex", "0", "--validation.batch_size", "100",
         "--logging.progress", "0", "--logging.log_every", "1", "--data.num_workers", "1", "--lr.lr", "0.002"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _train(run_dir: Path, demo_root: Path, *extra: str, check: bool = True, timeout: int = 600):
    cmd = [sys.executable, "-m", "rat.train", "--data.demo_root", str(demo_root), "--logging.folder", str(run_dir),
           *SMALL, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _epochs(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


@pytest.fixture(scope="module")
def demo_root(demo_betons) -> Path:
    return demo_betons[0].parent


def test_demo_run_learns(tmp_path, demo_root):
    """The quickstart's run: configs/demo.yaml as shipped; clean accuracy clearly above chance (10 %)."""
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "rat.train", "-C", "configs/demo.yaml", "--data.demo_root",
                           str(demo_root), "--logging.folder", str(run_dir), "--logging.progress", "0"],
                          capture_output=True, text=True, timeout=1200, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = _epochs(run_dir)[-1]
    assert final["top1"] > 40.0, final
    assert 10.0 < final["robust_top1"] < final["top1"], final
    assert "robust top-1" in proc.stderr and "checkpoints" in proc.stderr
    state = _load(run_dir / "checkpoints" / "last.pt")
    assert {"model", "model_ema", "optimizer", "epoch", "arch", "config", "model_kwargs", "step", "rng"} <= set(state)
    assert state["arch"] == "convnext_micro_cvst" and state["epoch"] == 10
    params = json.loads((run_dir / "params.json").read_text())
    assert params["adv"]["attack"] == "apgd" and params["training"]["epochs"] == 10


def test_resume_is_bit_exact(tmp_path, demo_root):
    """2 epochs in one go == 1 epoch, resume from its checkpoint, 1 more epoch (heavy aug, mixup, APGD, EMA)."""
    extra = ["--training.epochs", "2", "--augment.heavy", "1", "--ema.enabled", "1", "--ema.decay", "0.9",
             "--training.label_smoothing", "0.1", "--validation.every", "1"]
    straight = tmp_path / "straight"
    _train(straight, demo_root, *extra)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "epoch_0001.pt", resumed / "checkpoints" / "last.pt")
    _train(resumed, demo_root, *extra, "--training.resume", "auto")
    a, b = _load(straight / "checkpoints" / "last.pt"), _load(resumed / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 8
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert _epochs(straight)[-1]["top1"] == _epochs(resumed)[-1]["top1"]


def test_ema_is_updated_and_differs_from_the_model(tmp_path, demo_root):
    run_dir = tmp_path / "ema"
    _train(run_dir, demo_root, "--training.epochs", "2", "--ema.enabled", "1", "--ema.decay", "0.5")
    first, last = _load(run_dir / "checkpoints" / "epoch_0001.pt"), _load(run_dir / "checkpoints" / "last.pt")
    floats = [k for k, v in last["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(last["model_ema"][k], last["model"][k]) for k in floats)
    assert any(not torch.equal(last["model_ema"][k], first["model_ema"][k]) for k in floats)
    assert "ema_top1" in _epochs(run_dir)[-1]


def test_bf16_autocast_runs_on_cpu(tmp_path, demo_root):
    run_dir = tmp_path / "bf16"
    _train(run_dir, demo_root, "--training.precision", "bf16", "--training.limit_batches", "2")
    state = _load(run_dir / "checkpoints" / "last.pt")
    assert all(v.dtype != torch.bfloat16 for v in state["model"].values())  # master weights stay fp32
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nonfinite_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, demo_root):
    run_dir = tmp_path / "nan"
    _train(run_dir, demo_root)
    good = _sha(run_dir / "checkpoints" / "last.pt")
    proc = _train(run_dir, demo_root, "--training.epochs", "2", "--training.resume", "auto", "--lr.lr", "1e30",
                  check=False)
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "last good checkpoint" in proc.stderr
    assert _sha(run_dir / "checkpoints" / "last.pt") == good


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, demo_root):
    run_dir = tmp_path / "term"
    cmd = [sys.executable, "-m", "rat.train", "--data.demo_root", str(demo_root), "--logging.folder", str(run_dir),
           *SMALL, "--training.limit_batches", "0", "--training.epochs", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM" in stderr
    state = _load(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["batches_done"] > 0
    _train(run_dir, demo_root, "--training.limit_batches", "0", "--training.epochs", "1", "--training.resume", "auto")
    assert _load(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


def test_bad_config_exits_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epoch: 3\n")
    proc = subprocess.run([sys.executable, "-m", "rat.train", "-C", str(bad)], capture_output=True, text=True,
                          timeout=120, env=_env(), cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("rat.train: error: unknown key 'training.epoch'")


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_start_on_cpu(tmp_path, demo_root, config):
    """Each shipped config parses and takes one training step on CPU (tiny batch, demo data, low resolution)."""
    proc = subprocess.run(
        [sys.executable, "-m", "rat.train", "-C", str(config), "--data.demo_root", str(demo_root),
         "--data.train_dataset", "", "--data.val_dataset", "", "--logging.folder", str(tmp_path / "run"),
         "--training.batch_size", "2", "--training.limit_batches", "1", "--training.epochs", "1",
         "--resolution.min_res", "32", "--resolution.max_res", "32", "--validation.resolution", "32",
         "--validation.robust_n_ex", "0", "--training.precision", "fp32", "--data.num_workers", "1",
         "--logging.progress", "0", "--data.num_classes", "10"],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 1
