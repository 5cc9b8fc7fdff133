"""Tests of rat.eval: one AutoAttack evaluation (CPU, micro models, the 64-px demo data, few images)."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_support import TINY_CLASSES, tiny_checkpoint

from rat.eval import EvalSpec, load_result, merge_results, run_evaluation
from rat.eval.autoattack import build_autoattack, resolve_attacks, robust_after_attack
from rat.eval.data import eval_subset, iter_eval_batches, resize_size, shard_batches
from rat.eval.evaluate import resolve, state_path_for
from rat.eval.model import build_eval_model
from rat.eval.results import ResultError, format_eps, summary_line
from rat.eval.rules import parse_eps
from rat.eval.state import EvalState, StateMismatchError, atomic_write_json
from rat.models import CheckpointError, read_checkpoint

pytest.importorskip("ffcv")

CONVNEXT = "convnext_micro_cvst"
VIT = "vit_micro_patch16_cvst"
REPO = Path(__file__).resolve().parents[1]
SMALL_EPS = {"Linf": 1 / 255, "L2": 0.1, "L1": 2.0}  # small radii leave some robust points on the micro model
AUTOATTACK_N_ITER = 10  # APGD iterations of the comparison with plain AutoAttack


@pytest.fixture(scope="session")
def convnext_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.getbasetemp(), CONVNEXT)


@pytest.fixture(scope="session")
def vit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.getbasetemp(), VIT)


def _spec(data: Path, ckpt: Path | None, out: Path, **kw) -> EvalSpec:
    options = dict(version="fast", n_ex=16, batch_size=8, num_workers=1, device="cpu", n_iter=5)
    options.update(kw)
    return EvalSpec(data=data, checkpoint=ckpt, output=out, **options)


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts: subset rule, shards, eps, state file, attacks.


def test_subset_rule_is_fixed_and_documented():
    subset = eval_subset(300, 16)
    expected = np.sort(np.random.default_rng(0).permutation(300)[:16])
    np.testing.assert_array_equal(subset, expected)
    assert np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(eval_subset(300, 16), subset)  # same on every call
    assert len(eval_subset(50_000, 5000)) == 5000
    with pytest.raises(ValueError, match="--n-ex between 1 and 300"):
        eval_subset(300, 301)


def test_shards_split_batches_exactly():
    for n_batches in (1, 5, 50):
        for count in range(1, n_batches + 1, 2):
            parts = [shard_batches(n_batches, i, count) for i in range(count)]
            assert [b for p in parts for b in p] == list(range(n_batches))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="at most 3 shards"):
        shard_batches(3, 0, 4)
    with pytest.raises(ValueError, match="index must be in"):
        shard_batches(10, 4, 4)


def test_eps_parsing_and_formatting():
    assert parse_eps("4/255") == pytest.approx(4 / 255)
    assert parse_eps("0.5") == 0.5 and parse_eps(75) == 75.0
    assert format_eps("Linf", 4 / 255) == "4/255" and format_eps("L2", 2.0) == "2" and format_eps("L1", 75) == "75"
    assert format_eps("Linf", 0.01) == "0.01"
    with pytest.raises(ValueError, match="fraction"):
        parse_eps("four")
    with pytest.raises(ValueError, match="positive"):
        parse_eps("-1")


def test_resize_size_is_robustbench_crop():
    assert resize_size(224) == 256 and resize_size(256) == 292 and resize_size(48) == 54 and resize_size(32) == 36


def test_versions_and_attacks():
    assert resolve_attacks("standard") == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert resolve_attacks("fast") == ["apgd-ce", "apgd-t"]
    assert resolve_attacks("custom", ["square", "apgd-ce"]) == ["square", "apgd-ce"]
    with pytest.raises(ValueError, match="needs --attacks"):
        resolve_attacks("custom")
    with pytest.raises(ValueError, match="only goes with --version custom"):
        resolve_attacks("fast", ["apgd-ce"])
    with pytest.raises(ValueError, match="unknown attack"):
        resolve_attacks("custom", ["pgd"])


def test_state_is_atomic_and_refuses_other_evaluations(tmp_path: Path):
    path = tmp_path / "r.json.state.json"
    state = EvalState.load_or_create(path, {"eps": 0.1, "arch": "a"}, ["clean", "apgd-ce"])
    state.record(0, "clean", [True, False], 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]  # no temporary file
    again = EvalState.load_or_create(path, {"eps": 0.1, "arch": "a"}, ["clean", "apgd-ce"])
    assert again.done_steps(0) == ["clean"] and not again.is_done(0) and again.flags(0, "clean") == [True, False]
    assert len(again.runs) == 2
    with pytest.raises(StateMismatchError, match="differs in: eps"):
        EvalState.load_or_create(path, {"eps": 0.2, "arch": "a"}, ["clean", "apgd-ce"])
    path.write_text("{")
    with pytest.raises(StateMismatchError, match="not valid JSON"):
        EvalState.load_or_create(path, {}, ["clean"])
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_one_attack_at_a_time_equals_one_autoattack_call():
    """The per-attack chain of rat.eval.autoattack gives AutoAttack's own flags (random tiny CNN, all norms)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 2, 1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 10)).eval().requires_grad_(False)
    x = torch.rand(12, 3, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 10  # two misclassified points
    for norm, eps in (("Linf", 8 / 255), ("L2", 0.5), ("L1", 8.0)):
        adversary = build_autoattack(model, norm=norm, eps=eps, attacks=["apgd-ce", "apgd-t"], device="cpu",
                                     n_iter=10)
        robust = model(x).argmax(1).eq(y)
        for attack in ("apgd-ce", "apgd-t"):
            alive = robust.nonzero().squeeze(1)
            robust[alive] = robust_after_attack(adversary, attack, x[alive], y[alive])
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        assert torch.equal(robust, y_adv.eq(y)), norm
        assert not robust[:2].any()


# ---------------------------------------------------------------------------------------------------------------------
# End to end on the demo val beton.


@pytest.mark.ffcv
@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_fast_evaluation_each_norm(norm: str, tmp_path: Path, demo_betons, convnext_ckpt: Path):
    out = tmp_path / f"{norm}.json"
    result = run_evaluation(_spec(demo_betons[1], convnext_ckpt, out, norm=norm, eps=SMALL_EPS[norm]))
    assert load_result(out) == result
    assert not state_path_for(out).exists()  # the state goes once the result is written
    assert result["checkpoint_sha256"] == hashlib.sha256(convnext_ckpt.read_bytes()).hexdigest()
    assert (result["arch"], result["norm"], result["resolution"]) == (CONVNEXT, norm, 32)
    assert result["eps"] == SMALL_EPS[norm]
    assert result["version"] == "fast" and result["attacks"] == ["apgd-ce", "apgd-t"]
    assert result["n_ex"] == 16 and result["per_example"]["indices"] == eval_subset(300, 16).tolist()
    assert result["standard_settings"] is False and result["attack_settings"]["apgd"]["n_iter"] == 5
    assert result["software"]["pyautoattack"] == "0.2.0" and result["software"]["torch"] == torch.__version__
    flags = result["per_example"]
    assert result["clean_accuracy"] == flags["clean"].count("1") / 16 > 0.3
    after = result["robust_accuracy_after"]
    assert after == {a: flags[a].count("1") / 16 for a in ("apgd-ce", "apgd-t")}
    assert result["clean_accuracy"] >= after["apgd-ce"] >= after["apgd-t"] == result["robust_accuracy"]
    for earlier, later in (("clean", "apgd-ce"), ("apgd-ce", "apgd-t")):  # robust after an attack ⊆ robust before
        assert all(a >= b for a, b in zip(map(int, flags[earlier]), map(int, flags[later])))
    assert result["time_s"] > 0 and result["runs"][0]["batches_computed"] == 2
    assert f"{norm} eps={format_eps(norm, SMALL_EPS[norm])} res=32 fast n=16" in summary_line(result)


@pytest.mark.ffcv
def test_standard_version_in_bf16(tmp_path: Path, demo_betons, convnext_ckpt: Path):
    """Full AutoAttack (APGD-CE, APGD-T, FAB-T, Square), few iterations and queries, under bf16 autocast."""
    result = run_evaluation(_spec(demo_betons[1], convnext_ckpt, tmp_path / "std.json", version="standard",
                                  precision="bf16", eps=SMALL_EPS["Linf"], n_ex=8, n_iter=2, n_queries=10))
    assert result["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and result["precision"] == "bf16"
    assert result["attack_settings"]["square"]["n_queries"] == 10 and result["attack_settings"]["fab"]["n_iter"] == 2
    accuracies = [result["clean_accuracy"], *result["robust_accuracy_after"].values()]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] > 0.3


@pytest.mark.ffcv
def test_result_matches_autoattack(tmp_path: Path, demo_betons, convnext_ckpt: Path, caplog):
    """The JSON equals plain AutoAttack run batch by batch on the same images, both at AUTOATTACK_N_ITER iterations
    (AutoAttack's own APGD-CE/APGD-T constructors, as its __init__ calls them, with that n_iter); without --n-iter the
    result records AutoAttack's standard 100."""
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    from rat.data import build_val_loader

    eps = 1 / 255
    default = run_evaluation(_spec(demo_betons[1], convnext_ckpt, tmp_path / "d.json", eps=eps, n_iter=None, n_ex=2,
                                   version="custom", attacks=["apgd-ce"]))
    assert default["standard_settings"] is True and default["attack_settings"]["apgd"]["n_iter"] == 100
    result = run_evaluation(_spec(demo_betons[1], convnext_ckpt, tmp_path / "r.json", eps=eps,
                                  n_iter=AUTOATTACK_N_ITER))
    assert result["standard_settings"] is False and result["attack_settings"]["apgd"]["n_iter"] == AUTOATTACK_N_ITER
    assert 0 < result["robust_accuracy"] < result["clean_accuracy"]  # the attacks break some points, not all
    model = build_eval_model(read_checkpoint(convnext_ckpt).recipe(CONVNEXT, num_classes=TINY_CLASSES), resolution=32,
                             device=torch.device("cpu"))
    indices = np.sort(np.random.default_rng(0).permutation(300)[:16])
    loader = build_val_loader(demo_betons[1], batch_size=8, resolution=32, device="cpu", num_workers=1,
                              indices=indices)
    robust, counts = [], {"clean": 0, "APGD-CE": 0, "APGD-T": 0}
    for x, y in loader:
        # The README's custom configuration of the two attacks of rat's "fast" version (APGD-CE with one restart), with
        # both APGDs built as AutoAttack's __init__ builds them but for n_iter.
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0)
        common = dict(n_restarts=1, n_iter=AUTOATTACK_N_ITER, verbose=False, eps=eps, norm="Linf", eot_iter=1, rho=.75,
                      seed=0, device=adversary.device, logger=adversary.logger)
        adversary.apgd = APGDAttack(model, **common)
        adversary.apgd_targeted = APGDAttack_targeted(model, **common)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="auto-attack"):
            _, y_adv = adversary.run_standard_evaluation(x.contiguous(), y, batch_size=len(x))
        robust += y_adv.eq(y).tolist()
        text = caplog.text
        counts["clean"] += round(float(re.search(r"initial accuracy: ([\d.]+)%", text).group(1)) * len(x) / 100)
        for name in ("APGD-CE", "APGD-T"):
            match = re.search(rf"robust accuracy after {name}: ([\d.]+)%", text)
            acc = float(match.group(1)) if match else 0.0  # AutoAttack stops early when nothing is robust
            counts[name] += round(acc * len(x) / 100)
    assert result["per_example"]["apgd-t"] == "".join("1" if r else "0" for r in robust)
    assert result["clean_accuracy"] == counts["clean"] / 16
    assert result["robust_accuracy_after"] == {"apgd-ce": counts["APGD-CE"] / 16, "apgd-t": counts["APGD-T"] / 16}


