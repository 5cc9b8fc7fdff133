"""Adversarial AutoAugment: ops as timm/PIL define them, the controller, REINFORCE, exact resume, trainer runs, DDP."""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from process_support import stop_after_checks, train_in_process
from torch import nn

from rat.augment import AAA_OPS, AdversarialAugment, PolicyController, PolicySpace, mix, ops, policy_from_state
from rat.config import ConfigError
from rat.train.spec import make_train_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def one_thread():
    """The controller's tensors are tiny: on a loaded 2-core machine extra intra-op threads only spin (60x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 48 x 64 RGB crop of a real photo (sklearn's sample image), uint8."""
    from sklearn.datasets import load_sample_images

    return np.ascontiguousarray(load_sample_images().images[1][100:292:4, 200:456:4])


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0


def _one_op(op: str, magnitude: int, x: torch.Tensor, seed: int = 0, **options) -> torch.Tensor:
    """``x`` under the single-op sub-policy ``(op, magnitude)``, through the policy's own augmentation path."""
    space = PolicySpace((op,), (magnitude,), 1, 1)
    policy = AdversarialAugment(space, num_policies=1, interpolation="bilinear",
                                augment_generator=torch.Generator().manual_seed(seed), **options)
    return policy.expand(x, torch.zeros(x.shape[0], dtype=torch.int64))[0]


# The seed implementation's op ranges (low, high): an op's argument at level l = m / 10 is low + l * (high - low).
SEED_RANGES = {"ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "TranslateX": (-0.45, 0.45),
               "TranslateY": (-0.45, 0.45), "Rotate": (-30, 30), "Solarize": (0, 256), "Posterize": (4, 8),
               "Contrast": (0.1, 1.9), "Color": (0.1, 1.9), "Brightness": (0.1, 1.9), "Sharpness": (0.1, 1.9)}


def test_search_space_is_the_papers_without_sample_pairing() -> None:
    assert len(AAA_OPS) == 15 and "SamplePairing" not in AAA_OPS
    space = PolicySpace()
    assert (space.num_sub_policies, space.ops_per_sub_policy, len(space.magnitudes)) == (5, 2, 10)
    assert set(space.implementations) - {"Cutout"} <= set(ops._COLOR_OPS) | set(ops.GEOMETRIC_OPS)


@pytest.mark.parametrize("magnitude_map", ["autoaugment", "seed"])
@pytest.mark.parametrize("op", [op for op in AAA_OPS if op != "Cutout"])
def test_policy_ops_match_timm_pil_ops(photo: np.ndarray, op: str, magnitude_map: str) -> None:
    """Each op at magnitude 7, through the policy, against timm's PIL op with the argument for that level:
    timm's own (``autoaugment``), or the seed's ``low + 0.7 · (high − low)`` over the op's range (``seed``)."""
    from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP

    name = PolicySpace((op,)).implementations[0]
    image = Image.fromarray(photo)
    args = LEVEL_TO_ARG[name](7, {"translate_pct": 0.45}) if LEVEL_TO_ARG.get(name) else ()
    if magnitude_map == "seed" and op in SEED_RANGES:
        low, high = SEED_RANGES[op]
        args = (low + 0.7 * (high - low),)
        # int() as rat (and timm) read a threshold / bit count; PIL's float Solarize threshold would invert from
        # ceil(256 * level) (docs/data.md names that one-level difference).
        args = (int(args[0]),) if op in ("Solarize", "Posterize") else args
    ours = _one_op(op, 7, _to_tensor(photo), magnitude_map=magnitude_map)
    if name in ops.GEOMETRIC_OPS:  # timm negates at random: ours must match one of the two signs
        errors = [(ours - _to_tensor(NAME_TO_OP[name](image, sign * args[0], resample=Image.BILINEAR,
                                                      fillcolor=(0, 0, 0)))).abs()[..., 1:-1, 1:-1].mean()
                  for sign in (1, -1)]
        assert min(errors) < 0.01 < max(errors), f"{op}: {errors}"
    else:
        reference = _to_tensor(NAME_TO_OP[name](image, *args))
        assert (ours - reference).abs().max() <= 1.5 / 255, op
        assert not torch.equal(ours, _to_tensor(photo))


