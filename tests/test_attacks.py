"""Tests of rat.attacks: exact projections, the attack contract, training helpers, and APGD against AutoAttack."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rat.attacks import (
    ATTACKS,
    DEFAULT_EPS,
    APGDAttack,
    FGSMAttack,
    MultiNormAttack,
    NoAttack,
    PGDAttack,
    adversarial_loss,
    create_attack,
    eps_warmup_factor,
    lp_norm,
    project,
    register_attack,
)
from rat.attacks.norms import random_in_ball, select

# ----------------------------------------------------------------------------------------------------------------
# Reference projections: slow, float64, obviously correct.
#
# The projection onto {‖d‖ ≤ ε} ∩ {lo ≤ d ≤ hi} (lo = -x ≤ 0 ≤ hi = 1 - x) minimises ‖d − v‖². For L2 the Lagrangian
# (1 + μ)‖d‖² − 2⟨d, v⟩ is separable, so d = clip(v / (1 + μ), lo, hi); for L1 the Lagrangian ‖d − v‖² + 2λ‖d‖₁ is
# separable, so d = clip(soft_threshold(v, λ), lo, hi). μ, λ ≥ 0 are the smallest values that make d feasible; the
# norm of d is monotone in them, so plain bisection finds them. Linf is a box: clip coordinate by coordinate.
# For n = 2 a brute-force grid search over the feasible set double-checks the references themselves.
# ----------------------------------------------------------------------------------------------------------------


def _ref_project(v: np.ndarray, x: np.ndarray, norm: str, eps: float) -> np.ndarray:
    lo, hi = -x, 1.0 - x
    if norm == "Linf":
        return np.array([min(max(vi, lo_i, -eps), hi_i, eps) for vi, lo_i, hi_i in zip(v, lo, hi)])
    if norm == "L2":
        def candidate(s: float) -> np.ndarray:
            return np.clip(s * v, lo, hi)

        size = lambda s: np.sqrt(np.sum(candidate(s) ** 2))  # noqa: E731
        if size(1.0) <= eps:
            return candidate(1.0)
        a, b = 0.0, 1.0
        for _ in range(200):
            mid = 0.5 * (a + b)
            a, b = (a, mid) if size(mid) > eps else (mid, b)
        return candidate(a)

    def candidate(lam: float) -> np.ndarray:
        return np.clip(np.sign(v) * np.maximum(np.abs(v) - lam, 0.0), lo, hi)

    size = lambda lam: np.sum(np.abs(candidate(lam)))  # noqa: E731
    if size(0.0) <= eps:
        return candidate(0.0)
    a, b = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if size(mid) > eps else (a, mid)
    return candidate(b)


def _norm_np(d: np.ndarray, norm: str) -> float:
    return float({"Linf": np.abs(d).max(), "L2": np.sqrt((d ** 2).sum()), "L1": np.abs(d).sum()}[norm])


@st.composite
def _projection_case(draw):
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (batch, n))
    x[rng.uniform(size=x.shape) < 0.15] = 0.0  # pixels on the box faces
    x[rng.uniform(size=x.shape) < 0.15] = 1.0
    scale = draw(st.sampled_from([1e-3, 0.05, 0.3, 1.0, 5.0]))
    v = rng.normal(0.0, scale, (batch, n))
    v[rng.uniform(size=v.shape) < 0.1] = 0.0
    eps = draw(st.floats(1e-3, 10.0))
    return x.astype(np.float32), v.astype(np.float32), eps


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_projection_case())
def test_projection_feasible_and_nearest(norm, case):
    x, v, eps = case
    out = project(torch.from_numpy(v), torch.from_numpy(x), norm, eps).double().numpy()
    for i in range(x.shape[0]):
        xi, vi = x[i].astype(np.float64), v[i].astype(np.float64)
        assert np.all(xi + out[i] >= -1e-6) and np.all(xi + out[i] <= 1 + 1e-6), "left the [0, 1] box"
        assert _norm_np(out[i], norm) <= eps * (1 + 1e-5) + 1e-6, "left the ε-ball"
        ref = _ref_project(vi, xi, norm, eps)
        scale = max(1.0, float(np.abs(vi).max()))
        np.testing.assert_allclose(out[i], ref, atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_projection_beats_brute_force_grid_in_2d(norm):
    """In two dimensions, no point of a fine grid over the feasible set is closer to v than the projection."""
    rng = np.random.default_rng(0)
    grid = np.linspace(-1.0, 1.0, 401)
    gx, gy = np.meshgrid(grid, grid)
    points = np.stack([gx.ravel(), gy.ravel()], axis=1)
    for _ in range(20):
        x = rng.uniform(0, 1, 2)
        v = rng.normal(0, 0.8, 2)
        eps = float(rng.uniform(0.05, 1.2))
        norms = {"Linf": np.abs(points).max(1), "L2": np.sqrt((points ** 2).sum(1)), "L1": np.abs(points).sum(1)}[norm]
        feasible = points[(norms <= eps) & np.all(x + points >= 0, axis=1) & np.all(x + points <= 1, axis=1)]
        best = np.sqrt(((feasible - v) ** 2).sum(1)).min()
        out = project(torch.tensor(v[None], dtype=torch.float32), torch.tensor(x[None], dtype=torch.float32),
                      norm, eps)[0].double().numpy()
        ours = np.sqrt(((out - v) ** 2).sum())
        assert ours <= best + 1e-7, (norm, x, v, eps, ours, best)
        np.testing.assert_allclose(out, _ref_project(v, x, norm, eps), atol=1e-5)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_projection_is_idempotent_and_layout_independent(norm):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 8, 8, generator=gen)
    v = torch.randn(4, 3, 8, 8, generator=gen)
    eps = {"Linf": 0.1, "L2": 1.0, "L1": 6.0}[norm]
    once = project(v, x, norm, eps)
    torch.testing.assert_close(project(once, x, norm, eps), once, atol=1e-6, rtol=0)
    cl = torch.channels_last
    out_cl = project(v.contiguous(memory_format=cl), x.contiguous(memory_format=cl), norm, eps)
    assert out_cl.is_contiguous(memory_format=cl)
    torch.testing.assert_close(out_cl, once, atol=1e-6, rtol=0)
    per_sample = project(v, x, norm, torch.full((4,), eps))
    torch.testing.assert_close(per_sample, once, atol=1e-6, rtol=0)


def test_select_is_an_exact_per_sample_where():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(64, 3, 5, 5, generator=gen) * 10 - 5
    b = torch.rand(64, 3, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    a[0] = 0.1
    b[0] = 0.3  # (0.1 - 0.3) + 0.3 != 0.1 in floating point: a lerp with the wrong formula would fail here
    mask = torch.rand(64, generator=gen) > 0.5
    mask[0] = True
    assert torch.equal(select(mask, a, b), torch.where(mask.view(-1, 1, 1, 1), a, b))


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_random_start_lies_in_ball(norm):
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    eps = {"Linf": 8 / 255, "L2": 0.5, "L1": 10.0}[norm]
    start = random_in_ball(x, norm, eps, torch.Generator().manual_seed(3))
    _assert_in_ball(start, x, norm, eps)
    assert (lp_norm(start - x, norm) > 0.5 * eps).all(), "the random start should reach out into the ball"


# ----------------------------------------------------------------------------------------------------------------
# The attack contract.
# ----------------------------------------------------------------------------------------------------------------

NUM_CLASSES = 10


class TinyNet(nn.Module):
    """Conv + BatchNorm + Dropout, so that train and eval mode really differ."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def _batch(n: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def _assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> None:
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    size = lp_norm(x_adv.double() - x.double(), norm)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all(), f"{norm} perturbation {size.max().item()} > eps {eps}"