@pytest.mark.ffcv
def test_shards_merge_to_the_unsharded_result(tmp_path: Path, demo_betons, convnext_ckpt: Path):
    common = dict(n_ex=24, batch_size=4, n_iter=3, eps=SMALL_EPS["Linf"])
    whole = run_evaluation(_spec(demo_betons[1], convnext_ckpt, tmp_path / "whole.json", **common))
    shards = [run_evaluation(_spec(demo_betons[1], convnext_ckpt, tmp_path / f"s{i}.json", shard=(i, 3), **common))
              for i in (2, 0, 1)]
    assert sorted(len(s["per_example"]["indices"]) for s in shards) == [8, 8, 8]
    merged = merge_results(shards)
    assert merged["per_example"] == whole["per_example"]
    for key in ("clean_accuracy", "robust_accuracy", "robust_accuracy_after", "n_ex", "subset", "checkpoint_sha256"):
        assert merged[key] == whole[key], key
    assert merged["shard"] is None
    from rat.eval.merge import main as merge_main

    assert merge_main([str(tmp_path / f"s{i}.json") for i in range(3)] + ["--output", str(tmp_path / "m.json")]) == 0
    assert load_result(tmp_path / "m.json")["per_example"] == whole["per_example"]
    assert merge_main([str(tmp_path / "s0.json"), "--output", str(tmp_path / "bad.json")]) == 2
    with pytest.raises(ResultError, match="exactly once"):
        merge_results(shards[:2])
    with pytest.raises(ResultError, match="differ in"):
        merge_results([shards[0], {**shards[1], "eps": 0.5}])
    for key, other in (("n_iter", 5), ("data", "other.beton"), ("model_kwargs", {"num_classes": 5})):
        with pytest.raises(ResultError, match=f"differ in {key}"):  # every identity setting of the schema
            merge_results([shards[0], {**shards[1], key: other}])