@pytest.mark.parametrize(("cutout_fill", "colour"), [("seed", (125, 123, 114)), ("black", (0, 0, 0))])
def test_cutout_paints_a_square_like_pil(photo: np.ndarray, cutout_fill: str, colour: tuple[int, ...]) -> None:
    """Cutout at magnitude 9 (side round(0.2 * 0.9 * 48) = 9 px) equals PIL drawing that square in the fill (the
    seed's colour by default)."""
    height, width = photo.shape[:2]
    gen = torch.Generator().manual_seed(3)
    ours = _one_op("Cutout", 9, _to_tensor(photo).repeat(4, 1, 1, 1), seed=3, cutout_fill=cutout_fill)
    # The same draws as apply_ops_: a sign and an interpolation per image, then a centre per image.
    torch.randint(1, (1, 4), generator=gen)  # the sub-policy draw of expand()
    torch.rand(4, generator=gen)
    torch.rand(4, generator=gen)
    centres = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    side = round(0.2 * 0.9 * min(height, width))
    for i in range(4):
        cy, cx = int(centres[i, 0] * height), int(centres[i, 1] * width)
        top, left = max(cy - side // 2, 0), max(cx - side // 2, 0)
        bottom, right = min(cy - side // 2 + side, height), min(cx - side // 2 + side, width)
        image = Image.fromarray(photo)
        ImageDraw.Draw(image).rectangle([left, top, right - 1, bottom - 1], fill=colour)
        torch.testing.assert_close(ours[i:i + 1], _to_tensor(np.asarray(image)), rtol=0, atol=1e-6)
        painted = (ours[i] - torch.tensor(colour).view(3, 1, 1) / 255).abs().amax(dim=0) < 1e-6
        assert painted.sum() >= min(side, bottom - top) * min(side, right - left) > 0


def test_controller_starts_uniform_samples_reproducibly_and_scores_its_samples() -> None:
    a = AdversarialAugment(PolicySpace(), num_policies=8, seed=5)
    b = AdversarialAugment(PolicySpace(), num_policies=8, seed=5)
    tokens = a.sample()
    assert tokens.shape == (8, 5, 2, 2)
    assert torch.equal(tokens, b.sample())  # same seed, same policies (every rank samples the same)
    assert len({tuple(t.flatten().tolist()) for t in tokens}) == 8  # the M policies differ
    scored = a.controller(tokens=tokens.flatten(1, 2))
    torch.testing.assert_close(scored["op_probs"], torch.full((15,), 1 / 15))
    torch.testing.assert_close(scored["log_prob"], torch.full((8,), 10 * (np.log(1 / 15) + np.log(1 / 10))).float())
    torch.testing.assert_close(scored["entropy"] / 20, torch.full((8,), a.uniform_entropy()).float())


def test_expand_augments_every_image_under_its_policy(photo: np.ndarray) -> None:
    x = _to_tensor(photo).repeat(6, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    y = torch.arange(6)
    policy = AdversarialAugment(PolicySpace(), num_policies=4, seed=0)
    out, labels = policy.expand(x, y)
    assert out.shape == (24, 3, 48, 64) and torch.equal(labels, y.repeat(4))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    # 4 policies x (6 images over 5 sub-policies, ~3.5 distinct each): identical inputs come out in many versions
    assert len({tuple(v.flatten()[::53].tolist()) for v in out}) >= 10
    windowed = AdversarialAugment(PolicySpace(), num_policies=4, batch_fraction=1 / 3, seed=0)
    out, labels = windowed.expand(x, y)
    assert out.shape[0] == 8 and labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]  # policy m takes images 2m, 2m + 1
    with pytest.raises(ValueError, match="batch_fraction"):
        AdversarialAugment(PolicySpace(), batch_fraction=0.0)


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A softmax classifier trained here on sklearn's digits (16 px, RGB): ~98 % train accuracy, then frozen."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None].div(16).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=16, mode="bilinear").clamp(0, 1)
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    assert float((model(x).argmax(1) == y).float().mean()) > 0.9
    return model, x, y


def _search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 40) -> list[float]:
    policy = AdversarialAugment(PolicySpace(), num_policies=8, schedule="step", lr=lr, batch_fraction=1 / 8, seed=1)
    rewards = []
    for step in range(steps):
        batch = slice(step * 32 % 1024, step * 32 % 1024 + 256)
        xa, ya = policy.expand(x[batch], y[batch])
        reward = policy.rewards(nn.CrossEntropyLoss(), model(xa), ya)
        policy.record(reward)
        rewards.append(float(reward.mean()))
    return rewards


def test_reward_rises_against_a_frozen_uniform_controller(digits_model) -> None:
    """Same frozen model, same batches: the learning controller (per-step schedule) finds policies with a much higher
    loss."""
    model, x, y = digits_model
    uniform = _search(model, x, y, lr=0.0)
    learned = _search(model, x, y, lr=0.02)
    assert np.mean(learned[-10:]) > 2 * np.mean(uniform[-10:]), (learned, uniform)
    assert np.mean(learned[-10:]) > 2 * np.mean(learned[:10])


def _final_entropy(entropy_weight: float) -> tuple[float, float]:
    space = PolicySpace()
    policy = AdversarialAugment(space, num_policies=8, schedule="step", lr=0.05, entropy_weight=entropy_weight,
                                seed=0)
    invert = space.ops.index("Invert")
    for _ in range(60):  # reward: the share of Invert in a policy, a pull towards one op
        policy.tokens = policy.sample()
        policy.record((policy.tokens[..., 0] == invert).double().mean(dim=(1, 2)))
    with torch.no_grad():
        result = policy.controller(64, generator=torch.Generator().manual_seed(0))
    return float(result["entropy"].mean()) / 20, float(result["op_probs"][invert])


def test_entropy_bonus_keeps_entropy_above_a_floor() -> None:
    collapsed, _ = _final_entropy(0.0)
    kept, invert_prob = _final_entropy(0.1)
    assert collapsed < 1.0
    assert kept > 2.0  # uniform: 2.51 nats per choice
    assert invert_prob > 1.5 / 15  # and it still learns


def test_state_dict_resumes_exactly_mid_interval() -> None:
    def run(policy: AdversarialAugment, steps: int) -> None:
        for _ in range(steps):
            policy.tokens = policy.sample()
            policy.record(policy.tokens[..., 1].double().mean(dim=(1, 2)))

    kwargs = {"num_policies": 4, "schedule": "step", "lr": 0.01, "update_every": 2, "seed": 2}
    straight = AdversarialAugment(PolicySpace(), **kwargs)
    run(straight, 5)
    first = AdversarialAugment(PolicySpace(), **kwargs)
    run(first, 3)  # one sample pending
    state = first.state_dict()
    resumed = AdversarialAugment(PolicySpace(), **kwargs)
    resumed.load_state_dict(state)
    run(resumed, 2)
    for (name, p), q in zip(straight.controller.state_dict().items(), resumed.controller.state_dict().values()):
        assert torch.equal(p, q), name
    assert straight.baseline == resumed.baseline and torch.equal(straight.sample(), resumed.sample())
    with pytest.raises(ValueError, match="search space"):
        AdversarialAugment(PolicySpace(ops=("Invert", "Rotate"))).load_state_dict(state)


# -- the schedule, the reward and the controller's LSTM state (the seed's by default) --------------------------------


def _randomize(controller: nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (a new controller is exactly uniform, so nothing would depend on its state)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controller.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=gen))


