"""Real 2-process runs (torchrun, gloo on CPU): the loaders shard, DDP replicas stay identical, and run_train.sh trains
with 2 processes. Each torchrun start costs ~15 s of imports here, so each run serves several checks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from process_support import subprocess_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ffcv]


N_INDEX = 50  # samples of the index beton; even: DistributedSampler pads nothing, so the train shards are disjoint


@pytest.fixture(scope="module")
def two_ranks(once, demo_betons) -> list[dict]:
    """One torchrun run of tests/ddp_train_worker.py with 2 ranks: the distributed loaders on a beton whose labels are
    the sample indices, then 3 DDP training steps, then a checkpoint write that fails on rank 0, then a BatchNorm model
    stopped, checkpointed and resumed, then gradient accumulation (and SyncBatchNorm, given 2 CUDA devices); each
    rank's JSON report."""
    from rat.data import write_arrays_beton
    from rat.data.demo import load_demo_arrays

    def build(out: Path) -> None:
        (out / "blocked").write_text("a file where the checkpoint folder's parent should be")
        images, _ = load_demo_arrays("val")
        index_beton = write_arrays_beton(images[:N_INDEX], np.arange(N_INDEX), out / "idx.beton",
                                         classes=[str(i) for i in range(N_INDEX)], write_mode="raw", num_workers=1)
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(REPO / "tests" / "ddp_train_worker.py"), str(demo_betons[0]), str(index_beton), str(out)],
            capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]

    out = once("two_ranks", build)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_rank_sharding(two_ranks):
    """Train shards are disjoint, cover the data and reshuffle per epoch; each rank validates its own contiguous run
    of the given indices (or of all samples), in order, disjoint, complete (no padding), sizes within one."""
    ranks = [r["shards"] for r in two_ranks]
    for epoch in ("0", "1"):
        shards = [r["train"][epoch][0] for r in ranks]
        assert len(shards[0]) == len(shards[1]) == N_INDEX // 2
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: ranks share samples"
        assert sorted(shards[0] + shards[1]) == list(range(N_INDEX)), f"epoch {epoch}: shards do not cover the data"
    for r in ranks:
        assert r["train"]["0"][0] == r["train"]["0"][1]  # set_epoch(0) again: same order
        assert r["train"]["0"][0] != r["train"]["1"][0]  # a new epoch reshuffles
        assert sorted(r["train"]["0"][0]) != sorted(r["train"]["1"][0])  # ... across ranks, not just within
        assert r["train_len"] == -(-(N_INDEX // 2) // 8)
    assert ranks[0]["val"] + ranks[1]["val"] == list(range(3, N_INDEX))
    assert abs(len(ranks[0]["val"]) - len(ranks[1]["val"])) <= 1
    assert ranks[0]["val_all"] + ranks[1]["val_all"] == list(range(N_INDEX))
    assert len(ranks[0]["val_all"]) == len(ranks[1]["val_all"]) == N_INDEX // 2
    assert [r["val_len"] for r in ranks] == [[3, 4], [3, 4]]  # ceil(24 / 8), ceil(23 / 8); ceil(25 / 8) each


def test_a_failed_checkpoint_write_stops_every_rank(two_ranks):
    """Rank 0 alone writes; when it cannot, every rank raises the same CheckpointWriteError (and so exits with status
    1 and that message) instead of waiting in its next collective for a rank that has gone."""
    errors = [r["write_error"] for r in two_ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "could not write checkpoint" in errors[0] and "resume with --training.resume auto" in errors[0]


def test_two_ranks_stay_in_sync_on_disjoint_shards(two_ranks, demo_betons):
    ranks = two_ranks
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # identical weights after 3 DDP steps (different inits)
    from ffcv.reader import Reader

    # DistributedSampler semantics: each rank reads ceil(N / 2) samples, of which full batches of 16 are kept.
    n_train = int(Reader(str(demo_betons[0])).num_samples)
    per_rank = -(-n_train // 2)
    kept = per_rank // 16 * 16
    assert n_train == 4491 and all(len(r["order"]) == kept for r in ranks)
    first, second = set(ranks[0]["order"]), set(ranks[1]["order"])
    assert len(first) == len(second) == kept  # no sample twice on a rank
    assert not first & second  # disjoint shards
    # together they cover the train set except the partial last batch of each rank
    assert len(first | second) == 2 * kept and n_train - 2 * kept <= 2 * (per_rank - kept)


def test_batchnorm_replicas_checkpoint_and_exact_resume(two_ranks):
    """resnet10t on 2 ranks, each normalizing its own batch: the BN statistics differ between ranks at the stop, the
    checkpoint holds their mean and passes the replica check (everything else equal), and the run resumed from it on
    fresh states ends bit-exactly as the straight one, on both ranks, which agree on everything after the epoch-end
    average (weights, buffers, EMA)."""
    runs = [r["batchnorm"] for r in two_ranks]
    assert [r["stopped_at"] for r in runs] == [[1, 1], [1, 1]] and [r["steps"] for r in runs] == [[3, 3], [3, 3]]
    assert [r["replicas_in_sync"] for r in runs] == [2, 2]
    own = [{k: torch.tensor(v, dtype=torch.float64) for k, v in r["own"].items()} for r in runs]
    assert own[0].keys() == runs[0]["checkpoint"].keys() and any("running_var" in k for k in own[0])
    assert any(not torch.equal(own[0][k], own[1][k]) for k in own[0])  # the ranks' statistics differ by design
    for name, value in runs[0]["checkpoint"].items():
        mean = ((own[0][name] + own[1][name]) / 2).float().double()
        assert torch.equal(torch.tensor(value, dtype=torch.float64), mean), name
    for r in runs:
        assert r["straight"].keys() == r["resumed"].keys()
        for name, value in r["straight"].items():
            assert value == r["resumed"][name], f"{name} differs after the resume"
    assert runs[0]["straight"] == runs[1]["straight"]


def test_two_ranks_of_two_micro_batches_equal_one_process_of_four(two_ranks):
    """The worker's 2 ranks × grad_accum 2 × b=8 against 1 process × grad_accum 4 × b=8 here, on the same 64 images,
    2 AdamW steps: weights within 1e-6 relative (the largest difference of a tensor over its largest value)."""
    from process_support import fixed_images, layernorm_classifier
    from torch import nn

    from rat.attacks import create_attack
    from rat.train.engine import StepOptions, train_one_epoch
    from rat.train.optim import build_optimizer
    from rat.train.state import TrainState
    from rat.train.task import AdversarialTask

    module = layernorm_classifier()
    attack = create_attack("apgd", module, norm="Linf", eps=4 / 255, n_iter=2)
    state = TrainState(module, build_optimizer(module, "adamw", 0.0, 0.05), attack)
    x, y = fixed_images(64)
    train_one_epoch(AdversarialTask(module, attack, nn.CrossEntropyLoss()),
                    [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)], state,
                    StepOptions(lr=lambda step: 1e-3 * (step + 1), grad_accum=4))
    assert state.step == 2
    ranks = [r["accumulated"] for r in two_ranks]
    assert ranks[0] == ranks[1]
    worst = 0.0
    for name, value in module.state_dict().items():
        ddp = torch.tensor(ranks[0][name], dtype=torch.float64).view(value.shape)
        worst = max(worst, ((ddp - value.double()).abs().max() / value.double().abs().max()).item())
    print(f"2 ranks x K=2 vs 1 process x K=4: max relative difference {worst:.2e}")
    assert worst <= 1e-6


def test_sync_batchnorm_statistics_are_those_of_the_global_batch(two_ranks):
    """With --model.sync_bn 1 (2 CUDA devices; torch's SyncBatchNorm has no CPU implementation), the BN running
    statistics after a forward pass of each rank's half equal those of one process over the whole batch."""
    if two_ranks[0]["sync_batchnorm"] is None:
        pytest.skip("SyncBatchNorm needs a CUDA device per rank (2)")
    from process_support import fixed_images

    from rat.models import create_model
    from rat.train.distributed import batchnorm_stats

    torch.manual_seed(0)
    module = create_model("resnet10t", num_classes=10).train()
    module(fixed_images(32, 32)[0])
    for name, value in batchnorm_stats(module).items():
        for rank in two_ranks:
            torch.testing.assert_close(torch.tensor(rank["sync_batchnorm"][name], dtype=torch.float64),
                                       value.double().flatten(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def two_process_run(once, demo_betons) -> Path:
    """One run of the user entry point, run_train.sh with NPROC=2 on CPU, serves every check below (a torchrun start
    costs ~15 s of imports on this machine): a ViT trains 3 epochs of 2 optimizer steps (each of 2 micro-batches of 8
    per process: a global batch of 32) through progressive resizing (32, 48, 64 px), validates at 48 px, and augments
    with the adversarial policy, its controller updated once per epoch from per-policy epoch losses averaged over both
    ranks (the default schedule)."""
    def build(out: Path) -> None:
        proc = subprocess.run(
            ["bash", "run_train.sh", "-C", "configs/demo.yaml", "--data.demo_root", str(demo_betons[0].parent),
             "--logging.folder", str(out / "run"), "--model.arch", "vit_micro_patch16_cvst", "--resolution.min_res",
             "32", "--resolution.max_res", "64", "--resolution.end_ramp", "2", "--training.epochs", "3",
             "--training.limit_batches", "2", "--training.batch_size", "8", "--training.grad_accum", "2",
             "--validation.resolution", "48",
             "--validation.robust_n_ex", "10", "--data.num_workers", "1", "--logging.progress", "0",
             "--logging.tensorboard", "1", "--augment.policy", "adversarial", "--aaa.num_policies", "2",
             "--aaa.batch_fraction", "0.5"],
            capture_output=True, text=True, timeout=600, env=subprocess_env(NPROC="2"), cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return once("two_process_run", build) / "run"


def test_run_train_sh_two_processes_write_one_checkpoint(two_process_run):
    """Rank 0 writes one checkpoint holding both ranks' RNG states, after checking the replicas (model and policy
    controller) are identical; validation shards are reduced across ranks exactly; rank 0 alone writes TensorBoard."""
    state = torch.load(two_process_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["replicas_in_sync"] == 2 and state["step"] == 6
    assert len(state["rng"]) == 2  # one RNG state per rank
    assert state["global_batch"] == 32 and state["batchnorm_ranks"] is None  # 8 x 2 micro-batches x 2 processes
    assert json.loads((two_process_run / "params.json").read_text())["run_record"] == {"world_size": 2,
                                                                                       "global_batch": 32}
    first = next(line for line in (two_process_run / "train.log").read_text().splitlines() if "training " in line)
    assert "global batch 32 (8 per process x 2 accumulated x 2 processes), 2 optimizer steps/epoch" in first
    records = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "epoch"][-1]
    assert last["n"] == 300 and last["robust_n"] == 10
    # TensorBoard: one event file (rank 0 only), every epoch record's numbers as scalars at its global step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((two_process_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(two_process_run / "tensorboard"))
    events.Reload()
    epochs = [r for r in records if r["kind"] == "epoch" and "top1" in r]  # validated epochs (demo.yaml: every 2)
    assert [(e.step, e.value) for e in events.Scalars("epoch/top1")] == [(r["step"], pytest.approx(r["top1"]))
                                                                        for r in epochs]


def test_two_ranks_keep_one_policy_controller(two_process_run):
    """Each step's per-policy losses are averaged over ranks into the epoch's sums, so both controllers take the same
    update at each epoch's end (the replica check above covers the controller too, and would have stopped the run
    otherwise)."""
    state = torch.load(two_process_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["augment_policy"]["updates"] == 3 and state["augment_policy"]["loss_steps"] == 0


def test_vit_progressive_resizing_and_validation_at_another_resolution(two_process_run):
    """The position embedding (kept at the final 64 px grid) is resampled on the fly with the same timm call as
    set_input_size, so the checkpoint evaluated at 48 px computes exactly what the training-time validation computed."""
    from rat.models import create_model, create_model_from_checkpoint

    run = two_process_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["resolution"] for r in epochs] == [32, 48, 64]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["model_kwargs"]["dynamic_img_size"] and state["model_kwargs"]["img_size"] == 64
    x = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    on_the_fly = create_model_from_checkpoint(run / "checkpoints" / "last.pt").eval()  # 64 px grid, dynamic
    kwargs = {k: v for k, v in state["model_kwargs"].items() if k not in ("dynamic_img_size", "img_size")}
    resampled = create_model("vit_micro_patch16_cvst", checkpoint=state, img_size=48, **kwargs).eval()  # rat.eval's
    with torch.no_grad():
        torch.testing.assert_close(on_the_fly(x), resampled(x), rtol=0, atol=1e-6)
