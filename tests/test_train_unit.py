"""Trainer building blocks that need no data: LR schedules, resolution ramp, weight-decay groups, atomic checkpoints,
the training state and its checkpoint format, the adversarial task, the per-step contract of ``train_one_epoch``."""
from __future__ import annotations

import math
import os

import pytest
import torch
from process_support import fixed_images, layernorm_classifier, stop_after_checks
from torch import nn

from rat.train.checkpoint import config_changes, load_resume_checkpoint, rng_state, save_atomic, set_rng_state
from rat.train.engine import EpochHooks, EpochResult, StepOptions, train_one_epoch
from rat.train.optim import build_optimizer, param_groups
from rat.train.spec import LRSpec, ResolutionSpec
from rat.train.state import TrainState
from rat.train.task import AdversarialTask

SPE = 10  # steps per epoch


def _lr(epochs: int, **fields):
    """``LRSpec(**fields).lr_at`` for ``epochs`` epochs of SPE steps (the unused fields at their defaults)."""
    spec = LRSpec(**{"min_lr": 5e-6, "step_ratio": 0.1, "step_length": 30, **fields})
    return lambda step: spec.lr_at(step, SPE, epochs=epochs)


def test_cosine_schedule_hits_its_values():
    lr_at = _lr(100, lr=1e-3, schedule="cosine", warmup_epochs=20, min_lr=5e-6)
    total, warmup = 100 * SPE, 20 * SPE
    assert lr_at(0) == pytest.approx(1e-3 / warmup)  # first update: linear warm-up from 0
    assert lr_at(warmup // 2 - 1) == pytest.approx(0.5e-3)
    assert lr_at(warmup - 1) == pytest.approx(1e-3)  # peak exactly at lr_peak_epoch
    middle = warmup + (total - warmup) // 2 - 1
    assert lr_at(middle) == pytest.approx((1e-3 + 5e-6) / 2)
    assert lr_at(total - 1) == pytest.approx(5e-6)  # ends at min_lr as in the paper
    values = [lr_at(s) for s in range(warmup - 1, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after the peak


def test_step_and_cyclic_schedules():
    step = _lr(90, lr=0.1, schedule="step", warmup_epochs=0, step_ratio=0.1, step_length=30)
    assert step(0) == pytest.approx(0.1)
    assert step(30 * SPE - 1) == pytest.approx(0.1)
    assert step(30 * SPE) == pytest.approx(0.01)
    assert step(60 * SPE) == pytest.approx(0.001)
    cyclic = _lr(10, lr=0.5, schedule="cyclic", warmup_epochs=2)
    assert cyclic(2 * SPE - 1) == pytest.approx(0.5)
    assert cyclic(6 * SPE - 1) == pytest.approx(0.25)
    assert cyclic(10 * SPE - 1) == pytest.approx(0.0)


def test_progressive_resolution():
    ramp = ResolutionSpec(min_res=160, max_res=224, start_ramp=10, end_ramp=20, step=32)
    assert ramp.resolution_at(0) == 160
    assert ramp.resolution_at(10) == 160
    assert ramp.resolution_at(15) == 192
    assert ramp.resolution_at(20) == 224
    assert ramp.resolution_at(99) == 224
    assert all(ramp.resolution_at(e) % 32 == 0 for e in range(30))
    assert ResolutionSpec(min_res=64, max_res=64, start_ramp=0, end_ramp=0, step=32).resolution_at(3) == 64


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.head = nn.Linear(8, 2)

    def no_weight_decay(self):
        return {"pos_embed"}


def test_no_weight_decay_on_norm_bias_and_position_parameters():
    model = _Tiny()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["head.weight", "inner.0.weight"]
    assert "pos_embed" in {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [len(g["params"]) for g in param_groups(model, 0.0)] == [2, 5]  # the same two groups without decay
    opt = build_optimizer(model, "adamw", 1e-3, 0.05)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert isinstance(build_optimizer(model, "sgd", 0.1, 5e-4, nesterov=True), torch.optim.SGD)


@pytest.mark.parametrize("arch", ["vit_micro_patch16_cvst", "convnext_micro_cvst", "convnext_iso_small_cvst"])
def test_param_groups_are_timms_on_rat_models(arch):
    """rat's groups on a model from rat.models.create_model are timm's param_groups_weight_decay groups (decay-first
    order), and they keep the membership rat used before: every norm, bias and LayerScale gain, the position
    embedding and the class token without decay, every other weight with it."""
    from timm.optim import param_groups_weight_decay

    import rat.models as rm

    kwargs = {"init_values": 1e-6} if arch.startswith("vit") else {}  # LayerScale gains as in ViT-M-CvSt
    with torch.device("meta"):
        model = rm.create_model(arch, num_classes=10, **kwargs)
    decay, no_decay = param_groups(model, 0.05)
    timm_no_decay, timm_decay = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay()
                                                          if hasattr(model, "no_weight_decay") else ())
    assert [id(p) for p in decay["params"]] == [id(p) for p in timm_decay["params"]]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in timm_no_decay["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {n for n, p in model.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}
    assert {names[id(p)] for p in no_decay["params"]} == exempt
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - exempt
    if arch.startswith("vit"):
        assert {"pos_embed", "cls_token", "blocks.0.ls1.gamma", "patch_embed.proj.0.conv.bias"} <= exempt


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_resume_resolution(tmp_path):
    assert load_resume_checkpoint("", tmp_path) is None
    assert load_resume_checkpoint("auto", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    save_atomic({"epoch": 3}, tmp_path / "checkpoints" / "last.pt")
    assert load_resume_checkpoint("auto", tmp_path) == (tmp_path / "checkpoints" / "last.pt", {"epoch": 3})
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_resume_checkpoint(str(tmp_path / "missing.pt"), tmp_path)


def test_resume_refuses_settings_that_cannot_change():
    recorded = {"training": {"epochs": 10, "optimizer": "adamw"}, "lr": {"lr": 1e-3}, "logging": {"folder": "a"}}
    current = {"training": {"epochs": 20, "optimizer": "sgd"}, "lr": {"lr": 5e-4}, "logging": {"folder": "b"},
               "augment": {"new_key": 1}}  # a key the checkpoint's rat version did not have is not compared
    refused, allowed = config_changes(recorded, current)
    assert refused == ["training.optimizer: 'adamw' -> 'sgd'"]
    assert allowed == ["training.epochs: 10 -> 20", "lr.lr: 0.001 -> 0.0005", "logging.folder: 'a' -> 'b'"]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    generator = torch.Generator().manual_seed(3)
    save_atomic({"rng": rng_state(generator)}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"], generator)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    assert expected == again
    assert not math.isnan(expected[0]) and os.path.exists(tmp_path / "r.pt")


# ---------------------------------------------------------------------------------------------------------------------
# TrainState (the checkpoint), AdversarialTask and train_one_epoch on a tiny classifier and in-memory batches.

# The keys of the checkpoint, in the order rat.train has always written them.
CHECKPOINT_KEYS = ["model", "model_ema", "optimizer", "scaler", "epoch", "step", "batches_done", "arch", "attack",
                   "replicas_in_sync", "model_kwargs", "config", "rng", "metrics", "best_robust", "augment_policy"]
# ... and the records added since (absent from older checkpoints): each rank's BatchNorm statistics, the global batch.
NEW_KEYS = ["batchnorm_ranks", "global_batch"]


def _classifier(init_seed: int, batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(init_seed)
    norm = [nn.BatchNorm2d(4)] if batch_norm else []
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _state(init_seed: int) -> TrainState:
    """Every part a TrainState can hold: EMA, fp16 scaler, a two-norm (E-AT) attack, the adversarial policy."""
    from timm.utils import ModelEmaV3

    from rat.attacks import create_attack
    from rat.augment import AdversarialAugment, PolicySpace

    module = _classifier(init_seed)
    generator = torch.Generator().manual_seed(5)
    policy = AdversarialAugment(PolicySpace(("Rotate", "Invert"), (0, 5), 2, 1), num_policies=2, schedule="step",
                                lr=0.01, update_every=3, seed=7, augment_generator=generator, hidden_size=8)
    attack = create_attack("apgd", module, norm=["Linf", "L1"], eps=[4 / 255, 5.0], n_iter=[1, 1], seed=3)
    return TrainState(module, build_optimizer(module, "adamw", 1e-3, 0.05), attack, ema=ModelEmaV3(module, decay=0.5),
                      scaler=torch.amp.GradScaler("cpu"), augmentation=policy, arch="tiny",
                      model_kwargs={"num_classes": 3}, config={"training": {"epochs": 2}, "adv": {"attack": "apgd"}})


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(n)]


def _epoch(state: TrainState, batches, **options) -> EpochResult:
    task = AdversarialTask(state.module, state.attack, nn.CrossEntropyLoss())
    return train_one_epoch(task, batches, state, StepOptions(lr=lambda step: 1e-2, **options))


def _todays_checkpoint(state: TrainState, metrics: dict) -> dict:
    """A checkpoint exactly as rat.train wrote it before TrainState existed (its ``checkpoint`` closure's dict, one
    rank): the format that older runs left on disk."""
    return {"model": state.module.state_dict(), "model_ema": state.ema.module.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scaler": state.scaler.state_dict(),
            "epoch": state.epoch, "step": state.step, "batches_done": state.batches_done, "arch": state.arch,
            "attack": state.attack.state_dict(), "replicas_in_sync": 1, "model_kwargs": state.model_kwargs,
            "config": state.config, "rng": [rng_state(state.augmentation.generator)], "metrics": metrics,
            "best_robust": state.best, "augment_policy": state.augmentation.state_dict()}


def _assert_same(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_a_checkpoint_in_todays_format_resumes_exactly(tmp_path):
    """A checkpoint with exactly the keys (and key order) rat.train has written so far, saved to disk and read back
    the trainer's way: a fresh state (other initial weights) loads it, writes it back unchanged, and trains on exactly
    as the state that wrote it."""
    first = _state(init_seed=0)
    _epoch(first, _batches(2))  # optimizer moments, EMA, attack calls, policy updates pending, RNG advanced
    first.epoch, first.batches_done, first.best = 1, 0, 12.5
    legacy = _todays_checkpoint(first, {"kind": "epoch", "epoch": 1, "top1": 40.0})
    assert list(legacy) == CHECKPOINT_KEYS
    (tmp_path / "checkpoints").mkdir()
    save_atomic(legacy, tmp_path / "checkpoints" / "last.pt")
    _epoch(first, _batches(2, seed=1))
    _, loaded = load_resume_checkpoint("auto", tmp_path)
    resumed = _state(init_seed=1)
    resumed.load_state_dict(loaded)  # also restores this process's RNG to where `first` saved it
    assert (resumed.epoch, resumed.step, resumed.batches_done, resumed.best) == (1, 2, 0, 12.5)
    again = resumed.state_dict()
    assert list(again) == CHECKPOINT_KEYS + NEW_KEYS
    assert again["batchnorm_ranks"] is None and again["global_batch"] == 0  # one process; no batch recorded
    _assert_same({k: v for k, v in again.items() if k not in ["metrics", *NEW_KEYS]},
                 {k: v for k, v in loaded.items() if k != "metrics"})
    assert again["metrics"] == {}  # a record of the epoch that wrote it, not state: a resumed run starts with none
    _epoch(resumed, _batches(2, seed=1))
    for name, value in first.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name]), name
    _assert_same(first.augmentation.state_dict(), resumed.augmentation.state_dict())
    assert first.step == resumed.step == 4


def test_a_checkpoint_of_an_older_rat_resumes_with_fresh_parts(caplog):
    """Checkpoints of rat versions before batches_done, best_robust, the scaler, the policy and per-rank RNG states."""
    old = _todays_checkpoint(_state(init_seed=0), {})
    for key in ("batches_done", "best_robust", "scaler", "augment_policy", "rng"):
        del old[key]
    state = _state(init_seed=1)
    state.load_state_dict(old)
    assert (state.epoch, state.batches_done, state.best) == (0, 0, -1.0)
    assert torch.equal(state.module[0].weight, old["model"]["0.weight"])
    assert "no adversarial policy state" in caplog.text and "RNG states for 0 ranks" in caplog.text


def test_adversarial_task_is_the_mixed_adversarial_loss():
    """``(1 − w)·CE(f(x_adv), y) + w·CE(f(x), y)`` with x_adv from the same attack (same seed, same call), and the
    model's training mode kept."""
    from rat.attacks import create_attack

    model = _classifier(0, batch_norm=False).train()
    x, y = _batches(1)[0]
    task = AdversarialTask(model, create_attack("apgd", model, norm="Linf", eps=8 / 255, n_iter=2, seed=4),
                           nn.CrossEntropyLoss(), mixed_loss=0.25)
    result = task(x, y)
    x_adv = create_attack("apgd", model, norm="Linf", eps=8 / 255, n_iter=2, seed=4).perturb(x, y)
    expected = 0.75 * nn.functional.cross_entropy(model(x_adv), y) + 0.25 * nn.functional.cross_entropy(model(x), y)
    assert model.training
    assert torch.equal(result.x_adv, x_adv) and (x_adv - x).abs().max() > 0
    torch.testing.assert_close(result.loss, expected)
    with pytest.raises(ValueError, match="mixed_loss"):
        AdversarialTask(model, task.attack, nn.CrossEntropyLoss(), mixed_loss=1.5)


class _StopAfter(EpochHooks):
    def __init__(self, steps: int):
        self.steps, self.records = steps, []

    def stop_requested(self) -> bool:
        return len(self.records) >= self.steps - 1 if self.steps else False

    def log(self, record: dict) -> None:
        self.records.append(record)


def test_train_one_epoch_steps_skips_and_stops():
    """The per-step contract: lr of each step, ε warm-up, skipped batches of a mid-epoch checkpoint, a stop request
    honoured after its step (and logged), a non-finite loss stopping before its update."""
    from rat.attacks import create_attack, eps_warmup_factor

    module = _classifier(0)
    state = TrainState(module, build_optimizer(module, "sgd", 0.1, 0.0),
                       create_attack("apgd", module, norm="Linf", eps=4 / 255, n_iter=1), batches_done=1, step=7)
    hooks = _StopAfter(0)
    task = AdversarialTask(module, state.attack, nn.CrossEntropyLoss())
    options = StepOptions(lr=lambda step: 0.01 * step, steps_per_epoch=4, eps_warmup_epochs=3, log_every=1)
    result = train_one_epoch(task, _batches(6), state, options, hooks=hooks, resolution=8)
    assert (result.batches, result.stop_reason, state.step, state.batches_done) == (4, None, 10, 4)
    assert [r["lr"] for r in hooks.records] == [0.07, 0.08, 0.09] and hooks.records[0]["resolution"] == 8
    assert state.optimizer.param_groups[0]["lr"] == 0.09
    assert state.attack.eps_scale == eps_warmup_factor(10 / 4, 3)

    state.batches_done, hooks = 0, _StopAfter(2)
    result = train_one_epoch(task, _batches(6), state, options, hooks=hooks)
    assert (result.stop_reason, result.batches, state.step) == ("sigterm", 2, 12) and len(hooks.records) == 2

    before = {k: v.clone() for k, v in module.state_dict().items()}
    batches = _batches(3)
    batches[1] = (torch.full_like(batches[1][0], float("nan")), batches[1][1])
    state.batches_done = 0
    task.attack = create_attack("none", module)
    result = train_one_epoch(task, batches, state, options)
    assert (result.stop_reason, result.batches, state.step, state.batches_done) == ("nonfinite", 1, 13, 1)
    assert any(not torch.equal(p, before[k]) for k, p in module.named_parameters())  # the first batch's update
    assert all(torch.isfinite(p).all() for p in module.parameters())  # and not the NaN batch's


def test_fgsm_takes_one_step_whatever_n_iter_says():
    """adv.n_iter is recorded as given; the FGSM attack built from the spec takes one step."""
    pytest.importorskip("ffcv")
    from rat.train.build import build_attack
    from rat.train.spec import TrainSpec, make_train_config

    spec = TrainSpec.from_config(make_train_config(["--adv.attack", "fgsm", "--adv.n_iter", "3"]))
    assert spec.to_dict()["adv"]["n_iter"] == "3"
    assert spec.adv.threat_models == [("Linf", 4 / 255, 1)]
    assert build_attack(spec.adv, _classifier(0), seed=0).n_iter == 1
    apgd = TrainSpec.from_config(make_train_config(["--adv.attack", "apgd", "--adv.n_iter", "3,2",
                                                    "--adv.norm", "Linf,L2"]))
    assert [a.n_iter for a in build_attack(apgd.adv, _classifier(0), seed=0).attacks] == [3, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation: K micro-batches of b per optimizer step are one step of K·b (a LayerNorm model, whose output
# for an image does not depend on the rest of its batch, and APGD without random start, which attacks each image on
# its own), with every per-step schedule counted in optimizer steps.

def _accum_state(micro_batches: int) -> TrainState:
    """AdamW, an EMA, and E-AT's Linf/L2 alternation, one norm per optimizer step."""
    from timm.utils import ModelEmaV3

    from rat.attacks import create_attack

    module = layernorm_classifier()
    attack = create_attack("apgd", module, norm=["Linf", "L2"], eps=[4 / 255, 0.5], n_iter=[2, 2], seed=1,
                           calls_per_norm=micro_batches)
    return TrainState(module, build_optimizer(module, "adamw", 0.0, 0.05), attack, ema=ModelEmaV3(module, decay=0.5))


def _images(n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed images and labels, as batches of ``size``."""
    x, y = fixed_images(n)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


def _accum_epoch(state: TrainState, batches, micro_batches: int, hooks: EpochHooks | None = None) -> EpochResult:
    task = AdversarialTask(state.module, state.attack, nn.CrossEntropyLoss())
    options = StepOptions(lr=lambda step: 1e-3 * (step + 1), grad_accum=micro_batches, eps_warmup_epochs=4,
                          log_every=1)
    return train_one_epoch(task, batches, state, options, hooks=hooks)


def _max_relative_difference(a: nn.Module, b: nn.Module) -> float:
    """max over tensors of max|a − b| / max|b| (parameters and buffers)."""
    other = b.state_dict()
    return max(((v - other[k]).abs().max() / other[k].abs().max().clamp_min(1e-12)).item()
               for k, v in a.state_dict().items() if v.is_floating_point())


def test_grad_accum_equals_one_step_of_the_whole_batch():
    """2 optimizer steps of K=4 × b=8 == 2 steps of b=32 on the same 64 images (fp32): weights and EMA within 1e-6
    relative (the largest difference of a tensor over its largest value); the lr, the ε warm-up, the EMA, E-AT's
    norm (Linf, then L2) and the records all count optimizer steps."""
    big, small = _accum_state(1), _accum_state(4)
    big_hooks, small_hooks = _StopAfter(0), _StopAfter(0)
    _accum_epoch(big, _images(64, 32), 1, big_hooks)
    small_result = _accum_epoch(small, _images(64, 8), 4, small_hooks)
    assert (small.step, small.batches_done, small_result.batches) == (2, 8, 8)
    assert (big.step, big.batches_done) == (2, 2)
    assert small.attack.attacks[0].eps_scale == big.attack.attacks[0].eps_scale < 1  # ε warm-up: step 2 of 2 / 4
    assert [a.state_dict()["calls"] for a in small.attack.attacks] == [4, 4]  # 4 micro-batches per norm
    assert [a.state_dict()["calls"] for a in big.attack.attacks] == [1, 1]
    assert [r["step"] for r in small_hooks.records] == [1, 2]
    assert [r["lr"] for r in small_hooks.records] == [r["lr"] for r in big_hooks.records] == [1e-3, 2e-3]
    for a, b in zip(small_hooks.records, big_hooks.records):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    weights, ema = _max_relative_difference(small.module, big.module), \
        _max_relative_difference(small.ema.module, big.ema.module)
    print(f"K=4 x b=8 vs b=32 after 2 AdamW steps: max relative difference weights {weights:.2e}, EMA {ema:.2e}")
    assert weights <= 1e-6 and ema <= 1e-6
    assert _max_relative_difference(small.module, _accum_state(1).module) > 1e-3  # the steps did change the weights


def test_a_stop_in_the_middle_of_an_accumulation_resumes_at_the_step_boundary_exactly(tmp_path):
    """A stop request during micro-batch 2 of 4 finishes the optimizer step first (the checkpoint stands at its
    boundary, batches_done 4), and a fresh state resumed from that checkpoint on disk ends the epoch exactly as an
    uninterrupted run does."""
    from rat.models import load_checkpoint_file

    straight = _accum_state(4)
    _accum_epoch(straight, _images(64, 8), 4)
    stopped = _accum_state(4)
    result = _accum_epoch(stopped, _images(64, 8), 4, stop_after_checks(2))
    assert (result.stop_reason, stopped.step, stopped.batches_done, result.batches) == ("sigterm", 1, 4, 4)
    save_atomic(stopped.state_dict(), tmp_path / "last.pt")
    resumed = _accum_state(4)
    resumed.load_state_dict(load_checkpoint_file(tmp_path / "last.pt"))
    assert (resumed.step, resumed.batches_done) == (1, 4)
    _accum_epoch(resumed, _images(64, 8), 4)
    assert resumed.step == straight.step == 2
    for key in ("module", "ema"):
        a = getattr(straight, key).state_dict()
        for name, value in getattr(resumed, key).state_dict().items():
            assert torch.equal(value, a[name]), f"{key}.{name} differs after resuming"


def test_fused_adamw_and_cudnn_benchmark_are_settings_a_resume_may_change():
    """``--training.fused 1`` builds torch's fused AdamW (default: the multi-tensor one, as before), and neither it nor
    ``--training.cudnn_benchmark`` (speed only) blocks a resume."""
    from rat.train.spec import TrainSpec, make_train_config

    spec = TrainSpec.from_config(make_train_config(["--training.fused", "1", "--training.cudnn_benchmark", "1"]))
    assert (spec.training.fused, spec.training.cudnn_benchmark) == (1, 1)
    module = _classifier(0)
    assert build_optimizer(module, "adamw", 1e-3, 0.05, fused=bool(spec.training.fused)).defaults["fused"] is True
    assert not build_optimizer(module, "adamw", 1e-3, 0.05).defaults["fused"]
    refused, allowed = config_changes({"training": {"fused": 0, "cudnn_benchmark": 0}},
                                      {"training": {"fused": 1, "cudnn_benchmark": 1}})
    assert refused == [] and len(allowed) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_training_step_synchronises_with_the_host_once():
    """On CUDA the step waits for the device once (the non-finite stop reads the all-reduced flags); the loss for
    the records comes from the same read, not from a second one after the backward pass and the update."""
    import warnings

    from rat.attacks import create_attack

    module = _classifier(0).cuda()
    state = TrainState(module, build_optimizer(module, "adamw", 1e-3, 0.05, fused=True),
                       create_attack("apgd", module, norm="Linf", eps=4 / 255, n_iter=2))
    task = AdversarialTask(module, state.attack, nn.CrossEntropyLoss())
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(4)]
    options = StepOptions(lr=lambda step: 1e-3, precision="bf16", log_every=1)
    train_one_epoch(task, batches[:1], state, options)  # warm-up: the attack's one-time input range check
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(task, batches[1:], state, options)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 3, [str(w.message) for w in syncs]


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(capsys, caplog):
    """One rule for every entry point (rat.logging.progress): auto draws a tqdm bar only when stderr is a terminal;
    elsewhere (a log file) about 20 plain lines per loop, never a carriage return; 1 forces the bar, 0 never."""
    import logging
    import sys

    from tqdm import tqdm

    from rat.logging import LineProgress, bars_enabled, progress, progress_setting

    assert not sys.stderr.isatty()  # pytest captures it
    assert isinstance(progress(total=3, setting="auto"), LineProgress)
    assert isinstance(progress(total=3, setting="0"), LineProgress)
    forced = progress(total=3, setting="1")
    assert isinstance(forced, tqdm)
    forced.close()
    assert bars_enabled(True) and not bars_enabled(False) and progress_setting(0) == "0"
    with pytest.raises(ValueError, match="auto, 1, 0"):
        progress_setting("yes")
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="rat.progress"):
        for _ in progress(range(1000), desc="images", setting="auto"):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "rat.progress"]
    assert len(lines) == 20 and lines[0].startswith("images: 50/1000 (5%)")
    assert lines[-1].startswith("images: 1000/1000 (100%)") and "ETA 00:00" in lines[-1]
    assert "\r" not in capsys.readouterr().err


def test_checkpoint_retention_keeps_the_newest_epochs_best_and_last(tmp_path, caplog):
    """keep=2 over 5 epochs (best at epoch 2): epoch_0004.pt, epoch_0005.pt, best.pt and last.pt remain; a write that
    fails deletes nothing; a damaged last.pt resumes from the newest epoch file kept."""
    from rat.train.checkpoint import CheckpointWriteError, save_training_checkpoint

    caplog.set_level("INFO", logger="rat.train.checkpoint")
    folder = tmp_path / "checkpoints"
    for epoch in range(1, 6):
        save_training_checkpoint({"epoch": epoch}, folder, [f"epoch_{epoch:04d}.pt"] + (["best.pt"] * (epoch == 2)),
                                 keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "epoch_0004.pt", "epoch_0005.pt", "last.pt"]
    assert torch.load(folder / "best.pt", weights_only=True)["epoch"] == 2
    assert "deleted epoch_0003.pt (logging.keep_checkpoints=2)" in caplog.text

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(CheckpointWriteError):
        save_training_checkpoint({"epoch": Unpicklable()}, folder, ["epoch_0006.pt"], keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "epoch_0004.pt", "epoch_0005.pt", "last.pt"]
    (folder / "last.pt").write_bytes((folder / "last.pt").read_bytes()[:100])  # a copy cut short
    path, state = load_resume_checkpoint("auto", tmp_path)
    assert path == folder / "epoch_0005.pt" and state == {"epoch": 5}