def test_default_schedule_keeps_the_policies_for_the_epoch_and_learns_from_normalized_epoch_losses(photo) -> None:
    """The seed's schedule: the M policies are sampled at the epoch's first step and kept; the controller learns once
    per epoch, from each policy's mean loss over the epoch normalized across the policies (the seed's
    ``(Lm - mean) / (std + 1e-5)``), by REINFORCE with its entropy bonus. Two epochs, against that update computed
    here with a copy of the controller."""
    x, y = _to_tensor(photo).repeat(4, 1, 1, 1), torch.arange(4)
    policy = AdversarialAugment(PolicySpace(), num_policies=4, lr=0.01, entropy_weight=0.1, seed=3)
    _randomize(policy.controller)
    reference = copy.deepcopy(policy.controller)
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    epochs = [torch.tensor([[1.0, 2.0, 3.0, 6.0], [2.0, 2.0, 5.0, 2.0], [0.0, 5.0, 1.0, 4.0]], dtype=torch.float64),
              torch.tensor([[3.0, 1.0, 1.0, 1.0], [2.0, 0.5, 1.0, 1.5]], dtype=torch.float64)]
    previous = None
    for number, losses in enumerate(epochs, 1):
        before = copy.deepcopy(policy.controller.state_dict())
        policy.expand(x, y)
        tokens = policy.tokens.clone()
        assert previous is None or not torch.equal(tokens, previous)  # a new epoch, new policies
        for step_losses in losses:
            policy.expand(x, y)
            assert torch.equal(policy.tokens, tokens)  # the same M policies all epoch
            policy.record(step_losses)
        for name, value in policy.controller.state_dict().items():
            assert torch.equal(value, before[name]), f"{name} changed within the epoch"
        policy.end_epoch()
        mean = losses.mean(dim=0)
        advantage = ((mean - mean.mean()) / (mean.std() + 1e-5)).float()
        scored = reference(tokens=tokens.flatten(1, 2))
        loss = -(advantage * scored["log_prob"]).mean() - 0.1 * scored["entropy"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(policy.controller.state_dict()[name], value, msg=name)
        previous = tokens
        stats = policy.epoch_stats()
        assert stats["aaa_updates"] == policy.updates == number
        assert stats["aaa_reward_mean"] == pytest.approx(float(losses.mean()))
        assert stats["aaa_rewards"] == pytest.approx(mean.tolist(), abs=1e-5)


def test_lstm_state_starts_afresh_for_each_sub_policy() -> None:
    """The seed's controller: a sub-policy's probability does not depend on the sub-policies sampled before it
    (the log-probability of a policy is the sum of its sub-policies' scored one by one); aaa.lstm_state policy
    carries one state through the policy instead."""
    policy = AdversarialAugment(PolicySpace(), num_policies=6, seed=0)
    _randomize(policy.controller)
    tokens = policy.sample().flatten(1, 2)  # (6 policies, 10 decisions, 2)
    single = PolicyController(15, 10, 2, 100)  # a one-sub-policy controller with the same weights
    single.load_state_dict(policy.controller.state_dict())
    parts = sum(single(tokens=tokens[:, 2 * i:2 * i + 2])["log_prob"] for i in range(5))
    torch.testing.assert_close(policy.controller(tokens=tokens)["log_prob"], parts)
    carried = AdversarialAugment(PolicySpace(), num_policies=6, lstm_state="policy", seed=0)
    carried.controller.load_state_dict(policy.controller.state_dict())
    assert not torch.allclose(carried.controller(tokens=tokens)["log_prob"], parts)


def test_a_policy_checkpoint_is_resumed_only_with_the_rules_it_was_trained_with() -> None:
    """A policy state written by a rat before the rules were options (per-step schedule, one LSTM state, AutoAugment's
    magnitudes, black Cutout) is refused by today's defaults with the flags that resume it, and restored with its
    own rules by policy_from_state (tools/show_policy.py's reader); another M is refused too."""
    old = AdversarialAugment(PolicySpace(), schedule="step", lstm_state="policy", magnitude_map="autoaugment",
                             cutout_fill="black", seed=0)
    state = old.state_dict()
    for key in ("rules", "tokens", "loss_sum", "loss_steps"):
        del state[key]
    with pytest.raises(ValueError, match="--aaa.schedule step --aaa.lstm_state policy --aaa.magnitude_map "
                                         "autoaugment --aaa.cutout_fill black: resume with those settings"):
        AdversarialAugment(PolicySpace()).load_state_dict(state)
    assert policy_from_state(state).rules == old.rules
    eight = AdversarialAugment(PolicySpace()).state_dict()
    with pytest.raises(ValueError, match="--aaa.num_policies 8"):
        AdversarialAugment(PolicySpace(), num_policies=4).load_state_dict(eight)


def _policy_state(init_seed: int):
    """A tiny TrainState with the default (epoch-schedule) policy, M = 3, and its task."""
    from rat.attacks import create_attack
    from rat.train.optim import build_optimizer
    from rat.train.state import TrainState
    from rat.train.task import AdversarialTask

    torch.manual_seed(init_seed)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 3))
    generator = torch.Generator().manual_seed(5)
    policy = AdversarialAugment(PolicySpace(("Rotate", "Invert", "Cutout"), (0, 5, 9), 2, 1), num_policies=3,
                                lr=0.05, entropy_weight=0.01, seed=7, augment_generator=generator, hidden_size=8)
    state = TrainState(module, build_optimizer(module, "adamw", 1e-2, 0.05), create_attack("none", module),
                       augmentation=policy)
    return state, AdversarialTask(module, state.attack, nn.CrossEntropyLoss())


