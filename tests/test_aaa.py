"""Adversarial AutoAugment: ops as timm/PIL define them, the controller, REINFORCE, exact resume, trainer runs, DDP."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from process_support import train_in_process
from torch import nn

from rat.config import ConfigError, make_config
from rat.data import augment as aug
from rat.data.policy import AAA_OPS, AdversarialAugment, PolicySpace

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


def _one_op(op: str, magnitude: int, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x`` under the single-op sub-policy ``(op, magnitude)``, through the policy's own augmentation path."""
    space = PolicySpace((op,), (magnitude,), 1, 1)
    policy = AdversarialAugment(space, num_policies=1, interpolation="bilinear",
                                augment_generator=torch.Generator().manual_seed(seed))
    return policy.expand(x, torch.zeros(x.shape[0], dtype=torch.int64))[0]


def test_search_space_is_the_papers_without_sample_pairing() -> None:
    assert len(AAA_OPS) == 15 and "SamplePairing" not in AAA_OPS
    space = PolicySpace()
    assert (space.num_sub_policies, space.ops_per_sub_policy, len(space.magnitudes)) == (5, 2, 10)
    assert set(space.implementations) - {"Cutout"} <= set(aug._COLOR_OPS) | set(aug.GEOMETRIC_OPS)


@pytest.mark.parametrize("op", [op for op in AAA_OPS if op != "Cutout"])
def test_policy_ops_match_timm_pil_ops(photo: np.ndarray, op: str) -> None:
    """Each op at magnitude 7, through the policy, against timm's PIL op with timm's argument for that level."""
    from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP

    name = PolicySpace((op,)).implementations[0]
    image = Image.fromarray(photo)
    args = LEVEL_TO_ARG[name](7, {"translate_pct": 0.45}) if LEVEL_TO_ARG.get(name) else ()
    ours = _one_op(op, 7, _to_tensor(photo))
    if name in aug.GEOMETRIC_OPS:  # timm negates at random: ours must match one of the two signs
        errors = [(ours - _to_tensor(NAME_TO_OP[name](image, sign * args[0], resample=Image.BILINEAR,
                                                      fillcolor=(0, 0, 0)))).abs()[..., 1:-1, 1:-1].mean()
                  for sign in (1, -1)]
        assert min(errors) < 0.01 < max(errors), f"{op}: {errors}"
    else:
        reference = _to_tensor(NAME_TO_OP[name](image, *args))
        assert (ours - reference).abs().max() <= 1.5 / 255, op
        assert not torch.equal(ours, _to_tensor(photo))


def test_cutout_paints_a_square_like_pil(photo: np.ndarray) -> None:
    """Cutout at magnitude 9 (side round(0.2 * 0.9 * 48) = 9 px) equals PIL drawing that square in the fill."""
    height, width = photo.shape[:2]
    gen = torch.Generator().manual_seed(3)
    ours = _one_op("Cutout", 9, _to_tensor(photo).repeat(4, 1, 1, 1), seed=3)
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
        ImageDraw.Draw(image).rectangle([left, top, right - 1, bottom - 1], fill=(0, 0, 0))
        assert torch.equal(ours[i:i + 1], _to_tensor(np.asarray(image))), f"image {i}"
        assert (ours[i] == 0).all(dim=0).sum() >= min(side, bottom - top) * min(side, right - left) > 0


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
    policy = AdversarialAugment(PolicySpace(), num_policies=8, lr=lr, batch_fraction=1 / 8, seed=1)
    rewards = []
    for step in range(steps):
        batch = slice(step * 32 % 1024, step * 32 % 1024 + 256)
        xa, ya = policy.expand(x[batch], y[batch])
        reward = policy.rewards(nn.CrossEntropyLoss(), model(xa), ya)
        policy.observe(reward)
        rewards.append(float(reward.mean()))
    return rewards


def test_reward_rises_against_a_frozen_uniform_controller(digits_model) -> None:
    """Same frozen model, same batches: the learning controller finds policies with a much higher loss."""
    model, x, y = digits_model
    uniform = _search(model, x, y, lr=0.0)
    learned = _search(model, x, y, lr=0.02)
    assert np.mean(learned[-10:]) > 2 * np.mean(uniform[-10:]), (learned, uniform)
    assert np.mean(learned[-10:]) > 2 * np.mean(learned[:10])


def _final_entropy(entropy_weight: float) -> tuple[float, float]:
    space = PolicySpace()
    policy = AdversarialAugment(space, num_policies=8, lr=0.05, entropy_weight=entropy_weight, seed=0)
    invert = space.ops.index("Invert")
    for _ in range(60):  # reward: the share of Invert in a policy, a pull towards one op
        policy.tokens = policy.sample()
        policy.observe((policy.tokens[..., 0] == invert).double().mean(dim=(1, 2)))
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
            policy.observe(policy.tokens[..., 1].double().mean(dim=(1, 2)))

    kwargs = {"num_policies": 4, "lr": 0.01, "update_every": 2, "seed": 2}
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


@pytest.mark.parametrize(("argv", "message"), [
    (["--aaa.ops", "Rotate,Sheer"], "unknown op 'Sheer'"),
    (["--aaa.num_policies", "0"], "aaa.num_policies='0' is not an int"),
    (["--aaa.magnitudes", "3,11"], "aaa.magnitudes='3,11' is not comma-separated ints in [0, 10]"),
    (["--augment.heavy", "1"], "add --augment.mixup 0 --augment.cutmix 0"),
    (["--aaa.batch_fraction", "0"], "aaa.batch_fraction='0' is not"),
])
def test_bad_policy_config_is_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(["--augment.policy", "adversarial", *argv])
    assert message in str(info.value) and "\n" not in str(info.value)
    make_config(["--aaa.ops", "Rotate,Sheer"])  # not checked unless the policy is used


# -- the trainer -------------------------------------------------------------------------------------------------

SMALL = ["--model.arch", "convnext_micro_cvst", "--resolution.min_res", "32", "--resolution.max_res", "32",
         "--training.batch_size", "8", "--training.limit_batches", "2", "--training.precision", "fp32",
         "--adv.attack", "apgd", "--adv.n_iter", "1", "--validation.robust_n_ex", "0", "--validation.batch_size", "100",
         "--logging.progress", "0", "--data.num_workers", "1", "--augment.policy", "adversarial",
         "--aaa.num_policies", "3", "--aaa.lr", "0.01", "--aaa.update_every", "3", "--training.epochs", "2",
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
    """2 epochs straight == 1 epoch, resume, 1 more (APGD on the M·B augmented images; an update pending at the
    checkpoint since update_every=3 and 2 steps per epoch)."""
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
    assert pa["baseline"] == pb["baseline"] and pa["updates"] == pb["updates"] == 1
    assert len(pa["pending_tokens"]) == 1 and torch.equal(pa["generator"], pb["generator"])
    epoch = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["kind"] == "epoch" and epoch["aaa_updates"] == 1
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