CONFIGS = [
    ("apgd", "Linf", 8 / 255, {}),
    ("apgd", "L2", 0.5, {}),
    ("apgd", "L1", 8.0, {}),
    ("apgd", "Linf", 8 / 255, {"random_start": True, "n_restarts": 2}),
    ("apgd", "L1", 8.0, {"random_start": True, "topk_init": 0.2}),
    ("pgd", "Linf", 8 / 255, {"random_start": True}),
    ("pgd", "L2", 0.5, {"random_restarts": 2, "use_best": False}),
    ("fgsm", "Linf", 8 / 255, {}),
]
CONFIG_IDS = [f"{a}-{n}-{i}" for i, (a, n, _, _) in enumerate(CONFIGS)]


def _make(config, model: nn.Module, n_iter: int | None = 3, seed: int = 0):
    name, norm, eps, options = config
    return create_attack(name, model, norm=norm, eps=eps, n_iter=None if name == "fgsm" else n_iter, seed=seed,
                         **options)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_output_in_ball_box_and_raises_loss(config):
    model = _tiny_net().eval()
    x, y = _batch()
    attack = _make(config, model, n_iter=5)
    x_adv = attack.perturb(x, y)
    _assert_in_ball(x_adv, x, config[1], config[2])
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        adv = F.cross_entropy(model(x_adv), y)
    assert adv > clean, "the attack should raise the loss"


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_mode_grads_and_global_rng_untouched(config, monkeypatch):
    model = _tiny_net()
    model.train()
    model.features[1].eval()  # a submodule in a different mode must keep it
    for p in model.parameters():
        p.grad = None
    sentinel = torch.full_like(model.head[2].weight, 7.0)
    model.head[2].weight.grad = sentinel.clone()
    seen_modes = []
    model.register_forward_pre_hook(lambda m, inp: seen_modes.append(m.training))

    def no_backward(*args, **kwargs):
        raise AssertionError("attacks must not call .backward()")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    rng_before = torch.get_rng_state()
    x, y = _batch()
    _make(config, model).perturb(x, y)
    assert seen_modes and not any(seen_modes), "the model must be attacked in eval mode"
    assert model.training and not model.features[1].training and model.head[1].training
    assert all(p.grad is None for name, p in model.named_parameters() if name != "head.2.weight")
    assert torch.equal(model.head[2].weight.grad, sentinel)
    assert torch.equal(torch.get_rng_state(), rng_before), "attacks must not consume the global RNG"


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_seeded_deterministic_and_resumable(config):
    model = _tiny_net().eval()
    x, y = _batch()
    first, second = _make(config, model, seed=5), _make(config, model, seed=5)
    outputs = [first.perturb(x, y) for _ in range(3)]
    assert all(torch.equal(a, second.perturb(x, y)) for a in outputs)
    resumed = _make(config, model, seed=5)
    resumed.load_state_dict({"calls": 2})
    assert torch.equal(resumed.perturb(x, y), outputs[2])
    randomized = config[0] == "fgsm" or config[3].get("random_start") or config[3].get("random_restarts")
    if randomized:
        assert not torch.equal(outputs[0], outputs[1]), "each call should draw a fresh random start"
        assert not torch.equal(_make(config, model, seed=6).perturb(x, y), outputs[0])


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_channels_last_and_soft_targets(config):
    model = _tiny_net().eval()
    x, y = _batch()
    reference = _make(config, model).perturb(x, y)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_cl = _make(config, model).perturb(x_cl, y)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    _assert_in_ball(out_cl, x, config[1], config[2])
    # Same maths in another memory order: only float summation order differs, and a sign flip of a ~0 gradient
    # entry may move single pixels; nearly all must agree.
    assert (out_cl - reference).abs().le(1e-4).float().mean() > 0.99
    one_hot = F.one_hot(y, NUM_CLASSES).float()
    out_soft = _make(config, model).perturb(x, one_hot)
    assert (out_soft - reference).abs().le(1e-4).float().mean() > 0.99, "one-hot soft targets = hard labels"
    mixed = 0.6 * one_hot + 0.4 * F.one_hot(y.roll(1), NUM_CLASSES).float()
    _assert_in_ball(_make(config, model).perturb(x, mixed), x, config[1], config[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", CONFIGS[:3] + CONFIGS[5:6], ids=CONFIG_IDS[:3] + CONFIG_IDS[5:6])
def test_autocast_keeps_perturbation_fp32(config, dtype):
    model = _tiny_net().eval()
    x, y = _batch()
    with torch.autocast("cpu", dtype=dtype):
        x_adv = _make(config, model, n_iter=5).perturb(x, y)
    _assert_in_ball(x_adv, x, config[1], config[2])
    assert (x_adv - x).abs().max() > 0
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_ddp_is_unwrapped_and_never_synchronises(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _tiny_net().eval()
        ddp = nn.parallel.DistributedDataParallel(model)
        attack = create_attack("apgd", ddp, norm="Linf", eps=4 / 255, n_iter=2)
        assert attack.model is model
        calls = []
        original = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            x, y = _batch()
            attack.perturb(x, y)
        finally:
            dist.all_reduce = original
        assert not calls
        assert all(p.grad is None for p in ddp.parameters())
    finally:
        dist.destroy_process_group()
    assert create_attack("fgsm", nn.DataParallel(model)).model is model


def _count_passes(model: nn.Module) -> dict[str, int]:
    counts = {"forward": 0, "backward": 0}
    model.register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1))
    model.register_full_backward_hook(lambda *a: counts.__setitem__("backward", counts["backward"] + 1))
    return counts


@pytest.mark.parametrize("name,norm,n_iter,options,expected", [
    ("apgd", "Linf", 2, {}, (3, 2)),
    ("apgd", "L1", 4, {}, (5, 4)),
    ("apgd", "L2", 3, {"n_restarts": 2}, (8, 6)),
    ("apgd", "Linf", 2, {"use_best": False}, (2, 2)),
    ("pgd", "Linf", 3, {"use_best": False}, (3, 3)),
    ("pgd", "Linf", 3, {"use_best": True}, (4, 3)),
    ("fgsm", "Linf", None, {}, (1, 1)),
])
def test_cost_in_passes(name, norm, n_iter, options, expected):
    """N steps cost N input-gradient passes (+1 forward to score the last iterate when the best one is returned)."""
    model = _tiny_net().eval()
    counts = _count_passes(model)
    x, y = _batch()
    create_attack(name, model, norm=norm, n_iter=n_iter, **options).perturb(x, y)
    assert (counts["forward"], counts["backward"]) == expected


def test_apgd_returns_the_best_loss_iterate():
    model = _tiny_net().eval()
    x, y = _batch(16)
    attack = APGDAttack(model, norm="Linf", eps=8 / 255, n_iter=6)
    result = attack.run(x, y)
    with torch.no_grad():
        loss_best = F.cross_entropy(model(result.x_best), y, reduction="none")
        clean = F.cross_entropy(model(x), y, reduction="none")
        fooled = model(result.x_fooled).argmax(1) != y
    torch.testing.assert_close(loss_best, result.loss_best, atol=1e-5, rtol=1e-5)
    assert (loss_best >= clean - 1e-6).all(), "the start point is an iterate too"
    assert torch.equal(fooled, result.fooled)
    assert torch.equal(attack.perturb(x, y), result.x_best)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.4)])