def test_epoch_schedule_resumes_exactly_from_a_mid_epoch_checkpoint() -> None:
    """A checkpoint written mid-epoch (SIGTERM after 2 of 4 steps) holds the epoch's policies and per-policy loss
    sums: resumed, the epoch's controller update is the one of the run that went straight through."""
    from rat.train.engine import StepOptions, train_one_epoch

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(4)]
    options = StepOptions(lr=lambda step: 1e-2)
    straight, task = _policy_state(0)
    train_one_epoch(task, batches, straight, options)
    first, task = _policy_state(0)
    assert train_one_epoch(task, batches, first, options, hooks=stop_after_checks(2)).stop_reason == "sigterm"
    assert first.augmentation.updates == 0 and first.augmentation.loss_steps == 2
    checkpoint = first.state_dict()
    resumed, task = _policy_state(1)
    resumed.load_state_dict(checkpoint)
    train_one_epoch(task, batches, resumed, options)
    assert straight.augmentation.updates == resumed.augmentation.updates == 1
    for name, value in straight.augmentation.controller.state_dict().items():
        assert torch.equal(value, resumed.augmentation.controller.state_dict()[name]), name
    for name, value in straight.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name]), name
    assert torch.equal(straight.augmentation.sample(), resumed.augmentation.sample())


