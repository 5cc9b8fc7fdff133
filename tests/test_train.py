"""End-to-end trainer runs on CPU: the demo learns, resume is bit-exact, SIGTERM and NaN stop cleanly, bf16, EMA.

Every run is ``rat.train``'s command line on the embedded demo data (FFCV betons written once per session): in this
process through ``rat.train.__main__.main(argv)`` (one interpreter start and import for all the short runs), and as
a real ``python -m rat.train`` process where the process boundary is the point (the quickstart demo, SIGTERM, the exit
status of a bad config).
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from process_support import subprocess_env, train_in_process

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
pytestmark = [pytest.mark.ffcv]

# A small, fast run: 4 batches of 16 per epoch at 32 px, APGD-2, no robust eval unless asked.
SMALL = ["--model.arch", "convnext_micro_cvst", "--resolution.min_res", "32", "--resolution.max_res", "32",
         "--training.batch_size", "16", "--training.limit_batches", "4", "--training.precision", "fp32",
         "--adv.attack", "apgd", "--adv.n_iter", "2", "--validation.robust_n_ex", "0", "--validation.batch_size", "100",
         "--logging.progress", "0", "--logging.log_every", "1", "--data.num_workers", "1", "--lr.lr", "0.002"]


def _train(run_dir: Path, demo_root: Path, *extra: str, check: bool = True):
    proc = train_in_process(["--data.demo_root", str(demo_root), "--logging.folder", str(run_dir), *SMALL, *extra])
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


@pytest.fixture(scope="module")
def demo_subset(tmp_path_factory) -> Path:
    """The first 128 demo training images (class-balanced: 11-15 per class) as a beton."""
    from rat.data import write_arrays_beton
    from rat.data.demo import DEMO_CLASSES, load_demo_arrays

    images, labels = load_demo_arrays("train")
    path = tmp_path_factory.mktemp("demo_subset") / "train128.beton"
    return write_arrays_beton(images[:128], labels[:128], path, classes=list(DEMO_CLASSES), num_workers=1)


def test_demo_recipe_learns(tmp_path, demo_subset):
    """The quickstart's command (configs/demo.yaml: APGD-2 Linf AT, mixed loss, ε warm-up, AdamW) as a real
    process, shortened to 8 epochs of 4 batches at 32 px on 128 training images, validated on those images: clean
    and robust accuracy rise far above chance (10 %), and the run ends with the quickstart's summary. (~15 s; the
    shipped 10-epoch demo on the whole set is ``test_demo_as_shipped_learns``, marked slow.)"""
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "rat.train", "-C", "configs/demo.yaml", "--data.train_dataset",
                           str(demo_subset), "--data.val_dataset", str(demo_subset), "--logging.folder", str(run_dir),
                           "--logging.progress", "0", "--training.epochs", "8", "--resolution.min_res", "32",
                           "--resolution.max_res", "32", "--adv.eps_warmup_epochs", "4", "--lr.warmup_epochs", "1",
                           "--validation.every", "4", "--validation.robust_n_ex", "64", "--data.num_workers", "1",
                           "--logging.keep_checkpoints", "2"],
                          capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = _epochs(run_dir)
    first, final = epochs[0], epochs[-1]
    assert final["train_loss"] < first["train_loss"] - 0.2, epochs
    assert final["top1"] > 35.0, final
    assert 15.0 < final["robust_top1"] < final["top1"], final
    assert "robust top-1" in proc.stderr and "checkpoints" in proc.stderr
    state = _load(run_dir / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "epoch", "arch", "config", "model_kwargs", "step", "rng"} <= set(state)
    assert state["arch"] == "convnext_micro_cvst" and state["epoch"] == 8 and state["step"] == 32
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # logging.keep_checkpoints 2
    assert kept == ["best.pt", "epoch_0007.pt", "epoch_0008.pt", "last.pt"], kept
    params = json.loads((run_dir / "params.json").read_text())
    assert params["logging"]["keep_checkpoints"] == 2 and params["run_record"] == {"world_size": 1, "global_batch": 32}


@pytest.mark.slow
def test_demo_as_shipped_learns(tmp_path, demo_root):
    """The quickstart's run: configs/demo.yaml as shipped, 10 epochs on the whole demo set (~3 min on 2 quiet cores,
    nightly-style: ``pytest -m slow``); clean accuracy on the held-out val set clearly above chance (10 %)."""
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "rat.train", "-C", "configs/demo.yaml", "--data.demo_root",
                           str(demo_root), "--logging.folder", str(run_dir), "--logging.progress", "0"],
                          capture_output=True, text=True, timeout=1200, env=subprocess_env(), cwd=REPO)
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
    """2 epochs in one go == 1 epoch, resume from its checkpoint, 1 more epoch (heavy aug, mixup, APGD, EMA). The
    resumed run is the straight one's folder as a run killed in epoch 2 leaves it (records of epoch 2 written, last.pt
    still epoch 1), so its TensorBoard scalars are also checked: every metrics.jsonl record, each step once."""
    extra = ["--training.epochs", "2", "--augment.heavy", "1", "--ema.enabled", "1", "--ema.decay", "0.9",
             "--training.label_smoothing", "0.1", "--validation.every", "1", "--logging.tensorboard", "1"]
    straight = tmp_path / "straight"
    proc = _train(straight, demo_root, *extra, "--logging.progress", "auto")
    # stderr is no terminal here (as a SLURM job's log file): no tqdm frames, one plain line per log_every (1) steps
    assert "\r" not in proc.stderr
    lines = re.findall(r"epoch (\d): (\d)/4 \(\d+%\) loss=\S+ lr=\S+ img_s=\d+ res=32 elapsed \S+, ETA", proc.stderr)
    assert lines == [(e, s) for e in "01" for s in "1234"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.copy(straight / "checkpoints" / "epoch_0001.pt", resumed / "checkpoints" / "last.pt")
    _train(resumed, demo_root, *extra, "--training.resume", "auto")
    _assert_tensorboard_holds_the_metrics(resumed)
    a, b = _load(straight / "checkpoints" / "last.pt"), _load(resumed / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 8
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert _epochs(straight)[-1]["top1"] == _epochs(resumed)[-1]["top1"]


def _assert_tensorboard_holds_the_metrics(run_dir: Path) -> None:
    """The TensorBoard event files, read back with tensorboard's EventAccumulator, hold every number of every
    metrics.jsonl record as ``<kind>/<key>`` at the record's step, each step once: where a resumed run wrote a step
    again, the value it wrote (the one metrics.jsonl has last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected, seen = {}, set()
    duplicated = False
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                point = (f"{record['kind']}/{key}", record["step"])
                duplicated |= point in seen
                seen.add(point)
                expected[point] = value
    assert duplicated  # the killed run's records after the checkpoint were written again by the resumed run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    got = [((tag, e.step), e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]
    assert len(got) == len(dict(got))  # no step twice
    assert dict(got).keys() == expected.keys()
    for point, value in got:
        assert value == pytest.approx(expected[point], rel=1e-6, abs=1e-6), point  # stored as float32


BF16_EMA = ["--training.precision", "bf16", "--ema.enabled", "1", "--ema.decay", "0.5"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, demo_root) -> Path:
    """One short run serving several checks: 2 epochs of 4 steps under bf16 autocast with a fast EMA (decay 0.5)."""
    run_dir = tmp_path_factory.mktemp("short") / "run"
    _train(run_dir, demo_root, "--training.epochs", "2", *BF16_EMA)
    return run_dir


def test_ema_is_updated_and_differs_from_the_model(short_run):
    first, last = _load(short_run / "checkpoints" / "epoch_0001.pt"), _load(short_run / "checkpoints" / "last.pt")
    floats = [k for k, v in last["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(last["model_ema"][k], last["model"][k]) for k in floats)
    assert any(not torch.equal(last["model_ema"][k], first["model_ema"][k]) for k in floats)
    assert "ema_top1" in _epochs(short_run)[-1]


def test_bf16_autocast_runs_on_cpu(short_run):
    state = _load(short_run / "checkpoints" / "last.pt")
    assert state["config"]["training"]["precision"] == "bf16"
    for key in ("model", "model_ema"):
        assert all(v.dtype != torch.bfloat16 for v in state[key].values())  # master weights stay fp32
        assert all(torch.isfinite(v).all() for v in state[key].values() if v.is_floating_point())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nonfinite_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, demo_root, short_run):
    run_dir = tmp_path / "nan"
    shutil.copytree(short_run, run_dir)
    good = _sha(run_dir / "checkpoints" / "last.pt")
    proc = _train(run_dir, demo_root, "--training.epochs", "3", *BF16_EMA, "--training.resume", "auto",
                  "--lr.lr", "1e30", check=False)
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "last good checkpoint" in proc.stderr
    assert _sha(run_dir / "checkpoints" / "last.pt") == good


# SIGTERM mid-epoch, then resume: test_faults.py sends it to run_train.sh, which forwards it to the worker.


def test_bad_config_exits_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epoch: 3\n")
    proc = subprocess.run([sys.executable, "-m", "rat.train", "-C", str(bad)], capture_output=True, text=True,
                          timeout=120, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("rat.train: error: unknown key 'training.epoch'")


# ---------------------------------------------------------------------------------------------------------------------
# The shipped configs (demo.yaml has its own run above). Configs that differ only in the size of the model (the arch,
# the epoch count and the run folder) train alike: each parses and builds its model on the meta device with a
# forward/backward pass at its training resolution, and for each model class in the family the recipe takes a real
# training step on CPU (one batch of 2 at 32 px, validation on a small val beton) with the smallest registered model of
# that class (models of one class differ only in size arguments: depths, widths, heads).

SIZE_ONLY = {"model.arch", "training.epochs", "logging.folder"}


def _settings(path: Path) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in yaml.safe_load(path.read_text()).items()
            for key, value in values.items()}


def _families() -> list[list[Path]]:
    families: dict[tuple, list[Path]] = {}
    for path in CONFIGS:
        if path.name != "demo.yaml":
            key = tuple(sorted((k, str(v)) for k, v in _settings(path).items() if k not in SIZE_ONLY))
            families.setdefault(key, []).append(path)
    return list(families.values())


@functools.lru_cache
def _model_sizes() -> dict[str, tuple[str, int]]:
    """Each registered timm model that rat's tests build: its class name and parameter count (built once, on meta)."""
    sizes = {}
    for name in [*timm.list_models("*_cvst"), "resnet10t", "resnet18", "resnet50", "wide_resnet50_2"]:
        with torch.device("meta"):
            net = timm.create_model(name)
        sizes[name] = (type(net).__name__, sum(p.numel() for p in net.parameters()))
    return sizes


def _smallest_of_class(kind: str) -> str:
    """The registered timm model with the fewest parameters among those of class ``kind`` that rat's tests build."""
    of_kind = {name: count for name, (cls, count) in _model_sizes().items() if cls == kind}
    return min(of_kind, key=of_kind.get)


@pytest.fixture(scope="module")
def small_val(tmp_path_factory) -> Path:
    """20 demo val images as a beton (the demo's classes), so that validating a 28M-parameter model stays cheap."""
    from rat.data import write_arrays_beton
    from rat.data.demo import DEMO_CLASSES, load_demo_arrays

    images, labels = load_demo_arrays("val")
    path = tmp_path_factory.mktemp("small_val") / "val.beton"
    return write_arrays_beton(images[:20], labels[:20], path, classes=list(DEMO_CLASSES), num_workers=1)


@pytest.mark.parametrize("family", _families(), ids=lambda family: "+".join(p.stem for p in family))
def test_shipped_configs_train(tmp_path, demo_betons, small_val, family):
    from rat.models import create_model
    from rat.train.spec import make_train_config

    smallest: dict[str, tuple[str, Path]] = {}  # model class -> (its smallest registered model, a config)
    for path in family:
        config = make_train_config(["-C", str(path)])
        arch, res = config["model.arch"], config["resolution.max_res"]
        with torch.device("meta"):
            model = create_model(arch, num_classes=10, img_size=res)
            out = model(torch.rand(2, 3, res, res))
            out.sum().backward()
        assert out.shape == (2, 10) and all(p.grad is not None for p in model.parameters()), path.name
        kind = type(model).__name__
        smallest.setdefault(kind, (_smallest_of_class(kind), path))
    for arch, path in smallest.values():
        run_dir = tmp_path / path.stem
        proc = train_in_process(["-C", str(path), "--model.arch", arch, "--data.train_dataset", str(demo_betons[0]),
                      "--data.val_dataset", str(small_val), "--logging.folder", str(run_dir),
                      "--training.batch_size", "2", "--training.limit_batches", "1", "--training.epochs", "1",
                      "--resolution.min_res", "32", "--resolution.max_res", "32", "--validation.resolution", "32",
                      "--validation.robust_n_ex", "0", "--training.precision", "fp32", "--data.num_workers", "1",
                      "--logging.progress", "0", "--data.num_classes", "10"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _load(run_dir / "checkpoints" / "last.pt")["step"] == 1, path.name
