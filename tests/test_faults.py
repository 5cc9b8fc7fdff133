"""Fault injection: bad inputs to every entry point, kills during checkpoint writes, full disks, two runners at once.

Every bad input must end in exit status 2 (1 for a failure during a run), exactly one line on stderr besides progress
logging (no traceback), and no file created or changed. The tables below call each CLI's ``main(argv)`` in-process
(cheap: most cases never reach training); only what needs a real process boundary (kill -9, signals, two runners,
run_train.sh) starts subprocesses.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from process_support import load_tool, signal_group_after_first_metrics, subprocess_env, train_in_process

from rat.config import config_to_dict
from rat.io import FileLock, atomic_write, pid_alive
from rat.models import create_model, load_checkpoint_file
from rat.train.spec import make_train_config

REPO = Path(__file__).resolve().parents[1]
ARCH = "convnext_micro_cvst"
pytestmark = pytest.mark.ffcv


def _env() -> dict[str, str]:
    return subprocess_env(CUDA_VISIBLE_DEVICES="")


# ---------------------------------------------------------------------------------------------------------------------
# The bad files every table draws from (written once per module).

class _Exec:
    def __reduce__(self):
        return exec, ("open('/tmp/rat-pwned', 'w')",)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, demo_betons) -> dict[str, Path]:
    from ffcv.fields import FloatField, IntField
    from ffcv.writer import DatasetWriter

    root = tmp_path_factory.mktemp("bad")
    val = demo_betons[1]
    files = {"val": val, "demo_root": val.parent, "root": root}
    (root / "text.pt").write_text("model: convnext\nweights: none\n")
    (root / "random.pt").write_bytes(os.urandom(4096))
    (root / "empty.pt").write_bytes(b"")
    with open(root / "evil.pt", "wb") as handle:
        pickle.dump({"model": {}, "x": _Exec()}, handle, protocol=2)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "no_classes").mkdir()
    classes = Path(str(val) + ".classes.json")
    data = val.read_bytes()
    for name, content in (("empty", b""), ("truncated", data[: len(data) // 2]), ("header", data[:100])):
        (root / f"{name}.beton").write_bytes(content)
        shutil.copy(classes, root / f"{name}.beton.classes.json")

    class _Pairs:
        def __len__(self) -> int:
            return 300

        def __getitem__(self, i: int) -> tuple[int, float]:
            return i, float(i)

    DatasetWriter(str(root / "fields.beton"), {"a": IntField(), "b": FloatField()}, num_workers=1) \
        .from_indexed_dataset(_Pairs())
    shutil.copy(classes, root / "fields.beton.classes.json")
    shutil.copy(val, root / "mismatch.beton")
    info = json.loads(classes.read_text())
    (root / "mismatch.beton.classes.json").write_text(json.dumps({**info, "num_samples": 5}))
    # A rat trainer checkpoint (random weights) whose recorded config is that of _train_argv's run.
    run = root / "run"
    config = config_to_dict(make_train_config(_train_argv(run, val.parent)))
    model = create_model(ARCH, num_classes=10, img_size=32)
    state = {"model": model.state_dict(), "model_ema": None, "arch": ARCH,
             "model_kwargs": {"num_classes": 10, "normalize": True, "img_size": 32}, "config": config, "epoch": 1,
             "step": 4, "batches_done": 0}
    (run / "checkpoints").mkdir(parents=True)
    torch.save(state, run / "checkpoints" / "last.pt")
    # what the run recorded (resume ''), which the README's `-C RUN/params.json` replays
    (run / "params.json").write_text(json.dumps({**config, "training": {**config["training"], "resume": ""}}))
    files["run"] = run
    files["ckpt"] = run / "checkpoints" / "last.pt"
    shutil.copy(files["ckpt"], root / "moved.pt")  # the same run's checkpoint, outside its folder
    torch.save({"images": torch.zeros(24, 3, 32, 32, dtype=torch.uint8), "labels": torch.arange(24) % 12,
                "meta": {"arch": ARCH, "resolution": 32}}, root / "generated12.pt")  # a 12-class model's set
    # the same checkpoint recording class names the data does not have (the demo's in reverse order), and a 12-class one
    torch.save({**state, "classes": [str(c) for c in range(9, -1, -1)]}, root / "named.pt")
    torch.save({**state, "model": create_model(ARCH, num_classes=12, img_size=32).state_dict(),
                "model_kwargs": {**state["model_kwargs"], "num_classes": 12}}, root / "classes12.pt")
    # the val beton with its classes listed in another order, and with 12 classes
    for name, names in (("reordered", info["classes"][::-1]), ("twelve", [*info["classes"], "x", "y"])):
        shutil.copy(val, root / f"{name}.beton")
        (root / f"{name}.beton.classes.json").write_text(json.dumps({**info, "classes": names}))
    shutil.copy(val, root / "twice.beton")  # a classes file edited by hand: a second "classes" list
    (root / "twice.beton.classes.json").write_text(json.dumps(info)[:-1] + f', "classes": {json.dumps(names)}}}')
    (root / "not_a_folder").write_text("a file")
    (root / "other.json").write_text(json.dumps({"hello": "world"}))
    for name in ("looped", "twice"):  # image folders: a/x.png, b/y.png; then a link back up, or a second path to x
        for cls, image in (("a", "x.png"), ("b", "y.png")):
            (root / name / cls).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(root / name / cls / image)
    (root / "looped" / "a" / "up").symlink_to("..")
    (root / "twice" / "b" / "same.png").symlink_to(root / "twice" / "a" / "x.png")
    return files


def _train_argv(run: Path, demo_root: Path) -> list[str]:
    return ["--logging.folder", str(run), "--data.demo_root", str(demo_root), "--resolution.min_res", "32",
            "--resolution.max_res", "32", "--training.epochs", "2", "--training.precision", "fp32",
            "--training.resume", "auto", "--logging.progress", "0"]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _error_lines(stderr: str) -> list[str]:
    """stderr lines that are not progress logging (INFO)."""
    return [line for line in stderr.splitlines() if line.strip() and " INFO " not in line]


def _call(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def _assert_one_clear_line(code: int, stderr: str, expected: str, before: dict, after: dict) -> None:
    lines = _error_lines(stderr)
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert re.search(expected, lines[0]), lines[0]
    assert after == before, "a bad input changed or created files"


def _result(**overrides) -> dict:
    """A complete, valid rat.eval result (for the export and overwrite cases)."""
    result = {"format": "rat.eval/1", "model": "m", "arch": ARCH, "norm": "Linf", "eps": 4 / 255, "resolution": 32,
              "version": "standard", "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "n_ex": 5000,
              "clean_accuracy": 0.5, "robust_accuracy": 0.25, "shard": None, "seed": 5, "normalize": False,
              "robust_accuracy_after": {"apgd-ce": 0.3, "apgd-t": 0.25, "fab-t": 0.25, "square": 0.25},
              "per_example": {"indices": [1, 2], "clean": "10", "apgd-ce": "00", "apgd-t": "00", "fab-t": "00",
                              "square": "00"}}
    result.update(overrides)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# python -m rat.train

TRAIN_CASES = [
    ("unknown-yaml-key", lambda b: ["-C", _yaml(b, {"training": {"epoch": 3}})], r"unknown key 'training\.epoch'"),
    ("binary-config", lambda b: ["-C", str(b["root"] / "binary.yaml")], r"not a text file"),
    ("missing-config", lambda b: ["-C", str(b["root"] / "nope.yaml")], r"does not exist"),
    ("unknown-flag", lambda b: ["--training.epoch", "3"], r"unrecognized arguments"),
    ("fractional-epochs", lambda b: ["--training.epochs", "1.5"], r"training\.epochs='1\.5' is not an int"),
    ("flag-true", lambda b: ["--ema.enabled", "true"], r"ema\.enabled='true' is not 0 or 1"),
    ("negative-eps", lambda b: ["--adv.eps", "-0.1"], r"adv\.eps='-0\.1' is not comma-separated numbers > 0"),
    ("one-eps-for-two-norms", lambda b: ["--adv.norm", "Linf,L1", "--adv.eps", "0.0157"],
     r"adv\.eps gives one radius for the norms Linf,L1.*give one per norm"),
    ("no-decoding-thread", lambda b: ["--data.num_workers", "0"], r"data\.num_workers='0'"),
    ("sync-bn-on-cpu", lambda b: ["--model.sync_bn", "1", "--training.device", "cpu"],
     r"model\.sync_bn 1 needs CUDA devices .*use --model\.sync_bn 0"),
    ("zero-n-iter", lambda b: ["--adv.n_iter", "0"], r"adv\.n_iter='0' is not comma-separated ints >= 1"),
    ("unknown-arch", lambda b: ["--model.arch", "convnext_micro_cvs"], r"closest registered: convnext_micro_cvst"),
    ("resolution-16", lambda b: ["--resolution.min_res", "16", "--resolution.max_res", "16"],
     r"resolution\.min_res=16: resolution 16 is too small for convnext_micro_cvst.*use at least 32"),
    ("val-resolution-16", lambda b: ["--validation.resolution", "16"], r"validation\.resolution=16"),
    ("only-train-beton", lambda b: ["--data.train_dataset", str(b["val"])], r"give both"),
    ("missing-beton", lambda b: _betons(b["root"] / "nope.beton", b["val"]), r"does not exist.*write_ffcv"),
    ("empty-beton", lambda b: _betons(b["root"] / "empty.beton", b["val"]), r"empty\.beton is empty, truncated"),
    ("truncated-beton", lambda b: _betons(b["val"], b["root"] / "truncated.beton"), r"truncated\.beton.*write_ffcv"),
    ("header-only-beton", lambda b: _betons(b["val"], b["root"] / "header.beton"), r"header\.beton.*write_ffcv"),
    ("foreign-fields-beton", lambda b: _betons(b["root"] / "fields.beton", b["val"]), r"holds the fields a, b"),
    ("train-not-a-beton", lambda b: _betons(b["root"] / "binary.yaml", b["val"]),
     r"classes file .*binary\.yaml\.classes\.json is missing"),
    ("classes-disagree", lambda b: _betons(b["root"] / "mismatch.beton", b["val"]), r"describes 5 samples.*300"),
    ("run-folder-under-file", lambda b: ["--logging.folder", str(b["root"] / "not_a_folder" / "run")],
     r"run folder.*is not writable"),
    ("resume-text-file", lambda b: ["--training.resume", str(b["root"] / "text.pt")], r"cannot read checkpoint"),
    ("resume-random-bytes", lambda b: ["--training.resume", str(b["root"] / "random.pt")], r"random\.pt"),
    ("resume-empty-file", lambda b: ["--training.resume", str(b["root"] / "empty.pt")], r"cannot read checkpoint"),
    ("resume-malicious-pickle", lambda b: ["--training.resume", str(b["root"] / "evil.pt")], r"refusing to load"),
    ("resume-missing", lambda b: ["--training.resume", str(b["root"] / "nope.pt")], r"no such checkpoint"),
    ("resume-other-optimizer", lambda b: _train_argv(b["run"], b["demo_root"]) + ["--training.optimizer", "sgd"],
     r"cannot resume .*training\.optimizer: 'adamw' -> 'sgd'"),
    ("resume-other-classes", lambda b: _train_argv(b["run"], b["demo_root"]) + ["--data.num_classes", "7"],
     r"the demo dataset has 10 classes but data\.num_classes has 7"),
    ("resume-other-arch", lambda b: _train_argv(b["run"], b["demo_root"]) + ["--model.arch", "resnet18"],
     r"model\.arch: 'convnext_micro_cvst' -> 'resnet18'"),
    # issue 21, family 1: a run folder is never overwritten
    ("used-folder-without-resume", lambda b: _train_argv(b["run"], b["demo_root"])[:-4] + ["--logging.progress", "0"],
     r"run folder .*run already holds a run \(last\.pt, params\.json\): continue it with --training\.resume auto, "
     r"or start a new run in another --logging\.folder"),
    ("used-folder-resume-another-folders-checkpoint", lambda b: _train_argv(b["run"], b["demo_root"]) + [
        "--training.resume", str(b["root"] / "moved.pt")],
     r"already holds a run .* and training\.resume=.*moved\.pt is a checkpoint of another folder: continuing it "
     r"here would mix two runs"),
    ("replay-params-json", lambda b: ["-C", str(b["run"] / "params.json"), "--logging.folder", str(b["run"])],
     r"already holds a run"),
    ("empty-logging-folder", lambda b: ["--logging.folder", ""], r"logging\.folder is empty"),
    ("blank-logging-folder", lambda b: ["--logging.folder", "  "], r"logging\.folder is empty"),
    # family 2: a key given twice in a config file
    ("duplicate-section", lambda b: ["-C", _text(b, "adv:\n  attack: apgd\ntraining:\n  epochs: 1\nadv:\n  attack: "
                                                    "none\n")],
     r"config file .*\.yaml: key 'adv' is given twice \(lines 1 and 5\).*keep one"),
    ("duplicate-key-inline", lambda b: ["-C", _text(b, "training: {epochs: 1, epochs: 50}\n")],
     r"key 'epochs' is given twice"),
    ("duplicate-key-nested", lambda b: ["-C", _text(b, "adv:\n  attack: apgd\n  eps: 0.01\n  attack: none\n")],
     r"key 'attack' is given twice \(lines 2 and 4\)"),
    ("nested-and-dotted-key", lambda b: ["-C", _text(b, "training:\n  epochs: 1\ntraining.epochs: 50\n")],
     r"gives 'training\.epochs' 2 times"),
    ("duplicate-key-json", lambda b: ["-C", _text(b, '{"training": {"epochs": 1}, "training": {"epochs": 5}}')],
     r"key 'training' is given twice"),
    # family 3: legal types, insane values
    ("linf-eps-in-255-units", lambda b: ["--adv.eps", "4"],
     r"adv\.eps: Linf eps 4 covers the whole image box at 224 px.*4/255 = 0\.0157, not 4"),
    ("l2-eps-in-255-units", lambda b: ["--adv.norm", "L2", "--adv.eps", "510"], r"L2 eps 510 covers the whole image"),
    ("l1-eps-in-255-units", lambda b: ["--adv.norm", "L1", "--adv.eps", "200000"], r"L1 eps 200000 covers"),
    ("linf-eps-one-of-two-norms", lambda b: ["--adv.norm", "L1,Linf", "--adv.eps", "75,8"], r"Linf eps 8 covers"),
    ("eps-inf", lambda b: ["--adv.eps", "inf"], r"adv\.eps='inf' is not comma-separated numbers > 0"),
    ("ema-decay-1", lambda b: ["--ema.enabled", "1", "--ema.decay", "1"],
     r"ema\.decay='1' is not a finite float in \[0, 1\)"),
    ("lr-inf", lambda b: ["--lr.lr", "inf"], r"lr\.lr='inf' is not a finite float > 0"),
    ("mixup-nan", lambda b: ["--augment.mixup", "nan"], r"augment\.mixup='nan' is not a finite float >= 0"),
    ("grad-clip-inf", lambda b: ["--training.grad_clip", "inf"], r"training\.grad_clip='inf'"),
    ("warmup-nan", lambda b: ["--lr.warmup_epochs", "nan"], r"lr\.warmup_epochs='nan'"),
    # family 4: class lists
    ("val-classes-reordered", lambda b: _betons(b["val"], b["root"] / "reordered.beton"),
     r"train data .* and val data .*reordered\.beton\.classes\.json\) list different classes \(label 0 is '0' in "
     r"one and '9' in the other\).*--cfg\.classes_from"),
    ("val-more-classes", lambda b: _betons(b["val"], b["root"] / "twelve.beton"), r"has 10 classes but val data .* 12"),
    ("num-classes-smaller", lambda b: ["--data.num_classes", "7"],
     r"the demo dataset has 10 classes but data\.num_classes has 7: leave data\.num_classes at 0"),
    ("num-classes-larger", lambda b: ["--data.num_classes", "12"], r"data\.num_classes has 12"),
    ("resume-other-class-names", lambda b: _train_argv(b["root"] / "fresh", b["demo_root"]) + [
        "--training.resume", str(b["root"] / "named.pt")],
     r"cannot resume: checkpoint .*named\.pt and the demo dataset list different classes"),
    # family 8: what run_train.sh's preflight (--validate-only) checks before torchrun
    ("init-checkpoint-other-arch", lambda b: ["--validate-only", "--model.arch", "resnet10t", "--model.init_checkpoint",
                                              str(b["ckpt"])],
     r"model\.init_checkpoint .*last\.pt: .*holds a 'convnext_micro_cvst' model, not 'resnet10t'"),
    ("init-checkpoint-other-classes", lambda b: ["--validate-only", "--model.init_checkpoint",
                                                 str(b["root"] / "classes12.pt")],
     r"model\.init_checkpoint .*classes12\.pt: .*shape mismatches: head\.fc"),
    ("init-checkpoint-other-class-names", lambda b: ["--validate-only", "--model.init_checkpoint",
                                                     str(b["root"] / "named.pt")],
     r"model\.init_checkpoint .*named\.pt: .*list different classes"),
    ("init-checkpoint-text", lambda b: ["--validate-only", "--model.init_checkpoint", str(b["root"] / "text.pt")],
     r"model\.init_checkpoint .*text\.pt: cannot read checkpoint"),
    ("init-checkpoint-missing", lambda b: ["--validate-only", "--model.init_checkpoint", str(b["root"] / "nope.pt")],
     r"model\.init_checkpoint .*nope\.pt"),
]


def _yaml(b: dict, content: dict) -> str:
    path = b["root"] / f"cfg_{hashlib.sha256(repr(content).encode()).hexdigest()[:8]}.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def _text(b: dict, content: str) -> str:
    """A config file of exactly this text (for what yaml.safe_dump cannot write: a key given twice)."""
    path = b["root"] / f"raw_{hashlib.sha256(content.encode()).hexdigest()[:8]}.yaml"
    path.write_text(content)
    return str(path)


def _betons(train: Path, val: Path) -> list[str]:
    return ["--data.train_dataset", str(train), "--data.val_dataset", str(val)]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input_is_one_line(case, bad, capsys, tmp_path):
    from rat.train.__main__ import main

    _, make_argv, expected = case
    argv = make_argv(bad)
    if "--logging.folder" not in argv:
        argv = ["--logging.folder", str(tmp_path / "run"), "--data.demo_root", str(bad["demo_root"]), *argv]
    before = _snapshot(bad["root"]) | _snapshot(tmp_path)
    code, stderr = _call(main, argv, capsys)
    _assert_one_clear_line(code, stderr, expected, before, _snapshot(bad["root"]) | _snapshot(tmp_path))
    assert not Path("/tmp/rat-pwned").exists()


def test_a_batch_larger_than_the_data_is_one_line(bad, capsys, tmp_path):
    """Found only once the data is known (each process reads its share): one line, exit 2, no checkpoint."""
    from rat.train.__main__ import main

    run = tmp_path / "run"
    code, stderr = _call(main, ["--logging.folder", str(run), "--data.demo_root", str(bad["demo_root"]),
                                "--training.batch_size", "5000"], capsys)
    lines = _error_lines(stderr)
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "training.batch_size=5000 exceeds the 4491 images each of the 1 process(es) reads" in lines[0]
    assert not list(run.rglob("*.pt"))


def test_more_micro_batches_than_the_data_holds_is_one_line(bad, capsys, tmp_path):
    """training.grad_accum larger than the batches each process reads per epoch: not one optimizer step would be
    taken; one line, exit 2, no checkpoint."""
    from rat.train.__main__ import main

    run = tmp_path / "run"
    code, stderr = _call(main, ["--logging.folder", str(run), "--data.demo_root", str(bad["demo_root"]),
                                "--training.batch_size", "2000", "--training.grad_accum", "3"], capsys)
    lines = _error_lines(stderr)
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "training.grad_accum=3 exceeds the 2 batches of 2000 each of the 1 process(es) reads per epoch" in lines[0]
    assert not list(run.rglob("*.pt"))


def test_resuming_a_finished_run_says_so(bad, capsys):
    from rat.train.__main__ import main

    argv = _train_argv(bad["run"], bad["demo_root"])
    argv[argv.index("--training.epochs") + 1] = "1"  # the checkpoint is at epoch 1
    before = _snapshot(bad["run"])
    code, stderr = _call(main, argv, capsys)
    assert code == 0 and "has already finished" in stderr and "raise --training.epochs" in stderr, stderr
    assert _snapshot(bad["run"]) == before


def test_corrupt_last_checkpoint_falls_back_to_the_newest_readable_epoch(tmp_path, caplog):
    from rat.train.checkpoint import load_resume_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (1, 2):
        torch.save({"epoch": epoch}, folder / f"epoch_{epoch:04d}.pt")
    (folder / "last.pt").write_bytes(b"\0" * 100)  # a copy cut short
    path, state = load_resume_checkpoint("auto", tmp_path)
    assert path == folder / "epoch_0002.pt" and state["epoch"] == 2
    assert "last.pt is unreadable" in caplog.text and "epoch_0002.pt" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# python -m rat.eval

EVAL_CASES = [
    ("no-checkpoint-no-arch", lambda b, o: ["--data", str(b["val"])], r"pass --checkpoint PATH"),
    ("unknown-arch", lambda b, o: _ev(b, o, "--arch", "convnext_micro_cvs"),
     r"closest registered: convnext_micro_cvst"),
    ("resolution-16", lambda b, o: _ev(b, o, "--checkpoint", str(b["ckpt"]), "--resolution", "16"),
     r"resolution 16 is too small.*use at least 32"),
    ("text-checkpoint", lambda b, o: _ev(b, o, "--checkpoint", str(b["root"] / "text.pt")), r"not a torch checkpoint"),
    ("random-checkpoint", lambda b, o: _ev(b, o, "--checkpoint", str(b["root"] / "random.pt")), r"random\.pt"),
    ("empty-checkpoint", lambda b, o: _ev(b, o, "--checkpoint", str(b["root"] / "empty.pt")), r"the file is empty"),
    ("malicious-checkpoint", lambda b, o: _ev(b, o, "--checkpoint", str(b["root"] / "evil.pt")), r"refusing to load"),
    ("missing-checkpoint", lambda b, o: _ev(b, o, "--checkpoint", str(b["root"] / "nope.pt")), r"does not exist"),
    ("arch-contradicts-checkpoint", lambda b, o: _ev(b, o, "--checkpoint", str(b["ckpt"]), "--arch", "resnet18"),
     r"holds a convnext_micro_cvst but --arch resnet18"),
    ("ema-without-ema", lambda b, o: _ev(b, o, "--checkpoint", str(b["ckpt"]), "--use-ema"), r"no EMA weights"),
    ("threads-negative", lambda b, o: _ev(b, o, "--arch", ARCH, "--threads", "-1"), r"--threads: -1 must be at least"),
    ("device-tpu7", lambda b, o: _ev(b, o, "--arch", ARCH, "--device", "tpu7"), r"'tpu7' is not a torch device"),
    ("device-missing-gpu", lambda b, o: _ev(b, o, "--arch", ARCH, "--device", "cuda:63"), r"CUDA device\(s\) visible"),
    ("output-is-folder", lambda b, o: _ev(b, b["root"], "--arch", ARCH), r"is a folder"),
    ("output-under-file", lambda b, o: _ev(b, b["root"] / "not_a_folder" / "r.json", "--arch", ARCH),
     r"not writable"),
    ("output-other-json", lambda b, o: _ev(b, b["root"] / "other.json", "--arch", ARCH),
     r"other\.json is not a rat\.eval/1 result; refusing to overwrite"),
    ("output-other-evaluation", lambda b, o: _ev(b, o.parent.parent / "prev.json", "--checkpoint", str(b["ckpt"])),
     r"holds the result of a different evaluation \(differs in .*seed"),
    ("eps-negative", lambda b, o: _ev(b, o, "--arch", ARCH, "--eps", "-0.1"), r"eps must be a positive number"),
    ("eps-text", lambda b, o: _ev(b, o, "--arch", ARCH, "--eps", "four"), r"cannot read eps 'four'"),
    ("n-iter-zero", lambda b, o: _ev(b, o, "--arch", ARCH, "--n-iter", "0"), r"--n-iter: 0 must be at least 1"),
    ("norm-l3", lambda b, o: _ev(b, o, "--arch", ARCH, "--norm", "L3"), r"invalid choice: 'L3'"),
    ("shard-out-of-range", lambda b, o: _ev(b, o, "--arch", ARCH, "--shard", "3/2"), r"INDEX must be in"),
    ("model-kwargs-not-json", lambda b, o: _ev(b, o, "--arch", ARCH, "--model-kwargs", "num_classes=10"),
     r"--model-kwargs takes a JSON object"),
    ("batch-size-zero", lambda b, o: _ev(b, o, "--arch", ARCH, "--batch-size", "0"), r"must be at least 1"),
    ("n-ex-too-many", lambda b, o: _ev(b, o, "--arch", ARCH, "--n-ex", "301"), r"n_ex=301 does not fit.*300"),
    ("custom-without-attacks", lambda b, o: _ev(b, o, "--arch", ARCH, "--version", "custom"), r"needs --attacks"),
    ("missing-data", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "nope.beton")),
     r"does not exist"),
    ("empty-beton", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "empty.beton")),
     r"empty\.beton is empty, truncated.*write_ffcv"),
    ("truncated-beton", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "truncated.beton")),
     r"truncated\.beton.*write_ffcv"),
    ("foreign-fields-beton", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "fields.beton")),
     r"holds the fields a, b"),
    ("data-not-a-beton", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "binary.yaml")),
     r"binary\.yaml is empty, truncated or not a beton.*write_ffcv"),
    ("model-kwargs-unknown", lambda b, o: _ev(b, o, "--arch", ARCH, "--model-kwargs", '{"bogus": 1}'),
     r"model 'convnext_micro_cvst' takes no argument 'bogus'"),
    ("checkpoint-is-a-folder", lambda b, o: _ev(b, o, "--checkpoint", str(b["root"])),
     r"is a folder, not a checkpoint file"),
    ("data-folder-without-classes", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "no_classes")),
     r"no_classes has no class sub-directories.*one subfolder of images per class"),
    ("data-folder-symlink-loop", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "looped")),
     r"looped/a/up leads back into .*looped .* through a symbolic link.*remove the link"),
    ("data-folder-one-file-twice", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "twice")),
     r"twice/b/same\.png and .*twice/a/x\.png are the same file"),
    # issue 21: a radius in 0-255 units, and a checkpoint on data with other classes
    ("linf-eps-in-255-units", lambda b, o: _ev(b, o, "--arch", ARCH, "--eps", "4"),
     r"Linf eps 4 covers the whole image box at 32 px.*4/255 = 0\.0157, not 4"),
    ("l2-eps-in-255-units", lambda b, o: _ev(b, o, "--arch", ARCH, "--norm", "L2", "--eps", "510"),
     r"L2 eps 510 covers the whole image box at 32 px"),
    ("checkpoint-on-more-classes", lambda b, o: _ev(b, o, "--checkpoint", str(b["ckpt"]), "--data",
                                                    str(b["root"] / "twelve.beton")),
     r"checkpoint .*last\.pt has 10 classes but data .*twelve\.beton has 12"),
    ("checkpoint-fewer-classes-than-data", lambda b, o: _ev(b, o, "--checkpoint", str(b["root"] / "classes12.pt"),
                                                            "--data", str(b["val"])),
     r"classes12\.pt has 12 classes but data .* has 10"),
    ("classes-file-duplicate-key", lambda b, o: _ev(b, o, "--arch", ARCH, "--data", str(b["root"] / "twice.beton")),
     r"classes file .*twice\.beton\.classes\.json is unreadable \(key 'classes' is given twice in one object"),
    ("checkpoint-other-class-names", lambda b, o: _ev(b, o, "--checkpoint", str(b["root"] / "named.pt")),
     r"checkpoint .*named\.pt and data .* list different classes \(label 0 is '9' in one and '0'"),
]


def _ev(b: dict, output: Path, *extra: str) -> list[str]:
    argv = ["--data", str(b["val"]), "--resolution", "32", "--n-ex", "2", "--batch-size", "2", "--num-workers", "1",
            "--output", str(output), *extra]
    data = [i for i, a in enumerate(argv) if a == "--data"]
    if len(data) > 1:  # the case's --data replaces the default one
        del argv[data[0]:data[0] + 2]
    return argv


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_input_is_one_line(case, bad, capsys, tmp_path):
    from rat.eval.cli import main

    _, make_argv, expected = case
    output = tmp_path / "out" / "result.json"
    (tmp_path / "prev.json").write_text(json.dumps(_result()))
    argv = make_argv(bad, output)
    before = _snapshot(bad["root"]) | _snapshot(tmp_path)
    code, stderr = _call(main, argv, capsys)
    _assert_one_clear_line(code, stderr, expected, before, _snapshot(bad["root"]) | _snapshot(tmp_path))


def test_default_result_name_keeps_apart_what_defines_the_evaluation(bad, tmp_path):
    """Evaluating epoch_0002.pt must not replace last.pt's result in the same folder (nor EMA, seed, precision...)."""
    from rat.eval.cli import build_parser
    from rat.eval.evaluate import resolve
    from rat.eval.spec import spec_from_args

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(bad["ckpt"], folder / "last.pt")
    other = torch.load(bad["ckpt"], weights_only=True)
    other["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["model"].items()}
    torch.save(other, folder / "epoch_0002.pt")
    base = ["--data", str(bad["val"]), "--resolution", "32", "--n-ex", "2", "--batch-size", "2"]

    def output(*extra: str) -> Path:
        return resolve(spec_from_args(build_parser().parse_args([*base, *extra]))).spec.output

    names = {output("--checkpoint", str(folder / "last.pt")), output("--checkpoint", str(folder / "epoch_0002.pt")),
             output("--checkpoint", str(folder / "last.pt"), "--seed", "1"),
             output("--checkpoint", str(folder / "last.pt"), "--precision", "bf16"),
             output("--checkpoint", str(folder / "last.pt"), "--n-iter", "3"),
             output("--checkpoint", str(folder / "last.pt"), "--batch-size", "1")}
    assert len(names) == 6 and all(p.parent == folder for p in names)
    assert output("--checkpoint", str(folder / "last.pt")) == output("--checkpoint", str(folder / "last.pt"))


def test_a_warning_for_an_implausible_l2_radius(bad, capsys, tmp_path):
    """An L2 radius below the box's diameter but far above any usual one (30 at 32 px: a mean change of 138/255 per
    pixel value) trains, with a loud warning naming the 0-255 confusion."""
    from rat.train.__main__ import main

    code, stderr = _call(main, ["--validate-only", "--logging.folder", str(tmp_path / "run"), "--data.demo_root",
                                str(bad["demo_root"]), "--adv.norm", "L2", "--adv.eps", "30", "--resolution.min_res",
                                "32", "--resolution.max_res", "32"], capsys)
    assert code == 0, stderr
    assert re.search(r"adv\.eps: L2 eps 30 at 32 px allows a mean change of 138/255 .*0-255 units", stderr), stderr


def test_a_run_folder_in_use_is_refused_and_a_dead_holders_lock_is_not(bad, capsys, tmp_path):
    """Two trainings on one folder: the second is refused while the first (here: a process holding the run's lock)
    lives; once it is killed, its lock file no longer blocks."""
    from rat.train.__main__ import main
    from rat.train.preflight import RUN_LOCK

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from rat.io import FileLock
        assert FileLock({str(run / RUN_LOCK)!r}).try_acquire()
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "held"
    argv = ["--logging.folder", str(run), "--data.demo_root", str(bad["demo_root"])]
    try:
        for extra in (["--validate-only"], []):  # run_train.sh's check, then the run itself
            code, stderr = _call(main, [*extra, *argv], capsys)
            lines = _error_lines(stderr)
            assert code == 2 and len(lines) == 1, stderr
            assert re.search(rf"run folder .*run is in use by another training \(pid {holder.pid} on .*\): wait "
                             "for it", lines[0]), lines[0]
    finally:
        holder.kill()
        holder.wait()
    assert (run / RUN_LOCK).exists()
    code, stderr = _call(main, ["--validate-only", *argv], capsys)
    assert code == 0, stderr
    assert not (run / RUN_LOCK).exists()


def _train_small(run: Path, demo_root: Path, *extra: str):
    return train_in_process(["--logging.folder", str(run), "--data.demo_root", str(demo_root), "--resolution.min_res",
                             "32", "--resolution.max_res", "32", "--training.batch_size", "16", "--training.precision",
                             "fp32", "--validation.robust_n_ex", "0", "--validation.batch_size", "100",
                             "--logging.progress", "0", "--data.num_workers", "1", "--data.in_memory", "0", *extra])


def test_ctrl_c_on_python_m_rat_train_saves_and_says_how_to_resume(demo_betons, tmp_path):
    """SIGINT (Ctrl-C) to ``python -m rat.train`` (here: this process, which runs its ``main``) mid-epoch: the run saves
    and says how to resume in one line, like SIGTERM. The folder held an attempt that died before its first checkpoint:
    ``--training.resume auto`` starts afresh and moves that attempt's metrics aside instead of appending to them."""
    import threading

    run = tmp_path / "run"
    run.mkdir()
    stale = '{"kind": "step", "epoch": 0, "step": 1, "loss": 9.0}\n'
    (run / "metrics.jsonl").write_text(stale)

    def interrupt() -> None:
        deadline = time.time() + 120
        metrics = run / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.read_text() not in ("", stale)):
            time.sleep(0.05)  # the stale file is moved aside first
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt)
    thread.start()
    proc = _train_small(run, demo_betons[0].parent, "--training.epochs", "2", "--training.limit_batches", "100",
                        "--logging.log_every", "1", "--training.resume", "auto")
    thread.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"SIGINT: checkpoint saved at epoch 0, batch \d+.*; resume with --training.resume auto",
                     proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    state = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["batches_done"] > 0
    assert [p.read_text() for p in run.glob("metrics.*.jsonl")] == [stale]  # set aside, not appended to
    assert stale not in (run / "metrics.jsonl").read_text()