def test_observe_records_each_policys_mean_loss_over_the_steps_micro_batches() -> None:
    """As the trainer's augmentation, the policy's reward for an optimizer step of two micro-batches is, per policy,
    the mixed loss ``(1 − w)·CE(adversarial logits) + w·CE(clean logits)`` of its images (cross-entropy as torch
    defines it), averaged over the micro-batches; nothing is recorded before the step's last micro-batch."""
    m, k, w = 2, 3, 0.25
    policy = AdversarialAugment(PolicySpace(("Invert",), (0,), 1, 1), num_policies=m, schedule="step",
                                update_every=2, seed=0)
    gen = torch.Generator().manual_seed(0)
    micro_batches = [(torch.randn(m * k, 5, generator=gen), torch.randn(m * k, 5, generator=gen),
                      torch.randint(0, 5, (m * k,), generator=gen)) for _ in range(2)]
    expected = torch.zeros(m, dtype=torch.float64)
    for index, (adversarial, clean, target) in enumerate(micro_batches):
        policy.expand(torch.rand(k, 3, 4, 4), target[:k], new_step=index == 0)
        policy.observe(adversarial, target, clean, w, step_end=index == 1)
        assert len(policy.pending) == index  # recorded at the step's end only
        for p in range(m):
            rows = slice(p * k, (p + 1) * k)
            expected[p] += ((1 - w) * F.cross_entropy(adversarial[rows], target[rows])
                            + w * F.cross_entropy(clean[rows], target[rows])).item() / 2
    torch.testing.assert_close(policy.pending[0][1], expected)