@pytest.mark.ffcv
def test_killed_evaluation_resumes_without_redoing_batches(tmp_path: Path, demo_betons, convnext_ckpt: Path):
    out = tmp_path / "r.json"
    state_file = state_path_for(out)
    cmd = [sys.executable, "-m", "rat.eval", "--checkpoint", str(convnext_ckpt), "--data", str(demo_betons[1]),
           "--version", "fast", "--eps", "1/255", "--n-ex", "24", "--batch-size", "8", "--n-iter", "10",
           "--num-workers", "1", "--threads", "1", "--device", "cpu", "--output", str(out)]
    n_batches, n_steps = 3, 3

    def finished_batches() -> int:
        if not state_file.exists():
            return 0
        batches = json.loads(state_file.read_text())["batches"]  # written atomically: always complete JSON
        return sum(len(b["flags"]) == n_steps for b in batches.values())

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while finished_batches() < 1:
        assert proc.poll() is None, "the evaluation ended before it could be killed"
        assert time.time() < deadline, "no batch finished in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    done_at_kill = finished_batches()
    assert 1 <= done_at_kill < n_batches and not out.exists()

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping {done_at_kill} finished batches" in resumed.stderr
    result = load_result(out)
    assert not state_file.exists()
    killed_run, resumed_run = result["runs"]
    assert killed_run["batches_computed"] == done_at_kill
    assert resumed_run["batches_computed"] == n_batches - done_at_kill
    assert killed_run["steps_computed"] + resumed_run["steps_computed"] == n_batches * n_steps  # nothing redone
    assert resumed.stdout.strip() == summary_line(result)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses, for bit-identical float math
    try:
        reference = run_evaluation(_spec(demo_betons[1], convnext_ckpt, tmp_path / "ref.json", eps=1 / 255, n_ex=24,
                                         n_iter=10))
    finally:
        torch.set_num_threads(threads)
    assert result["per_example"] == reference["per_example"]
    for key in ("clean_accuracy", "robust_accuracy", "robust_accuracy_after"):
        assert result[key] == reference[key]


