"""Trainer building blocks that need no data: LR schedules, resolution ramp, weight-decay groups, atomic checkpoints."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from rat.train.checkpoint import config_changes, load_resume_checkpoint, rng_state, save_atomic, set_rng_state
from rat.train.optim import build_optimizer, lr_at, param_groups, resolution_at

SPE = 10  # steps per epoch


def test_cosine_schedule_hits_its_values():
    kwargs = dict(epochs=100, lr=1e-3, schedule="cosine", warmup_epochs=20, min_lr=5e-6)
    total, warmup = 100 * SPE, 20 * SPE
    assert lr_at(0, SPE, **kwargs) == pytest.approx(1e-3 / warmup)  # first update: linear warm-up from 0
    assert lr_at(warmup // 2 - 1, SPE, **kwargs) == pytest.approx(0.5e-3)
    assert lr_at(warmup - 1, SPE, **kwargs) == pytest.approx(1e-3)  # peak exactly at lr_peak_epoch
    middle = warmup + (total - warmup) // 2 - 1
    assert lr_at(middle, SPE, **kwargs) == pytest.approx((1e-3 + 5e-6) / 2)
    assert lr_at(total - 1, SPE, **kwargs) == pytest.approx(5e-6)  # ends at min_lr as in the paper
    values = [lr_at(s, SPE, **kwargs) for s in range(warmup - 1, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after the peak


def test_step_and_cyclic_schedules():
    step = dict(epochs=90, lr=0.1, schedule="step", warmup_epochs=0, step_ratio=0.1, step_length=30)
    assert lr_at(0, SPE, **step) == pytest.approx(0.1)
    assert lr_at(30 * SPE - 1, SPE, **step) == pytest.approx(0.1)
    assert lr_at(30 * SPE, SPE, **step) == pytest.approx(0.01)
    assert lr_at(60 * SPE, SPE, **step) == pytest.approx(0.001)
    cyclic = dict(epochs=10, lr=0.5, schedule="cyclic", warmup_epochs=2)
    assert lr_at(2 * SPE - 1, SPE, **cyclic) == pytest.approx(0.5)
    assert lr_at(6 * SPE - 1, SPE, **cyclic) == pytest.approx(0.25)
    assert lr_at(10 * SPE - 1, SPE, **cyclic) == pytest.approx(0.0)


def test_progressive_resolution():
    ramp = dict(min_res=160, max_res=224, start_ramp=10, end_ramp=20, step=32)
    assert resolution_at(0, **ramp) == 160
    assert resolution_at(10, **ramp) == 160
    assert resolution_at(15, **ramp) == 192
    assert resolution_at(20, **ramp) == 224
    assert resolution_at(99, **ramp) == 224
    assert all(resolution_at(e, **ramp) % 32 == 0 for e in range(30))
    assert resolution_at(3, min_res=64, max_res=64, start_ramp=0, end_ramp=0) == 64


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