# -- mixup / cutmix within each policy's group -----------------------------------------------------------------------


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.8, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_stay_within_each_policys_group(mixup: float, cutmix: float) -> None:
    """The batch of M = 3 policies x K = 4 images, mixed with one lambda (one box) per step: each group is exactly
    what timm's Mixup does to that group alone with the same draws, so no image holds another group's pixels
    (group m's pixels lie in their own band of values), and the targets are timm's soft targets within the group."""
    from timm.data import Mixup

    m, k, classes = 3, 4, 10
    gen = torch.Generator().manual_seed(0)
    band = torch.arange(m).repeat_interleave(k).view(-1, 1, 1, 1) / m
    x = (band + 0.05 + 0.2 * torch.rand(m * k, 3, 16, 16, generator=gen)).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (m * k,), generator=gen)
    grouped = mix.GroupMixup(mix.build_mixup(mixup, cutmix, label_smoothing=0.1, num_classes=classes), m)
    lowest = []
    for seed in range(3):
        np.random.seed(seed)
        mixed, soft = grouped(x.clone(), y)
        assert mixed.is_contiguous(memory_format=torch.channels_last) and soft.shape == (m * k, classes)
        lowest.append(float(soft.amax(dim=1).min()))  # 0.91 = one label (smoothing 0.1): not mixed
        for g in range(m):
            rows = slice(g * k, (g + 1) * k)
            assert g / m + 0.05 <= float(mixed[rows].min()) and float(mixed[rows].max()) <= g / m + 0.25
            np.random.seed(seed)
            reference = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=classes)
            ref_x, ref_soft = reference(x[rows].clone(), y[rows])
            torch.testing.assert_close(mixed[rows], ref_x)
            torch.testing.assert_close(soft[rows], ref_soft)
    assert min(lowest) < 0.8, lowest


def test_the_heavy_recipe_composes_with_the_policy() -> None:
    """--augment.policy adversarial with --augment.heavy 1 keeps mixup/cutmix (within groups) and soft targets."""
    from timm.loss import SoftTargetCrossEntropy

    from rat.train.build import build_augmentation
    from rat.train.spec import TrainSpec

    spec = TrainSpec.from_config(make_train_config(["--augment.policy", "adversarial", "--augment.heavy", "1",
                                              "--aaa.num_policies", "4"]))
    built = build_augmentation(spec.augment, spec.aaa, num_classes=10, label_smoothing=0.1, seed=0, run_seed=0,
                               world_size=1)
    assert isinstance(built, AdversarialAugment) and isinstance(built.mixup, mix.GroupMixup)
    assert built.mixup.groups == 4
    assert isinstance(built.criterion, SoftTargetCrossEntropy) and built.random_erasing is not None