@pytest.mark.ffcv
def test_resume_refuses_a_state_of_another_evaluation(tmp_path: Path, demo_betons, convnext_ckpt: Path):
    out = tmp_path / "r.json"
    state_path_for(out).write_text(json.dumps({"format": "rat.eval.state/1", "fingerprint": {"eps": 1.0},
                                               "batches": {}, "runs": []}))
    with pytest.raises(StateMismatchError, match="different evaluation .*delete it"):
        run_evaluation(_spec(demo_betons[1], convnext_ckpt, out))


@pytest.mark.ffcv
def test_a_second_evaluation_never_replaces_the_first_and_a_finished_one_is_reused(tmp_path: Path, demo_betons,
                                                                                   convnext_ckpt: Path):
    """Two runs with different settings on one --output, the second checked while the output was still free and
    started after the first finished: the second is refused (the output is checked again under the evaluation's lock)
    and the first's result stays. The first run again reuses its result instead of recomputing it."""
    from rat.eval.evaluate import OutputTakenError

    out = tmp_path / "r.json"
    common = dict(n_ex=4, batch_size=4, n_iter=1, resolution=32)
    second = resolve(_spec(demo_betons[1], convnext_ckpt, out, eps=2 / 255, **common))  # output still free
    first = run_evaluation(_spec(demo_betons[1], convnext_ckpt, out, eps=1 / 255, **common))
    written = out.read_bytes()
    with pytest.raises(OutputTakenError, match=r"different evaluation \(differs in eps\).*another process wrote it"):
        run_evaluation(second)
    assert out.read_bytes() == written and not state_path_for(out).exists()
    again = run_evaluation(_spec(demo_betons[1], convnext_ckpt, out, eps=1 / 255, **common))
    assert again == first and out.read_bytes() == written  # reused: not recomputed, not rewritten


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and architectures.