def test_a_full_disk_under_metrics_jsonl_stops_with_nothing_lost(demo_betons, tmp_path):
    """metrics.jsonl on a full disk (a link to /dev/full: every write fails with ENOSPC, as on a full disk): the epoch
    ends, its checkpoint is written, the run stops in one line (exit 1), and the resumed run writes the lost epoch
    record back from the checkpoint."""
    from rat.logging import read_metrics

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")
    argv = ["--training.epochs", "2", "--training.limit_batches", "2", "--logging.log_every", "100"]
    proc = _train_small(run, demo_betons[0].parent, *argv)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and re.search(r"could not append to .*metrics\.jsonl \(No space left on device\): "
                                         r"stopped at the end of epoch 1; .*last\.pt holds the run so far.*resume "
                                         r"with --training\.resume auto", lines[0]), lines[0]
    assert load_checkpoint_file(run / "checkpoints" / "last.pt")["epoch"] == 1
    (run / "metrics.jsonl").unlink()  # space freed
    proc = _train_small(run, demo_betons[0].parent, *argv, "--training.resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# runner_aa_eval.py

RUNNER_CASES = [
    ("use-ema-string", {"use_ema": "false"}, r"use_ema: 'false' must be true or false"),
    ("n-ex-word", {"n_ex": "sixteen"}, r"n_ex: 'sixteen' must be a whole number"),
    ("resolutions-word", {"resolutions": ["big"]}, r"resolutions: \['big'\] item 'big' must be a whole number"),
    ("resolution-tiny", {"resolutions": [4]}, r"item 4 must be >= 8"),
    ("shards-word", {"shards": "two"}, r"shards: 'two' must be a whole number"),
    ("shards-zero", {"shards": 0}, r"shards: 0 must be >= 1"),
    ("model-kwargs-string", {"model_kwargs": "num_classes=10"}, r"model_kwargs: 'num_classes=10' must be a mapping"),
    ("norm-l3", {"threats": ["L3"]}, r"norm must be one of Linf, L2, L1"),
    ("eps-word", {"threats": ["Linf:big"]}, r"cannot read eps 'big'"),
    ("threat-number", {"threats": [4]}, r"write NORM or NORM:EPS"),
    ("version-unknown", {"versions": ["slow"]}, r"versions: \['slow'\] item 'slow' must be one of"),
    ("attack-unknown", {"versions": ["custom"], "attacks": ["pgd"]}, r"item 'pgd' must be one of"),
    ("precision-fp8", {"precision": "fp8"}, r"precision: 'fp8' must be one of fp32, bf16, fp16"),
    ("batch-size-zero", {"batch_size": 0}, r"batch_size: 0 must be >= 1"),
    ("batch-size-bool", {"batch_size": True}, r"batch_size: True must be a whole number"),
    ("seed-negative", {"seed": -1}, r"seed: -1 must be >= 0"),
    ("n-iter-float", {"n_iter": 2.5}, r"n_iter: 2\.5 must be a whole number"),
    ("name-with-slash", {"name": "a/b"}, r"name: 'a/b' must be letters"),
    ("unknown-key", {"resolution": 224}, r"unknown key\(s\) resolution"),
    ("checkpoint-and-checkpoints", {"checkpoints": ["b.pt"]}, r"give checkpoint or checkpoints, not both"),
    ("eps-in-255-units", {"threats": ["Linf:4"], "resolutions": [224]},
     r"threat model Linf: Linf eps 4 covers the whole image box at 224 px"),
    ("l2-eps-too-large-for-the-resolution", {"threats": ["L2:100"], "resolutions": [224, 32]},
     r"L2 eps 100 covers the whole image box at 32 px"),
]
RUNNER_FILE_CASES = [
    ("defaults-list", "output_dir: OUT\ndefaults: [1, 2]\njobs: [{checkpoint: a.pt, data: v}]\n",
     r"defaults must be a mapping"),
    ("defaults-per-entry-key", "output_dir: OUT\ndefaults: {name: x}\njobs: [{checkpoint: a.pt, data: v}]\n",
     r"defaults: unknown or per-entry key\(s\) name"),
    ("no-jobs", "output_dir: OUT\njobs: []\n", r"needs a non-empty 'jobs:' list"),
    ("jobs-not-mapping", "output_dir: OUT\njobs: [a.pt]\n", r"jobs entry 1: expected a mapping"),
    ("no-output-dir", "jobs: [{checkpoint: a.pt, data: v}]\n", r"has no output_dir"),
    ("top-level-typo", "output_dir: OUT\njob: []\njobs: [{checkpoint: a.pt, data: v}]\n", r"unknown top-level"),
    ("not-yaml", "jobs: [unclosed\n", r"cannot read jobs file"),
    ("no-data", "output_dir: OUT\njobs: [{checkpoint: a.pt}]\n", r"needs data"),
    ("binary-file", None, r"cannot read jobs file"),
    ("output-dir-is-a-file",  # inputs that exist (the jobs file itself), so that the output folder is the problem
     "output_dir: OUT/jobs.yaml\njobs: [{checkpoint: OUT/jobs.yaml, data: OUT/jobs.yaml}]\n",
     r"output_dir .*jobs\.yaml is not writable"),
    ("inputs-missing", "output_dir: OUT\njobs: [{name: m, checkpoint: nope.pt, data: nope.beton}]\n",
     r"job 'm': checkpoint nope\.pt does not exist \(and 1 more missing input\(s\)\): fix the path in the jobs"),
    ("duplicate-key-in-job", "output_dir: OUT\njobs: [{checkpoint: a.pt, data: v, n_ex: 5, n_ex: 500}]\n",
     r"cannot read jobs file .*jobs\.yaml: key 'n_ex' is given twice"),
    ("duplicate-top-level-key", "output_dir: OUT\njobs: [{checkpoint: a.pt, data: v}]\noutput_dir: /tmp/other\n",
     r"key 'output_dir' is given twice \(lines 1 and 3\)"),
    ("duplicate-key-json-jobs-file", '{"output_dir": "OUT", "jobs": [{"checkpoint": "a.pt", "data": "v", "n_ex": 5, '
     '"n_ex": 50}]}\n', r"key 'n_ex' is given twice \(line 1, columns \d+ and \d+\)"),
    ("data-folder-symlink-loop", "output_dir: OUT\njobs: [{name: m, checkpoint: OUT/jobs.yaml, data: OUT/looped}]\n",
     r"job 'm': data .*looped: .*looped/a/up leads back into .* through a symbolic link"),
    ("duplicate-defaults-key",
     "output_dir: OUT\ndefaults:\n  n_ex: 5\n  n_ex: 50\njobs: [{checkpoint: a.pt, data: v}]\n",
     r"key 'n_ex' is given twice \(lines 3 and 4\)"),
]


@pytest.mark.parametrize("case", RUNNER_CASES + RUNNER_FILE_CASES, ids=[c[0] for c in RUNNER_CASES + RUNNER_FILE_CASES])
def test_runner_bad_jobs_file_is_one_line(case, capsys, tmp_path):
    from rat.eval.sweep.runner import main

    _, content, expected = case
    out = tmp_path / "aa"
    path = tmp_path / "jobs.yaml"
    if isinstance(content, dict):
        path.write_text(yaml.safe_dump({"output_dir": str(out), "jobs": [{"checkpoint": "a.pt", "data": "v",
                                                                           **content}]}))
    elif content is None:
        path.write_bytes(bytes(range(256)))
    else:
        path.write_text(content.replace("OUT/jobs.yaml", str(path)).replace("OUT/looped", str(tmp_path / "looped"))
                        .replace("OUT", str(out)))
    for cls in ("a", "b"):  # an image folder with a link back up
        (tmp_path / "looped" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "looped" / cls / "x.png")
    (tmp_path / "looped" / "a" / "up").symlink_to("..")
    before = _snapshot(tmp_path)
    code, stderr = _call(main, ["--jobs", str(path), "--cpu"], capsys)
    _assert_one_clear_line(code, stderr, expected, before, _snapshot(tmp_path))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# tools/write_ffcv.py, tools/export_robustbench.py, tools/plot_run.py

WRITE_CASES = [
    ("no-arguments", lambda b, t: [], r"--cfg\.data_dir and --cfg\.write_path required"),
    ("missing-input", lambda b, t: ["--cfg.data_dir", str(t / "nope"), "--cfg.write_path", str(t / "o.beton")],
     r"does not exist or is not a directory"),
    ("folder-without-classes", lambda b, t: ["--cfg.data_dir", str(t / "flat"), "--cfg.write_path",
                                             str(t / "o.beton")], r"has no class sub-directories"),
    ("output-folder-missing", lambda b, t: ["--cfg.data_dir", str(t / "classes"), "--cfg.write_path",
                                            str(t / "nope" / "o.beton")], r"nope"),
    ("jpeg-quality-0", lambda b, t: ["--cfg.data_dir", str(t / "classes"), "--cfg.write_path", str(t / "o.beton"),
                                     "--cfg.jpeg_quality", "0"], r"cfg\.jpeg_quality='0' is not an int"),
    ("cifar-without-split", lambda b, t: ["--cfg.dataset", "cifar10", "--cfg.data_dir", str(t / "flat"),
                                          "--cfg.write_path", str(t / "o.beton")], r"CIFAR needs --cfg\.split"),
    ("cifar-not-an-archive", lambda b, t: ["--cfg.dataset", "cifar10", "--cfg.split", "train", "--cfg.data_dir",
                                           str(b["root"] / "text.pt"), "--cfg.write_path", str(t / "o.beton")],
     r"text\.pt"),
    ("classes-from-empty-beton", lambda b, t: ["--cfg.data_dir", str(t / "classes"), "--cfg.write_path",
                                               str(t / "o.beton"), "--cfg.classes_from",
                                               str(b["root"] / "empty.beton")], r"empty\.beton is empty"),
    ("classes-from-missing", lambda b, t: ["--cfg.data_dir", str(t / "classes"), "--cfg.write_path",
                                           str(t / "o.beton"), "--cfg.classes_from", str(t / "nope.beton")],
     r"nope\.beton does not exist"),
    ("duplicate-key-config", lambda b, t: ["-C", _text(b, f"cfg:\n  data_dir: {t / 'classes'}\n  write_path: "
                                                          f"{t / 'o.beton'}\n  data_dir: {t / 'flat'}\n")],
     r"key 'data_dir' is given twice \(lines 2 and 4\)"),
    ("compress-probability-nan", lambda b, t: ["--cfg.data_dir", str(t / "classes"), "--cfg.write_path",
                                               str(t / "o.beton"), "--cfg.compress_probability", "nan"],
     r"cfg\.compress_probability='nan' is not a finite float"),
    ("symlink-loop", lambda b, t: ["--cfg.data_dir", str(t / "looped"), "--cfg.write_path", str(t / "o.beton")],
     r"looped/a/up leads back into .*looped .* through a symbolic link.*remove the link"),
    ("one-file-twice", lambda b, t: ["--cfg.data_dir", str(t / "twice"), "--cfg.write_path", str(t / "o.beton")],
     r"twice/b/same\.png and .*twice/a/x\.png are the same file"),
    ("write-path-is-a-checkpoint", lambda b, t: ["--cfg.data_dir", str(t / "clean"),
                                                 "--cfg.write_path", str(b["ckpt"])],
     r"output path .*last\.pt exists and is not a beton; refusing to replace it"),
]


@pytest.mark.parametrize("case", WRITE_CASES, ids=[c[0] for c in WRITE_CASES])
def test_write_ffcv_bad_input_is_one_line(case, bad, capsys, tmp_path):
    write_ffcv = load_tool("write_ffcv")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "test_faults.py", tmp_path / "classes" / "cat" / "not_an_image.JPEG")
    for name in ("looped", "twice", "clean"):  # a/x.png, b/y.png; then a link back up, or a second path to a/x.png
        for cls, image in (("a", "x.png"), ("b", "y.png")):
            (tmp_path / name / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / name / cls / image)
    (tmp_path / "looped" / "a" / "up").symlink_to("..")
    (tmp_path / "twice" / "b" / "same.png").symlink_to(tmp_path / "twice" / "a" / "x.png")
    _, make_argv, expected = case
    argv = make_argv(bad, tmp_path)
    before = _snapshot(bad["root"]) | _snapshot(tmp_path)
    code, stderr = _call(write_ffcv.main, argv, capsys)
    _assert_one_clear_line(code, stderr, expected, before, _snapshot(bad["root"]) | _snapshot(tmp_path))