def test_apgd_step_size_halving_rule_fires(norm, eps):
    """The loss peaks at an interior point of the ball. A fixed step of 2ε keeps overshooting it; APGD's checkpoint
    rule halves the step and restarts from the best point, so its best iterate converges to the peak."""

    class Peak(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # CE of class 0 = log(1 + exp(-d)), d = ‖x - 0.52‖²: largest at x = 0.52, 0.07 away from the start.
            d = ((x - 0.52) ** 2).flatten(1).sum(1, keepdim=True)
            return torch.cat([d, torch.zeros_like(d)], dim=1)

    x = torch.full((2, 1, 4, 4), 0.45)
    y = torch.zeros(2, dtype=torch.long)
    best = APGDAttack(Peak(), norm=norm, eps=eps, n_iter=20).run(x, y).x_best
    fixed_step = PGDAttack(Peak(), norm=norm, eps=eps, n_iter=20, step_size=2 * eps).perturb(x, y)
    assert (best - 0.52).abs().max() < 1e-3
    assert (fixed_step - 0.52).abs().max() > 1e-2


def test_noattack_and_zero_eps_return_inputs():
    model = _tiny_net().eval()
    counts = _count_passes(model)
    x, y = _batch()
    assert torch.equal(create_attack("none", model, norm="L1", eps=3.0, n_iter=5).perturb(x, y), x)
    attack = create_attack("apgd", model, eps=0.0)
    assert torch.equal(attack.perturb(x, y), x)
    assert counts["forward"] == 0


def test_multi_norm_alternates_at_the_cost_of_one():
    model = _tiny_net().eval()
    counts = _count_passes(model)
    attack = create_attack("apgd", model, norm=["Linf", "L1"], eps=[4 / 255, 8.0], n_iter=[2, 3], seed=1)
    assert isinstance(attack, MultiNormAttack) and attack.norms == ["Linf", "L1"]
    x, y = _batch()
    used = []
    for _ in range(4):
        sub = attack.next_attack
        x_adv = attack.perturb(x, y)
        used.append(sub.norm)
        _assert_in_ball(x_adv, x, sub.norm, sub.eps)
    assert used == ["Linf", "L1", "Linf", "L1"]
    assert counts["backward"] == 2 * (2 + 3), "each batch pays for one norm only"
    state = attack.state_dict()
    resumed = create_attack("apgd", model, norm=["Linf", "L1"], eps=[4 / 255, 8.0], n_iter=[2, 3], seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.next_attack.norm == "Linf"
    assert torch.equal(resumed.perturb(x, y), attack.perturb(x, y))
    with pytest.raises(ValueError, match="one eps per norm"):
        create_attack("apgd", model, norm=["Linf", "L1"], eps=0.1)
    defaults = create_attack("apgd", model, norm=["Linf", "L2", "L1"])
    assert [a.eps for a in defaults.attacks] == [DEFAULT_EPS["Linf"], DEFAULT_EPS["L2"], DEFAULT_EPS["L1"]]


def test_eps_warmup():
    assert eps_warmup_factor(0.0, 5) == 0.0
    assert eps_warmup_factor(2.5, 5) == 0.5
    assert eps_warmup_factor(7.0, 5) == 1.0
    assert eps_warmup_factor(0.0, 0) == 1.0
    assert eps_warmup_factor(1.0, 4) == 0.25
    model = _tiny_net().eval()
    x, y = _batch()
    attack = create_attack("apgd", model, norm=["Linf", "L2"], eps=[8 / 255, 1.0])
    attack.set_eps_scale(0.25)
    for sub in attack.attacks:
        x_adv = sub.perturb(x, y)
        _assert_in_ball(x_adv, x, sub.norm, 0.25 * sub.eps)
        assert lp_norm(x_adv - x, sub.norm).max() > 0.2 * sub.eps
    with pytest.raises(ValueError, match="eps scale"):
        attack.set_eps_scale(1.5)


def test_adversarial_loss_helper():
    model = _tiny_net().eval()
    x, y = _batch()
    criterion = nn.CrossEntropyLoss()
    attack = create_attack("fgsm", model, seed=3)
    out = adversarial_loss(model, attack, criterion, x, y)
    replay = create_attack("fgsm", model, seed=3).perturb(x, y)
    assert torch.equal(out.x_adv, replay)
    torch.testing.assert_close(out.loss, criterion(model(replay), y))
    mixed = adversarial_loss(model, create_attack("fgsm", model, seed=3), criterion, x, y, clean_weight=0.5)
    expected = 0.5 * criterion(model(replay), y) + 0.5 * criterion(model(x), y)
    torch.testing.assert_close(mixed.loss, expected, atol=1e-5, rtol=1e-5)
    clean = adversarial_loss(model, NoAttack(model), criterion, x, y, clean_weight=0.5)
    torch.testing.assert_close(clean.loss, criterion(model(x), y))
    with pytest.raises(ValueError, match="clean_weight"):
        adversarial_loss(model, attack, criterion, x, y, clean_weight=2.0)


def test_pgd_accepts_robustness_options():
    model = _tiny_net().eval()
    attack = create_attack("pgd", model, constraint="2", eps=0.5, attack_lr=0.1, attack_steps=7, random_start=True,
                           random_restarts=0, use_best=True)
    assert isinstance(attack, PGDAttack)
    assert (attack.norm, attack.n_iter, attack.step_size, attack.use_best) == ("L2", 7, 0.1, True)
    x, y = _batch()
    _assert_in_ball(attack.perturb(x, y), x, "L2", 0.5)
    with pytest.raises(ValueError, match="conflicting"):
        create_attack("pgd", model, norm="Linf", constraint="2")
    default = create_attack("pgd", model, eps=8 / 255, n_iter=4)
    assert math.isclose(default.current_step_size, 2.5 * (8 / 255) / 4)


@pytest.mark.parametrize("cls", [PGDAttack, APGDAttack])
def test_use_best_never_worse_than_last_iterate(cls):
    model = _tiny_net().eval()
    x, y = _batch(16)
    best = cls(model, eps=16 / 255, n_iter=4, step_size=0.2, use_best=True).perturb(x, y)
    last = cls(model, eps=16 / 255, n_iter=4, step_size=0.2, use_best=False).perturb(x, y)
    assert not torch.equal(best, last)
    with torch.no_grad():
        assert (F.cross_entropy(model(best), y, reduction="none")
                >= F.cross_entropy(model(last), y, reduction="none") - 1e-6).all()


def test_bad_input_is_rejected_with_a_clear_message():
    model = _tiny_net().eval()
    x, y = _batch()
    attack = create_attack("apgd", model)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack.perturb(x * 255, y)
    with pytest.raises(ValueError, match="int64"):
        attack.perturb(x, y.int())
    with pytest.raises(ValueError, match="soft targets"):
        attack.perturb(x, y[:3])
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        attack.perturb(x, y)
    with pytest.raises(ValueError, match="unknown attack"):
        create_attack("cw", model)
    with pytest.raises(ValueError, match="unknown norm"):
        create_attack("apgd", model, norm="L3")
    with pytest.raises(ValueError, match="no option"):
        create_attack("apgd", model, random_restarts=2)
    with pytest.raises(ValueError, match="single-step"):
        create_attack("fgsm", model, n_iter=2)
    with pytest.raises(ValueError, match="apgd"):
        create_attack("pgd", model, norm="L1")
    with pytest.raises(ValueError, match="eps"):
        create_attack("apgd", model, eps=-1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_attack("apgd")(FGSMAttack)
    assert set(ATTACKS) == {"apgd", "pgd", "fgsm", "none"}


def test_bench_tool_prints_the_overhead_json(capsys):
    import importlib.util
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    spec = importlib.util.spec_from_file_location("bench_attack", tools / "bench_attack.py")
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(tools))  # as when run as a script: its folder's _timing module
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.pop(0)
    result = bench.main(["--batch-size", "2", "--img-size", "32", "--n-iter", "2", "--repeats", "2", "--warmup", "1",
                         "--clock", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result
    assert printed["n_iter"] == 2 and printed["extra_forwards"] == 1
    assert printed["ratio"] > 0 and printed["ratio_vs_algorithm"] <= printed["ratio"]



def test_the_gpu_checks_reference_apgd2_is_rats_apgd2(monkeypatch):
    """tools/gpu_check.py times rat's APGD-2 training step against a plain loop with a hand-written APGD-2; the
    comparison is fair only if that loop computes the same attack: the same adversarial images, from the same passes."""
    import importlib.util
    import os
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    spec = importlib.util.spec_from_file_location("gpu_check", tools / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the tool sets OMP_WAIT_POLICY for its own process
    monkeypatch.syspath_prepend(str(tools))  # as when run as a script: its folder's _timing module
    spec.loader.exec_module(check)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 5)).eval()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,))
    rat_adv = create_attack("apgd", model, norm="Linf", eps=check.EPS, n_iter=2).perturb(x, y)
    reference = check.reference_apgd2(model, x, y, check.EPS)
    assert (reference - x).abs().max() <= check.EPS + 1e-7 and not torch.equal(reference, x)
    torch.testing.assert_close(reference, rat_adv, rtol=0, atol=1e-6)

# ----------------------------------------------------------------------------------------------------------------
# APGD against AutoAttack's own APGD-CE on a small trained model.
# ----------------------------------------------------------------------------------------------------------------

# A short training run that generalises takes minutes on CPU; a few epochs on a 256-image subset of the train split
# fit that subset instead (~90-100 % accuracy), which gives a genuinely trained model with non-trivial robust accuracy
# on the images it was trained on — all an attack comparison needs.
COMPARE_N = 256
COMPARE_N_ITER = 10
COMPARE_EPS = {"Linf": 0.75 / 255, "L2": 0.3, "L1": 8.0}


@pytest.fixture(scope="session")
def demo_model(once) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from rat.data.demo import load_demo_arrays
    from rat.models import create_model

    images, labels = load_demo_arrays("train")
    x = torch.from_numpy(images[:COMPARE_N]).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(labels[:COMPARE_N])

    def build(folder: Path) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = create_model("convnext_micro_cvst", num_classes=NUM_CLASSES)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
            order = torch.Generator().manual_seed(0)
            model.train()
            for _ in range(20):  # 100 % on the subset after 15 epochs
                perm = torch.randperm(COMPARE_N, generator=order)
                for i in range(0, COMPARE_N, 32):
                    idx = perm[i:i + 32]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        torch.save(model.state_dict(), folder / "model.pt")

    model = create_model("convnext_micro_cvst", num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(once("apgd_compare_model", build) / "model.pt", weights_only=True))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, x, y


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_apgd_matches_autoattack_apgd_ce(demo_model, norm):
    """Same n_iter, one restart, random start, CE loss: rat's APGD and AutoAttack's APGD-CE agree within 2 points of
    robust accuracy, and both lie far below the accuracy under random noise of the same norm and size."""
    from pyautoattack.autopgd_base import APGDAttack as AutoAttackAPGD

    model, x, y = demo_model
    eps = COMPARE_EPS[norm]
    clean = _accuracy(model, x, y)
    assert clean.float().mean() > 0.85, "the fixture model should fit its training subset"
    noise = random_in_ball(x, norm, eps, torch.Generator().manual_seed(0))
    noise_acc = (clean & _accuracy(model, noise, y)).float().mean().item() * 100

    with torch.random.fork_rng():  # AutoAttack seeds the global RNG
        reference = AutoAttackAPGD(model, n_iter=COMPARE_N_ITER, norm=norm, n_restarts=1, eps=eps, seed=0, loss="ce",
                                   device=x.device)
        x_aa = reference.perturb(x, y)
    _assert_in_ball(x_aa, x, norm, eps * 1.0001)
    aa_acc = (clean & _accuracy(model, x_aa, y)).float().mean().item() * 100

    ours = APGDAttack(model, norm=norm, eps=eps, n_iter=COMPARE_N_ITER, random_start=True, topk_init=0.2, seed=0)
    result = ours.run(x, y)
    _assert_in_ball(result.x_fooled, x, norm, eps)
    ours_acc = (clean & _accuracy(model, result.x_fooled, y)).float().mean().item() * 100
    best_loss_acc = (clean & _accuracy(model, result.x_best, y)).float().mean().item() * 100
    print(f"\n{norm} eps={eps:.5g} n_iter={COMPARE_N_ITER} n={COMPARE_N}: clean {clean.float().mean() * 100:.1f} "
          f"noise {noise_acc:.1f} AutoAttack APGD-CE {aa_acc:.1f} rat APGD {ours_acc:.1f} "
          f"(best-loss iterate {best_loss_acc:.1f})")
    assert 10.0 < aa_acc < 90.0, "pick an eps with a meaningful robust accuracy"
    assert abs(ours_acc - aa_acc) <= 2.0
    assert abs(best_loss_acc - aa_acc) <= 2.0
    assert ours_acc < noise_acc - 25.0 and aa_acc < noise_acc - 25.0


# ----------------------------------------------------------------------------------------------------------------
# APGD step by step against AutoAttack's APGD from the same starting point (no random start).
# ----------------------------------------------------------------------------------------------------------------

APGD_SAME_START_EPS = {"Linf": 4 / 255, "L2": 0.5}


def _autoattack_apgd_from_x(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float,
                            n_iter: int, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAttack's APGD single run started at ``x`` itself: (best-loss iterate, its loss)."""
    from pyautoattack.autopgd_base import APGDAttack as AutoAttackAPGD

    reference = AutoAttackAPGD(model, n_iter=n_iter, norm=norm, n_restarts=1, eps=eps, seed=0, loss=loss,
                               device=x.device, topk=0.2)
    reference.init_hyperparam(x)
    with torch.random.fork_rng():  # it draws (and then ignores) a random start from the global RNG
        x_best, _, loss_best, _ = reference.attack_single_run(x, y, x_init=x.clone())
    return x_best, loss_best


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_apgd_follows_autoattack_step_by_step(norm, loss):
    """From the same start (x itself), rat's APGD in its default (paper) settings finds AutoAttack's best loss for
    every sample and its best iterate for (nearly) every sample: step sizes, momentum, the checkpoint rule with
    AutoAttack's first-step convention and (L2) the ball-then-clip projection. n_iter=10 puts checkpoints after steps
    2, 4, 6, 8 (window 2), so the first step's bookkeeping decides step-size halvings. A few samples reach the same
    loss (to 1e-6) at two iterates, and rounding picks either, hence the 90 % bar on the iterates.

    With the DLR loss (negative while a sample is classified correctly) the old convention, which compares the first
    step with the loss at the start instead of with 0, halves other step sizes and ends elsewhere.

    L1 is not compared this way: given a starting point, AutoAttack's L1-APGD derives its initial sparsity from that
    point (0 for x itself), unlike the training variant."""
    model = _tiny_net(1).eval()
    x, y = _batch(n=64, size=16, seed=4)
    eps = APGD_SAME_START_EPS[norm]
    x_ref, loss_ref = _autoattack_apgd_from_x(model, x, y, norm, eps, n_iter=10, loss=loss)
    result = APGDAttack(model, norm=norm, eps=eps, n_iter=10, loss=loss).run(x, y)
    torch.testing.assert_close(result.loss_best, loss_ref, atol=1e-5, rtol=1e-5)
    same_iterate = (result.x_best - x_ref).abs().amax(dim=(1, 2, 3)) <= 1e-5
    assert same_iterate.float().mean() >= 0.9
    if loss == "dlr":
        old = APGDAttack(model, norm=norm, eps=eps, n_iter=10, loss=loss, first_step_vs_start=True).run(x, y)
        assert ((old.loss_best - loss_ref).abs() > 1e-4).sum() >= 3


def test_apgd_exact_l2_projection_is_one_flag_away():
    """projection='exact' keeps rat's exact ball ∩ box projection: feasible, and a different attack."""
    model = _tiny_net(1).eval()
    x, y = _batch(n=64, size=16, seed=4)
    paper = APGDAttack(model, norm="L2", eps=0.5, n_iter=10).run(x, y)
    exact = APGDAttack(model, norm="L2", eps=0.5, n_iter=10, projection="exact").run(x, y)
    _assert_in_ball(exact.x_best, x, "L2", 0.5)
    _assert_in_ball(paper.x_best, x, "L2", 0.5)
    assert not torch.equal(paper.x_best, exact.x_best)
    with pytest.raises(ValueError, match="projection must be one of"):
        APGDAttack(model, norm="L2", eps=0.5, projection="nearest")