def test_checkpoint_that_does_not_fit_the_architecture_is_refused(tmp_path: Path, demo_betons, convnext_ckpt: Path):
    ckpt = torch.load(convnext_ckpt, weights_only=True)
    bare = tmp_path / "bare.pth"
    torch.save(ckpt["model"], bare)
    with pytest.raises(CheckpointError, match="does not name its architecture.*--arch"):
        resolve(_spec(demo_betons[1], bare, tmp_path / "a.json"))
    with pytest.raises(CheckpointError, match=f"holds a {CONVNEXT} but --arch {VIT}"):
        resolve(_spec(demo_betons[1], convnext_ckpt, tmp_path / "b.json", arch=VIT))
    with pytest.raises(CheckpointError, match=f"does not fit architecture {VIT}"):
        run_evaluation(_spec(demo_betons[1], bare, tmp_path / "c.json", arch=VIT, normalize=True,
                             model_kwargs={"num_classes": TINY_CLASSES}))
    # A bare state dict does not say whether the model normalizes its input: refused, naming --normalize.
    with pytest.raises(CheckpointError, match="does not record whether its model normalizes.*--normalize 1"):
        resolve(_spec(demo_betons[1], bare, tmp_path / "g.json", arch=CONVNEXT))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        resolve(_spec(demo_betons[1], convnext_ckpt, tmp_path / "d.json", use_ema=True))
    # The bare state dict with the right --arch evaluates like the rat checkpoint.
    result = run_evaluation(_spec(demo_betons[1], bare, tmp_path / "e.json", arch=CONVNEXT, resolution=32,
                                  normalize=True, model_kwargs={"num_classes": TINY_CLASSES}, n_ex=8, n_iter=2))
    assert result["arch"] == CONVNEXT and result["clean_accuracy"] > 0.3
    assert (result["normalize"], result["normalize_source"]) == (True, "given")
    # The wrong normalization would silently compute another function: a contradicting flag is refused.
    with pytest.raises(CheckpointError, match="create it with normalize=True"):
        resolve(_spec(demo_betons[1], convnext_ckpt, tmp_path / "h.json", normalize=False))
    # A registered model name alone: random weights (smoke test of an architecture).
    random = run_evaluation(_spec(demo_betons[1], None, tmp_path / "f.json", arch=VIT, resolution=32,
                                  model_kwargs={"num_classes": TINY_CLASSES}, n_ex=8, n_iter=2))
    assert (random["model"], random["checkpoint"], random["checkpoint_sha256"]) == (VIT, None, None)