@pytest.mark.parametrize(("argv", "message"), [
    (["--aaa.ops", "Rotate,Sheer"], "unknown op 'Sheer'"),
    (["--aaa.num_policies", "0"], "aaa.num_policies='0' is not an int"),
    (["--aaa.magnitudes", "3,11"], "aaa.magnitudes='3,11' is not comma-separated ints in [0, 10]"),
    (["--augment.heavy", "1", "--training.batch_size", "6", "--aaa.batch_fraction", "0.5"],
     "each policy's group of 3 (training.batch_size x aaa.batch_fraction), which must be even"),
    (["--aaa.update_every", "3"], "aaa.update_every=3 applies to --aaa.schedule step"),
    (["--aaa.schedule", "sometimes"], "aaa.schedule='sometimes'"),
    (["--aaa.batch_fraction", "0"], "aaa.batch_fraction='0' is not"),
])
def test_bad_policy_config_is_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_train_config(["--augment.policy", "adversarial", *argv])
    assert message in str(info.value) and "\n" not in str(info.value)
    make_train_config(["--aaa.ops", "Rotate,Sheer"])  # not checked unless the policy is used


# -- the trainer -------------------------------------------------------------------------------------------------

SMALL = ["--model.arch", "convnext_micro_cvst", "--resolution.min_res", "32", "--resolution.max_res", "32",
         "--training.batch_size", "8", "--training.limit_batches", "2", "--training.precision", "fp32",
         "--adv.attack", "apgd", "--adv.n_iter", "1", "--validation.robust_n_ex", "0", "--validation.batch_size", "100",
         "--logging.progress", "0", "--data.num_workers", "1", "--augment.policy", "adversarial",
         "--aaa.num_policies", "3", "--aaa.lr", "0.01", "--augment.heavy", "1", "--training.epochs", "2",
         "--validation.every", "0"]


def _train(run_dir: Path, demo_root: Path, *extra: str) -> None:
    proc = train_in_process(["--data.demo_root", str(demo_root), "--logging.folder", str(run_dir), *SMALL, *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, demo_betons) -> Path:
    run_dir = tmp_path_factory.mktemp("aaa") / "straight"
    _train(run_dir, demo_betons[0].parent)
    return run_dir


@pytest.mark.ffcv
def test_trainer_resume_with_the_policy_is_bit_exact(tmp_path, demo_betons, straight_run) -> None:
    """2 epochs straight == 1 epoch, resume, 1 more (the default schedule: one controller update per epoch; the heavy
    recipe: mixup/cutmix within each policy's images, random erasing; APGD on the M·B augmented images)."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight_run / "checkpoints" / "epoch_0001.pt", resumed / "checkpoints" / "last.pt")
    _train(resumed, demo_betons[0].parent, "--training.resume", "auto")
    a, b = _load(straight_run / "checkpoints" / "last.pt"), _load(resumed / "checkpoints" / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"model.{name} differs after resume"
    pa, pb = a["augment_policy"], b["augment_policy"]
    for name in pa["controller"]:
        assert torch.equal(pa["controller"][name], pb["controller"][name]), f"controller.{name} differs"
    assert pa["updates"] == pb["updates"] == 2 and pa["loss_steps"] == 0 and pa["tokens"] is None
    assert torch.equal(pa["generator"], pb["generator"])
    epoch = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["kind"] == "epoch" and epoch["aaa_updates"] == 2 and epoch["aaa_baseline"] is None
    assert set(epoch["aaa_op_probs"]) == set(AAA_OPS) and abs(sum(epoch["aaa_op_probs"].values()) - 1) < 1e-3


@pytest.mark.ffcv
def test_show_policy_and_plot_run_read_the_run(tmp_path, straight_run, demo_betons) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    import plot_run
    import show_policy

    png = tmp_path / "grid.png"
    lines = show_policy.show_policy(straight_run / "checkpoints" / "last.pt", png, top=3, num_images=4,
                                    beton=demo_betons[1])
    assert len(lines) == 3 and all(line.count("(") == 2 for line in lines)
    assert Image.open(png).size[0] > 100
    out = plot_run.plot_run(straight_run, tmp_path / "curves.png")
    assert out.is_file() and (tmp_path / "curves_policy.png").is_file()


# Two ranks keeping one controller: test_train_ddp.py's two-process run trains with the policy.
