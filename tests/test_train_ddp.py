"""Real 2-process DDP (torchrun, gloo on CPU): replicas stay identical and each rank reads its own shard."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ffcv]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_ranks_stay_in_sync_on_disjoint_shards(tmp_path, demo_betons):
    train_beton = demo_betons[0]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "ddp_train_worker.py"), str(train_beton), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # identical weights after 3 DDP steps (different inits)
    from ffcv.reader import Reader

    # DistributedSampler semantics: each rank reads ceil(N / 2) samples, of which full batches of 16 are kept.
    n_train = int(Reader(str(train_beton)).num_samples)
    per_rank = -(-n_train // 2)
    kept = per_rank // 16 * 16
    assert n_train == 4491 and all(len(r["order"]) == kept for r in ranks)
    first, second = set(ranks[0]["order"]), set(ranks[1]["order"])
    assert len(first) == len(second) == kept  # no sample twice on a rank
    assert not first & second  # disjoint shards
    # together they cover the train set except the partial last batch of each rank
    assert len(first | second) == 2 * kept and n_train - 2 * kept <= 2 * (per_rank - kept)


def test_run_train_sh_two_processes(tmp_path, demo_betons):
    """The user entry point: run_train.sh with NPROC=2 on CPU, one epoch of 2 steps; rank 0 writes one checkpoint."""
    env = _env()
    env["NPROC"] = "2"
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", "run_train.sh", "-C", "configs/demo.yaml", "--data.demo_root", str(demo_betons[0].parent),
         "--logging.folder", str(tmp_path / "run"), "--training.epochs", "1", "--training.limit_batches", "2",
         "--training.batch_size", "16", "--resolution.min_res", "32", "--resolution.max_res", "32",
         "--validation.robust_n_ex", "20", "--data.num_workers", "1", "--logging.progress", "0"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["replicas_in_sync"] == 2 and state["step"] == 2
    assert len(state["rng"]) == 2  # one RNG state per rank
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    assert epoch["n"] == 300 and epoch["robust_n"] == 20  # val shards reduced across ranks exactly


def test_vit_progressive_resizing_and_validation_at_another_resolution(tmp_path, demo_betons):
    """A ViT trains through progressive resizing (32, 48, 64 px) and validates at 48 px every epoch, under run_train.sh
    with 2 processes. The position embedding (kept at the final 64 px grid) is resampled on the fly with the same
    timm call as set_input_size, so the checkpoint evaluated at 48 px computes exactly what the training-time
    validation computed."""
    from rat.models import create_model, create_model_from_checkpoint

    env = _env()
    env["NPROC"] = "2"
    env["PYTHON"] = sys.executable
    run = tmp_path / "run"
    proc = subprocess.run(
        ["bash", "run_train.sh", "-C", "configs/demo.yaml", "--data.demo_root", str(demo_betons[0].parent),
         "--logging.folder", str(run), "--model.arch", "vit_micro_patch16_cvst", "--resolution.min_res", "32",
         "--resolution.max_res", "64", "--resolution.end_ramp", "2", "--training.epochs", "3",
         "--training.limit_batches", "2", "--training.batch_size", "16", "--validation.resolution", "48",
         "--validation.robust_n_ex", "10", "--data.num_workers", "1", "--logging.progress", "0"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["resolution"] for r in epochs] == [32, 48, 64] and epochs[-1]["n"] == 300  # validated at 48 px
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["model_kwargs"]["dynamic_img_size"] and state["model_kwargs"]["img_size"] == 64
    x = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    on_the_fly = create_model_from_checkpoint(run / "checkpoints" / "last.pt").eval()  # 64 px grid, dynamic
    kwargs = {k: v for k, v in state["model_kwargs"].items() if k not in ("dynamic_img_size", "img_size")}
    resampled = create_model("vit_micro_patch16_cvst", checkpoint=state, img_size=48, **kwargs).eval()  # rat.eval's
    with torch.no_grad():
        torch.testing.assert_close(on_the_fly(x), resampled(x), rtol=0, atol=1e-6)