def test_write_ffcv_scales_16_bit_images_to_8_bits(capsys, tmp_path):
    """A 16-bit greyscale PNG (Pillow's I;16) is stored as round(v * 255 / 65535), not clipped to 0 and 255 as
    ``convert('RGB')`` would."""
    from rat.data import read_beton_item

    write_ffcv = load_tool("write_ffcv")
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "data" / "a" / "ramp.png")
    with Image.open(tmp_path / "data" / "a" / "ramp.png") as img:
        assert img.mode == "I;16"
    code, stderr = _call(write_ffcv.main, ["--cfg.data_dir", str(tmp_path / "data"), "--cfg.write_path",
                                           str(tmp_path / "o.beton"), "--cfg.write_mode", "raw",
                                           "--cfg.num_workers", "1"], capsys)
    assert code == 0, stderr
    image, label = read_beton_item(tmp_path / "o.beton", 0)
    expected = np.floor(ramp.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert label == 0 and np.array_equal(image, np.repeat(expected[..., None], 3, axis=2))
    assert len(np.unique(image)) == 64


QUANT_CASES = [
    ("calib-data-yaml", lambda b, t: ["ptq", "--qmodel.checkpoint", str(b["ckpt"]), "--qdata.calib_data",
                                      str(REPO / "configs" / "demo.yaml"), "--ptq.format", "int8", "--ptq.output",
                                      str(t / "q.pt")],
     r"qdata\.calib_data=.*demo\.yaml is not a usable \.beton"),
    ("duplicate-key-config", lambda b, t: ["ptq", "-C", _text(b, "ptq:\n  format: int8\n  format: int4\n")],
     r"key 'format' is given twice \(lines 2 and 3\)"),
    ("eps-nan", lambda b, t: ["sweep", "--qattack.eps", "nan"], r"qattack\.eps='nan' is not a finite float"),
    ("lr-inf", lambda b, t: ["generate", "--generate.lr", "inf"], r"generate\.lr='inf' is not a finite float > 0"),
    # the families' one mechanisms reach rat.quant too: eps (check_eps), classes (check_classes), folders by real path
    ("sweep-eps-in-255-units", lambda b, t: ["sweep", "--qmodel.checkpoint", str(b["ckpt"]), "--qattack.eps", "4",
                                             "--sweep.formats", "int8", "--sweep.output", str(t / "s")],
     r"qattack\.eps: Linf eps 4 covers the whole image box at 32 px"),
    ("sweep-checkpoint-on-more-classes", lambda b, t: ["sweep", "--qmodel.checkpoint", str(b["ckpt"]),
                                                       "--qdata.data", str(b["root"] / "twelve.beton"),
                                                       "--sweep.formats", "int8", "--sweep.output", str(t / "s")],
     r"checkpoint .*last\.pt has 10 classes but data .*twelve\.beton has 12"),
    ("sweep-checkpoint-other-class-names", lambda b, t: ["sweep", "--qmodel.checkpoint", str(b["root"] / "named.pt"),
                                                         "--sweep.formats", "int8", "--sweep.output", str(t / "s")],
     r"checkpoint .*named\.pt and data .* list different classes"),
    ("sweep-output-under-a-file", lambda b, t: ["sweep", "--qmodel.checkpoint", str(b["ckpt"]), "--sweep.formats",
                                                "int8", "--sweep.output", str(b["root"] / "not_a_folder")],
     r"sweep\.output: .*not_a_folder is a file, not a folder"),
    ("estimate-set-of-another-models-classes", lambda b, t: [
        "estimate", "--qmodel.checkpoint", str(b["ckpt"]), "--estimate.generated", str(b["root"] / "generated12.pt"),
        "--estimate.formats", "int8", "--estimate.output", str(t / "e.json")],
     r"generated set .*generated12\.pt has 12 classes but checkpoint .*last\.pt has 10"),
    ("ptq-calib-folder-symlink-loop", lambda b, t: ["ptq", "--qmodel.checkpoint", str(b["ckpt"]), "--qdata.calib_data",
                                                    str(b["root"] / "looped"), "--ptq.format", "int8", "--ptq.output",
                                                    str(t / "q.pt")],
     r"qdata\.calib_data: .*looped/a/up leads back into .* through a symbolic link"),
]


@pytest.mark.parametrize("case", QUANT_CASES, ids=[c[0] for c in QUANT_CASES])
def test_quant_bad_input_is_one_line(case, bad, capsys, tmp_path):
    import torch.utils.cpp_extension  # noqa: F401  (its first import logs a CUDA warning, not rat.quant's output)

    from rat.quant.__main__ import main

    capsys.readouterr()
    _, make_argv, expected = case
    argv = make_argv(bad, tmp_path)
    before = _snapshot(bad["root"]) | _snapshot(tmp_path)
    code, stderr = _call(main, argv, capsys)
    _assert_one_clear_line(code, stderr, expected, before, _snapshot(bad["root"]) | _snapshot(tmp_path))


def _shard(index: int, **overrides) -> dict:
    """Shard ``index`` of 2 of one evaluation of 2 images (image ``index + 1``)."""
    flags = {k: "1" if k == "clean" else "0" for k in ("clean", "apgd-ce", "apgd-t", "fab-t", "square")}
    return _result(shard={"index": index, "count": 2}, n_ex=2, time_s=1.0, wall_s=1.0,
                   per_example={"indices": [index + 1], **flags}, **overrides)


MERGE_CASES = [  # --output is never a different result (nor one of the shards), as for rat.eval --output
    ("output-other-evaluation", ["--output", "PREV"], r"prev\.json holds the result of a different evaluation "
                                                       r"\(differs in .*seed.*refusing to replace it"),
    ("output-is-a-shard", ["--output", "S0"], r"s0\.json holds the result of a different evaluation \(differs in "
                                              r"shard\)"),
    ("output-not-a-result", ["--output", "OTHER"], r"other\.json is not a rat\.eval/1 result; refusing to overwrite"),
    ("unknown-flag", ["--output", "NEW", "--bogus"], r"unrecognized arguments: --bogus \(see --help\)"),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_bad_input_is_one_line(case, capsys, tmp_path):
    from rat.eval.merge import main

    _, extra, expected = case
    files = {"S0": _shard(0, seed=6), "S1": _shard(1, seed=6), "PREV": _result(shard=None), "OTHER": {"hello": 1}}
    for name, content in files.items():
        (tmp_path / f"{name.lower()}.json").write_text(json.dumps(content))
    argv = [str(tmp_path / "s0.json"), str(tmp_path / "s1.json"),
            *[str(tmp_path / f"{a.lower()}.json") if a in (*files, "NEW") else a for a in extra]]
    before = _snapshot(tmp_path)
    code, stderr = _call(main, argv, capsys)
    _assert_one_clear_line(code, stderr, expected, before, _snapshot(tmp_path))


EXPORT_CASES = [
    ("norm-l3", _result(norm="L3"), [], r"norm 'L3' is not one of"),
    ("robust-170-percent", _result(robust_accuracy=1.7), [], r"robust_accuracy=1\.7"),
    ("clean-negative", _result(clean_accuracy=-0.1), [], r"clean_accuracy=-0\.1"),
    ("eps-zero", _result(eps=0), [], r"eps 0 is not a positive number"),
    ("accuracy-text", _result(robust_accuracy="high"), [], r"robust_accuracy='high'"),
    ("not-a-result", {"hello": 1}, [], r"is not a rat\.eval/1 result"),
    ("missing-field", {k: v for k, v in _result().items() if k != "per_example"}, [], r"lacks per_example"),
    ("shard", _result(shard={"index": 0, "count": 2}), [], r"merge the shards first"),
    ("nonstandard-subset", _result(n_ex=100), [], r"100 images instead of 5000"),
    ("model-name-slash", _result(), ["--model-name", "a/b"], r"--model-name 'a/b'"),
    ("reported-170", _result(), ["--reported", "170"], r"--reported 170: a robust accuracy in %"),
    ("out-dir-under-file", _result(), ["--out-dir", "FILE/x"], r"cannot write"),
    ("entry-of-another-result", _result(robust_accuracy=0.3), ["--out-dir", "INFO"],
     r"imagenet/Linf/Rat2026_ConvNeXt\.json already holds a different entry for Rat2026_ConvNeXt; refusing to replace"),
    ("missing-file", None, [], r"no result file"),
    ("not-json", "{", [], r"is not valid JSON"),
    ("duplicate-key", json.dumps(_result())[:-1] + ', "robust_accuracy": 0.9}', [],
     r"key 'robust_accuracy' is given twice in one object"),
]


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_bad_input_is_one_line(case, capsys, tmp_path):
    export = load_tool("export_robustbench")
    _, content, extra, expected = case
    path = tmp_path / "result.json"
    if isinstance(content, dict):
        path.write_text(json.dumps(content))
    elif isinstance(content, str):
        path.write_text(content)
    (tmp_path / "file").write_text("x")
    (tmp_path / "done" / "imagenet" / "Linf").mkdir(parents=True)  # the entry of an earlier export of _result()
    (tmp_path / "done" / "imagenet" / "Linf" / "Rat2026_ConvNeXt.json").write_text("{}\n")
    extra = [a.replace("FILE", str(tmp_path / "file")).replace("INFO", str(tmp_path / "done")) for a in extra]
    argv = [str(path), "--model-name", "Rat2026_ConvNeXt", "--out-dir", str(tmp_path / "info"), *extra]
    before = _snapshot(tmp_path)
    code, stderr = _call(export.main, argv, capsys)
    _assert_one_clear_line(code, stderr, expected, before, _snapshot(tmp_path))
    assert not (tmp_path / "info").exists()


PLOT_CASES = [
    ("no-run-dir", "nothing", r"metrics\.jsonl not found"),
    ("damaged-middle-line", '{"kind": "step", "step": 1, "loss": 2, "lr": 0.1}\n{"kind": "st\n{"kind": "epoch"}\n',
     r"line 2 is not JSON"),
    ("empty-metrics", "", r"holds no metrics yet"),
    ("out-is-folder", '{"kind": "step", "step": 1, "loss": 2, "lr": 0.1}\n', r"--out .* must be a PNG file"),
    ("out-is-the-metrics", '{"kind": "step", "step": 1, "loss": 2, "lr": 0.1}\n', r"--out .*\.jsonl must be a PNG"),
]


@pytest.mark.parametrize("case", PLOT_CASES, ids=[c[0] for c in PLOT_CASES])
def test_plot_bad_input_is_one_line(case, capsys, tmp_path):
    plot_run = load_tool("plot_run")
    name, content, expected = case
    run = tmp_path / "run"
    run.mkdir()
    if content != "nothing":
        (run / "metrics.jsonl").write_text(content)
    out = {"out-is-folder": tmp_path, "out-is-the-metrics": run / "metrics.jsonl"}.get(name)
    argv = [str(run)] + (["--out", str(out)] if out else [])
    before = _snapshot(tmp_path)
    code, stderr = _call(plot_run.main, argv, capsys)
    _assert_one_clear_line(code, stderr, expected, before, _snapshot(tmp_path))


def test_plot_skips_a_torn_last_line_and_says_so(capsys, tmp_path):
    plot_run = load_tool("plot_run")
    lines = [{"kind": "step", "step": s, "loss": 2.0 / s, "lr": 0.1} for s in range(1, 5)]
    lines.append({"kind": "epoch", "epoch": 1, "top1": 40.0})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (tmp_path / "metrics.jsonl").write_text(text + '{"kind": "step", "st')  # killed mid-write
    code, stderr = _call(plot_run.main, [str(tmp_path)], capsys)
    assert code == 0 and "skipped the last line" in stderr and "Traceback" not in stderr
    assert (tmp_path / "curves.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------------------
# Files: kill -9 during checkpoint writes, a full disk, the umask, locks of dead processes.

def _write_forever(folder: Path, states: list[dict]) -> None:
    """The child: write ever newer 12 MB checkpoints, telling the parent (by a file) which version is in flight. The
    tensors come from the parent: a forked child must not start torch's OpenMP threads."""
    from rat.train.checkpoint import save_training_checkpoint

    for state in states:
        (folder.parent / "writing").write_text(str(state["version"]))
        save_training_checkpoint(state, folder, [f"epoch_{state['version']:04d}.pt"])


def test_kill_during_checkpoint_writes_keeps_the_previous_one(tmp_path):
    """SIGKILL at several points of a write (a forked writer, so no interpreter start): last.pt always loads, and the
    next start removes the temporary file the killed write left."""
    from rat.train.checkpoint import load_resume_checkpoint, remove_failed_writes

    states = [{"version": v, "weights": torch.full((3_000_000,), float(v))} for v in range(1, 9)]
    torn = 0
    for delay in (0.0, 0.02, 0.08, 0.2):
        run = tmp_path / f"kill{delay}"
        folder = run / "checkpoints"
        folder.mkdir(parents=True)
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                _write_forever(folder, states)
            finally:
                os._exit(0)
        deadline = time.time() + 30
        while time.time() < deadline and not ((run / "writing").exists() and (run / "writing").read_text() == "3"):
            time.sleep(0.005)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        path, state = load_resume_checkpoint("auto", run)
        assert path == folder / "last.pt" and state["version"] >= 2
        assert torch.equal(state["weights"], torch.full((3_000_000,), float(state["version"])))
        torn += len(remove_failed_writes(folder))
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert torn >= 1  # at least one kill hit a write in progress (the one right after it started)


def test_full_disk_reports_the_previous_checkpoint_intact(tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE, EFBIG) stops the write the way a full disk does."""
    from rat.train.checkpoint import CheckpointWriteError, save_training_checkpoint

    folder = tmp_path / "checkpoints"
    save_training_checkpoint({"w": torch.zeros(10)}, folder, [])
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, limits[1]))
    try:
        with pytest.raises(CheckpointWriteError) as info:
            save_training_checkpoint({"w": torch.zeros(1_000_000)}, folder, ["epoch_0002.pt"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    message = str(info.value)
    assert "could not write checkpoint" in message and f"previous checkpoint {folder / 'last.pt'} is intact" in message
    assert "\n" not in message
    assert load_checkpoint_file(folder / "last.pt")["w"].shape == (10,)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]  # no temporary file, no partial epoch file


def test_atomic_write_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda handle: handle.write("{}"), mode="w")
        os.umask(0o002)
        atomic_write(tmp_path / "b.json", lambda handle: handle.write("{}"), mode="w")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o664


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    lock_path = tmp_path / "task.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from rat.io import FileLock
        assert FileLock({str(lock_path)!r}).try_acquire()
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "held"
    lock = FileLock(lock_path)
    assert not lock.try_acquire() and f"pid {holder.pid}" in lock.holder()
    holder.kill()
    holder.wait()
    assert lock_path.exists()  # the dead holder's file is still there ...
    assert lock.try_acquire()  # ... and does not block
    lock.release()
    assert not lock_path.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Processes: two runners on one jobs file, SIGTERM to the runner, run_train.sh.

def _tiny_jobs(tmp_path: Path, val: Path, resolutions: list[int]) -> Path:
    jobs = {"output_dir": str(tmp_path / "aa"),
            "defaults": {"data": str(val), "arch": ARCH, "model_kwargs": {"num_classes": 10}, "versions": ["custom"],
                         "attacks": ["apgd-ce"], "n_ex": 4, "batch_size": 4, "num_workers": 1, "n_iter": 1},
            "jobs": [{"name": "micro", "threats": ["Linf:1/255"], "resolutions": resolutions}]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(jobs))
    return path


def _runner(jobs: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "runner_aa_eval.py"), "--jobs", str(jobs), "--cpu",
                             "--poll-interval", "0.2"], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_runners_on_one_jobs_file_run_every_job_once(tmp_path, demo_betons):
    """Every job runs once, by one of the two runners, a failing one included: the other runner does not retry a job
    that failed during its own sweep (the next sweep does)."""
    resolutions = [32, 40]
    jobs = _tiny_jobs(tmp_path, demo_betons[1], resolutions)
    spec = yaml.safe_load(jobs.read_text())
    spec["jobs"].append({"name": "broken", "data": str(jobs), "threats": ["Linf:1/255"], "resolutions": [32]})
    jobs.write_text(yaml.safe_dump(spec))  # the jobs file is no dataset: that evaluation exits 2 at once
    first, second = _runner(jobs, tmp_path), _runner(jobs, tmp_path)
    (_, err1), (_, err2) = first.communicate(timeout=600), second.communicate(timeout=600)
    assert first.returncode == 1 and second.returncode == 1, err1[-2000:] + err2[-2000:]  # both count the failure
    starts = len(re.findall(r"start on CPU slot", err1)), len(re.findall(r"start on CPU slot", err2))
    assert sum(starts) == len(resolutions) + 1, (starts, err1, err2)  # each job ran once, by one of the two runners
    for resolution in resolutions:
        log = tmp_path / "aa" / "micro" / f"Linf-1_255_r{resolution}_custom_n4.log"
        assert log.read_text().count("# ") == 1  # one process ever wrote this job's log
        result = json.loads(log.with_suffix(".json").read_text())
        assert len(result["runs"]) == 1 and result["resolution"] == resolution
    broken_log = tmp_path / "aa" / "broken" / "Linf-1_255_r32_custom_n4.log"
    assert broken_log.read_text().count("# ") == 1
    assert (err1 + err2).count("failed in another runner of this sweep") == 1
    assert all("1 failed" in err for err in (err1, err2))
    assert not list((tmp_path / "aa").rglob("*.lock"))
    assert "finished by another runner" in err1 + err2


def test_sigterm_to_the_runner_stops_its_evaluations(tmp_path, demo_betons):
    jobs = _tiny_jobs(tmp_path, demo_betons[1], [32])
    runner = _runner(jobs, tmp_path)
    log = tmp_path / "aa" / "micro" / "Linf-1_255_r32_custom_n4.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "rat.eval" in log.read_text()):
        time.sleep(0.1)
    runner.send_signal(signal.SIGTERM)
    _, stderr = runner.communicate(timeout=300)
    assert runner.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: stopping" in stderr and "rerun the same command to resume" in stderr
    pid = int(re.search(r"start on CPU slot 0 \(pid (\d+)\)", stderr).group(1))
    assert not pid_alive(pid)  # the evaluation did not outlive the runner
    assert not list((tmp_path / "aa").rglob("*.lock"))


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_sigkill_to_the_runner_takes_its_evaluations_with_it(tmp_path, demo_betons):
    """A runner killed outright (SIGKILL, the OOM killer) leaves no evaluation running: each dies with it."""
    jobs = _tiny_jobs(tmp_path, demo_betons[1], [32])
    spec = yaml.safe_load(jobs.read_text())
    spec["defaults"].update(n_iter=100, n_ex=16)  # an evaluation that outlives the 10 s below by far
    jobs.write_text(yaml.safe_dump(spec))
    runner = _runner(jobs, tmp_path)
    pid = None
    try:
        for line in runner.stderr:
            if match := re.search(r"start on CPU slot 0 \(pid (\d+)\)", line):
                pid = int(match.group(1))
                break
        assert pid is not None and _running(pid)
        runner.kill()
        runner.wait(timeout=60)
        deadline = time.time() + 10
        while _running(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _running(pid)  # today's runner left it running, unclaimed
    finally:
        runner.kill()
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_run_train_sh_refuses_a_bad_config_before_torchrun(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "run_train.sh"), "--training.epochs", "0", "--logging.folder",
                           str(tmp_path / "run")], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("rat.train: error: invalid configuration: training.epochs='0'")
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr


def test_run_train_sh_ctrl_c_and_scancel_save_and_say_how_to_resume(tmp_path, demo_betons):
    """Real signals to the user entry point's whole process group, as a terminal's Ctrl-C (SIGINT) and then scancel
    (SIGTERM) send them: torchrun ignores both (no SignalException traceback, no killed workers), run_train.sh forwards
    them to the worker (which torchrun starts in a session of its own), the worker saves mid-epoch (the first epoch of
    280 batches is far longer than the wait for its first metrics line), says how to resume in one line and exits
    cleanly."""
    run = tmp_path / "run"
    cmd = ["bash", str(REPO / "run_train.sh"), "--data.demo_root", str(demo_betons[0].parent), "--logging.folder",
           str(run), "--resolution.min_res", "32", "--resolution.max_res", "32", "--training.batch_size", "16",
           "--training.epochs", "3", "--training.precision", "fp32", "--validation.robust_n_ex", "0",
           "--logging.progress", "0", "--logging.log_every", "1", "--data.num_workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    stderr = signal_group_after_first_metrics(proc, run / "metrics.jsonl", [signal.SIGINT, signal.SIGTERM])
    assert proc.returncode == 0, stderr[-3000:]
    saved = r"SIG(INT|TERM): checkpoint saved at epoch 0, batch \d+.*; resume with --training.resume auto"
    assert len(re.findall(saved, stderr)) == 1, stderr[-3000:]
    assert "SignalException" not in stderr and "Traceback" not in stderr
    assert [line for line in _error_lines(stderr) if "WARNING" in line or "ERROR" in line] == \
        [line for line in _error_lines(stderr) if "checkpoint saved" in line], stderr[-3000:]
    state = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["batches_done"] > 0  # saved mid-epoch
    # the resumed run finishes that epoch after at most 20 batches in all
    resumed = train_in_process([*cmd[2:], "--training.limit_batches", "20", "--training.epochs", "1",
                                "--training.resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint_file(run / "checkpoints" / "last.pt")["epoch"] == 1