def test_cli_reports_a_bad_checkpoint_clearly(tmp_path: Path, demo_betons, convnext_ckpt: Path):
    from rat.eval.cli import main

    status = main(["--checkpoint", str(convnext_ckpt), "--arch", VIT, "--data", str(demo_betons[1]),
                   "--output", str(tmp_path / "x.json"), "--log", "-"])
    assert status == 2
    assert main(["--checkpoint", str(tmp_path / "missing.pth"), "--data", str(demo_betons[1]), "--log", "-"]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Resolution handling.


def _pos_embed_shape(model: torch.nn.Module) -> tuple[int, ...]:
    shapes = [tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("pos_embed")]
    assert len(shapes) == 1
    return shapes[0]


@pytest.mark.ffcv
def test_vit_and_convnext_at_another_resolution(tmp_path: Path, demo_betons, vit_ckpt: Path, convnext_ckpt: Path):
    from rat.models import create_model

    cpu = torch.device("cpu")
    vit48 = build_eval_model(read_checkpoint(vit_ckpt).recipe(VIT, num_classes=TINY_CLASSES), resolution=48,
                             device=cpu)
    fresh48 = create_model(VIT, img_size=48, num_classes=TINY_CLASSES)
    fresh32 = create_model(VIT, img_size=32, num_classes=TINY_CLASSES)
    assert _pos_embed_shape(vit48) == _pos_embed_shape(fresh48) != _pos_embed_shape(fresh32)  # resampled to 3×3

    batches = list(iter_eval_batches(demo_betons[1], eval_subset(300, 8), [8], resolution=48, device=cpu,
                                     num_workers=1))
    assert batches[0][0].shape == (8, 3, 48, 48) and 0 <= batches[0][0].min() and batches[0][0].max() <= 1
    for arch, ckpt in ((VIT, vit_ckpt), (CONVNEXT, convnext_ckpt)):
        result = run_evaluation(_spec(demo_betons[1], ckpt, tmp_path / f"{arch}.json", resolution=48, n_ex=8,
                                      n_iter=2))
        assert result["resolution"] == 48 and result["arch"] == arch
    assert resolve(_spec(demo_betons[1], vit_ckpt, tmp_path / "d.json")).spec.resolution == 32  # training size


def test_image_folder_preprocessing_is_robustbench(tmp_path: Path, convnext_ckpt: Path):
    """An ImageNet-style folder is resized to floor(r/0.875) (bicubic) and center-cropped to r."""
    from PIL import Image

    from rat.data.demo import load_demo_arrays

    images, labels = load_demo_arrays("val")
    root = tmp_path / "val"
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((80, 64)).save(root / f"class_{label}" / f"{i:04d}.png")  # not square
    indices = eval_subset(300, 8)
    (x, y), = iter_eval_batches(root, indices, [8], resolution=48, device=torch.device("cpu"), num_workers=0)
    files = sorted(root.glob("*/*.png"))  # ImageFolder order: class folders, then files, sorted
    first = Image.open(files[indices[0]]).convert("RGB").resize((67, 54), Image.BICUBIC)  # short side 54 = 48/0.875
    left, top = round((67 - 48) / 2), round((54 - 48) / 2)
    expected = torch.from_numpy(np.array(first.crop((left, top, left + 48, top + 48)))).permute(2, 0, 1) / 255
    assert x.shape == (8, 3, 48, 48)
    torch.testing.assert_close(x[0], expected, atol=1 / 255, rtol=0)
    assert y[0].item() == int(files[indices[0]].parent.name.split("_")[1])
    result = run_evaluation(_spec(root, convnext_ckpt, tmp_path / "folder.json", resolution=32, n_ex=8, n_iter=2))
    assert result["subset"]["dataset_size"] == 300 and result["clean_accuracy"] > 0.3


# ---------------------------------------------------------------------------------------------------------------------
# RobustBench export.


@pytest.mark.ffcv
def test_export_robustbench(tmp_path: Path, demo_betons, convnext_ckpt: Path, capsys: pytest.CaptureFixture):
    """The tool as a script once (the entry is written); its refusals through its ``main`` in this process."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from export_robustbench import main as export
    finally:
        sys.path.pop(0)
    out = tmp_path / "r.json"
    result = run_evaluation(_spec(demo_betons[1], convnext_ckpt, out, eps=4 / 255, n_ex=8, n_iter=2))
    args = [str(out), "--model-name", "Rat2025Tiny_CN", "--architecture", "ConvNeXt-micro + ConvStem", "--venue",
            "test", "--out-dir", str(tmp_path / "info")]

    def refused(*extra: str) -> str:
        assert export([*args, *extra]) == 2
        return capsys.readouterr().err

    assert "--allow-nonstandard" in refused()
    done = subprocess.run([sys.executable, str(REPO / "tools" / "export_robustbench.py"), *args,
                           "--allow-nonstandard"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    entry = json.loads((tmp_path / "info" / "imagenet" / "Linf" / "Rat2025Tiny_CN.json").read_text())
    assert list(entry) == ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                           "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"]
    assert entry["eps"] == "4/255" and entry["dataset"] == "imagenet"
    assert entry["clean_acc"] == f"{100 * result['clean_accuracy']:.2f}"
    assert entry["autoattack_acc"] == entry["reported"] == f"{100 * result['robust_accuracy']:.2f}"
    assert "fast" in entry["footnote"] and "8 images" in entry["footnote"]
    assert "Input normalization inside the model: ImageNet mean/std." in entry["footnote"]
    assert "drop --normalize" in refused("--allow-nonstandard", "--normalize", "0")
    del result["normalize"]  # a result written before rat recorded the normalization
    out.write_text(json.dumps(result))
    assert "--normalize 1" in refused("--allow-nonstandard")


# ---------------------------------------------------------------------------------------------------------------------
# Paper fidelity: a beton gives RobustBench's preprocessing; RobustBench's ImageNet subset.

FIDELITY_RESOLUTIONS = (224, 256, 288, 320)


def _photo_folder(root: Path) -> Path:
    """sklearn's two colour photographs (427x640) and crops of other shapes (portrait, odd sizes), as JPEG files in an
    ImageNet-style folder (two classes)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    crops = [(slice(None), slice(None)), (slice(0, 427), slice(101, 384)), (slice(13, 372), slice(0, 517))]
    for c, photo in enumerate(photos):
        (root / f"class_{c}").mkdir(parents=True)
        for i, (rows, cols) in enumerate(crops):
            image = Image.fromarray(np.ascontiguousarray(photo[rows, cols]))
            image.save(root / f"class_{c}" / f"photo_{i}.JPEG", quality=90)
    return root


def _pixel_gaps(a: Path, b: Path, resolution: int, n: int) -> tuple[float, float]:
    """(mean, max) |Δ| in 1/255 units between the evaluation tensors of two sources holding the same n images."""
    cpu = torch.device("cpu")
    indices = np.arange(n)
    (xa, ya), = iter_eval_batches(a, indices, [n], resolution=resolution, device=cpu, num_workers=0)
    (xb, yb), = iter_eval_batches(b, indices, [n], resolution=resolution, device=cpu, num_workers=0)
    assert xa.shape == xb.shape == (n, 3, resolution, resolution) and torch.equal(ya, yb)
    gap = (xa - xb).abs() * 255
    return gap.mean().item(), gap.max().item()


@pytest.mark.ffcv
def test_beton_gives_robustbench_preprocessing(tmp_path: Path):
    """A val beton as tools/write_ffcv.py writes it (raw, full size) gives exactly the tensors of the image folder
    (torchvision ImageFolder + Resize(floor(r/0.875), bicubic) + CenterCrop(r)) at 224-320 px; the issue's bound is
    mean |Δ| <= 0.5/255 and max |Δ| <= 2/255. A beton that re-encodes the photos as JPEG stays close on average."""
    from rat.data import write_folder_beton
    from rat.eval.data import preprocessing_info

    folder = _photo_folder(tmp_path / "val")
    raw = write_folder_beton(folder, tmp_path / "raw.beton", max_resolution=None, write_mode="raw", num_workers=1,
                             progress=False).path
    jpg = write_folder_beton(folder, tmp_path / "jpg.beton", max_resolution=None, write_mode="jpg", num_workers=1,
                             progress=False).path
    assert preprocessing_info(raw)["original_pixels"] and not preprocessing_info(jpg)["original_pixels"]
    for resolution in FIDELITY_RESOLUTIONS:
        mean, worst = _pixel_gaps(folder, raw, resolution, n=6)
        print(f"r={resolution}: raw beton vs folder mean {mean:.4f}/255 max {worst:.1f}/255")
        assert mean <= 0.5 and worst <= 2.0
        mean, worst = _pixel_gaps(folder, jpg, resolution, n=6)
        print(f"r={resolution}: JPEG q90 beton vs folder mean {mean:.4f}/255 max {worst:.1f}/255")
        assert mean <= 2.0


def _fake_imagenet_val(root: Path, extra: int) -> list[str]:
    """An ImageNet-1k-style val folder: 1000 classes of one tiny image each (those of the 997 classes that RobustBench's
    list samples are taken from the list, 3 more are made up), plus the first ``extra`` files of the list; returns
    the list."""
    from PIL import Image

    from rat.eval.data import robustbench_image_ids

    ids = list(robustbench_image_ids())
    chosen = {name.split("/")[0]: name for name in reversed(ids)}  # one file per class (its first in the list)
    names = set(chosen.values()) | set(ids[:extra])
    names |= {f"n0000000{i}/ILSVRC2012_val_0000000{i}.JPEG" for i in range(1000 - len(chosen))}
    for i, name in enumerate(sorted(names)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (i % 256, (7 * i) % 256, 99)).save(root / name)
    return ids


@pytest.mark.ffcv
def test_robustbench_subset_on_imagenet_and_seeded_elsewhere(tmp_path: Path, demo_betons):
    """On ImageNet-1k (1000 classes, ILSVRC2012 val names) the default subset is RobustBench's list, first n_ex, found
    by file name in a folder and in a beton alike, and recorded in the result; other data keep the seeded subset."""
    from rat.data import write_folder_beton
    from rat.eval.data import ROBUSTBENCH_IDS, select_subset

    assert hashlib.sha256(ROBUSTBENCH_IDS.read_bytes()).hexdigest() == (
        "d4121626d07722a0126c35b1563042e46a546f1a05ce705f2cdc635896d58574")  # robustbench 1.1.1's file, unchanged
    folder = tmp_path / "imagenet_val"
    ids = _fake_imagenet_val(folder, extra=8)
    assert len(ids) == 5000 and len(set(ids)) == 5000
    names = sorted(str(p.relative_to(folder)) for p in folder.glob("*/*.JPEG"))  # ImageFolder order
    indices, info = select_subset(folder, 8)
    assert info["name"] == "robustbench" and info["dataset_size"] == len(names) and 1000 <= len(names) <= 1008
    assert sorted(names[i] for i in indices) == sorted(ids[:8]) and list(indices) == sorted(indices)
    beton = write_folder_beton(folder, tmp_path / "imagenet_val.beton", max_resolution=None, write_mode="raw",
                               num_workers=1, progress=False).path
    beton_indices, beton_info = select_subset(beton, 8)
    np.testing.assert_array_equal(beton_indices, indices)
    assert beton_info == info
    seeded, seeded_info = select_subset(folder, 8, "seeded")
    assert seeded_info["name"] == "seeded" and not np.array_equal(seeded, indices)
    with pytest.raises(ValueError, match="RobustBench's ImageNet images are not in"):
        select_subset(folder, 5000)  # most listed files are missing
    # A 1000-class beton that does not record its file names cannot be matched: refused, not silently seeded.
    classes_file = Path(str(beton) + ".classes.json")
    record = json.loads(classes_file.read_text())
    del record["files"]
    classes_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not record its file names.*--subset seeded"):
        select_subset(beton, 8)
    # Demo data (10 classes): the seeded subset, as before.
    demo_indices, demo_info = select_subset(demo_betons[1], 16)
    assert demo_info["name"] == "seeded"
    np.testing.assert_array_equal(demo_indices, eval_subset(300, 16))
    # The result records the subset.
    result = run_evaluation(EvalSpec(data=folder, arch=CONVNEXT, model_kwargs={"num_classes": 1000}, resolution=32,
                                     n_ex=8, batch_size=8, version="custom", attacks=["apgd-ce"], n_iter=1,
                                     num_workers=0, device="cpu", output=tmp_path / "rb.json"))
    assert result["subset"]["name"] == "robustbench" and result["subset"]["list_sha256"] == info["list_sha256"]
    assert sorted(names[i] for i in result["per_example"]["indices"]) == sorted(ids[:8])
    assert result["preprocessing"]["original_pixels"]


def test_jobs_file_normalize_reaches_rat_eval(tmp_path: Path):
    """A jobs-file entry's normalize (for checkpoints that do not say) becomes rat.eval's --normalize, which parses;
    like every jobs-file switch it is a real YAML boolean (1 is refused)."""
    from rat.eval.cli import build_parser
    from rat.eval.spec import spec_from_args
    from rat.eval.sweep.jobs import JobsError, Task, expand_jobs, task_command

    entries = [{"checkpoint": "released/vit_s.pt", "arch": VIT, "data": "val.beton", "normalize": True},
               {"checkpoint": "runs/a/checkpoints/last.pt", "data": "val.beton"}]
    with_flag, without = expand_jobs(entries, tmp_path)
    cmd = task_command(Task(with_flag), "cpu")
    assert cmd[cmd.index("--normalize") + 1] == "1" and "--normalize" not in task_command(Task(without), "cpu")
    assert spec_from_args(build_parser().parse_args(cmd[3:])).normalize is True
    with pytest.raises(JobsError, match="normalize: 1 must be true or false"):
        expand_jobs([{**entries[0], "normalize": 1}], tmp_path)
