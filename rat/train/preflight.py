"""The trainer's up-front checks (``python -m rat.train --validate-only`` runs only these), and the run folder's lock.

:func:`preflight` checks everything that needs no process group and no compute before a run starts: the architecture,
the resolutions it takes, the betons and their classes, ``model.init_checkpoint`` (loaded on the meta device), the run
folder (a used folder continues only its own run) and the checkpoint to resume. :func:`claim_run_folder` takes the
folder's lock for the run's lifetime.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from rat.config import ConfigError
from rat.data import read_beton_info, read_classes
from rat.data.demo import DEMO_CLASSES
from rat.data.meta import ClassMismatchError, check_classes, classes_path
from rat.io import FileLock, OutputError, check_writable
from rat.models import CheckpointError, create_model, load_checkpoint_file
from rat.models.preflight import InputSizeError, UnknownArchError, check_arch, check_input_size
from rat.train.build import model_kwargs
from rat.train.checkpoint import config_changes, load_resume_checkpoint
from rat.train.spec import TrainSpec

_logger = logging.getLogger("rat.train")


class RunFinished(Exception):
    """``training.resume`` points at a run that has already trained all its epochs; nothing to do."""


RUN_LOCK = ".rat-train.lock"  # in the run folder, held (flock) by rank 0 for the run's lifetime


def claim_run_folder(run_dir: Path) -> FileLock:
    """Check that the run folder can be written and take its lock (held until released; the kernel drops it when the
    holder dies, however it dies, so a dead run's lock never blocks).

    Raises:
        OutputError: the folder cannot be written, or another training holds it.
    """
    check_writable(run_dir / "checkpoints", "run folder (logging.folder)")
    lock = FileLock(run_dir / RUN_LOCK)
    if not lock.try_acquire():
        raise OutputError(f"run folder {run_dir} is in use by another training ({lock.holder()}): wait for it to "
                          "finish, or start this run in another --logging.folder")
    return lock


def _run_records(run_dir: Path) -> list[str]:
    """What in ``run_dir`` belongs to a run already: its checkpoints, params.json, a non-empty metrics.jsonl."""
    found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    found += [name for name in ("params.json", "metrics.jsonl") if (run_dir / name).is_file()
              and (run_dir / name).stat().st_size]
    return found


def _data_classes(spec: TrainSpec) -> tuple[list[str], str]:
    """The training data's class names and where they come from; the train and val classes files must agree (names
    and order), else every val label would mean another class.

    Raises:
        ClassMismatchError: the val beton lists other classes than the train beton.
    """
    data = spec.data
    if not data.train_dataset:
        return DEMO_CLASSES, "the demo dataset"
    train_from = f"train data ({classes_path(data.train_dataset)})"
    classes = read_classes(data.train_dataset)
    check_classes(classes, read_classes(data.val_dataset), expected_from=train_from,
                  actual_from=f"val data ({classes_path(data.val_dataset)})",
                  fix=f"write the val beton with the train classes (tools/write_ffcv.py --cfg.classes_from "
                      f"{data.train_dataset})")
    return classes, train_from


def _check_checkpoint_classes(path: Path | str, checkpoint: dict[str, Any], classes: list[str], classes_from: str,
                              num_classes: int, key: str) -> None:
    """A checkpoint to resume or start from against this run's classes: the names it records (if any), and the class
    count of its model.

    Raises:
        ClassMismatchError: they differ.
    """
    fix = f"{key} needs a checkpoint trained on the same classes"
    recorded = checkpoint.get("classes")
    if isinstance(recorded, list):
        check_classes(recorded, classes, expected_from=f"checkpoint {path}", actual_from=classes_from, fix=fix)
    count = (checkpoint.get("model_kwargs") or {}).get("num_classes")
    if isinstance(count, int):
        check_classes(count, num_classes, expected_from=f"checkpoint {path}", actual_from="this run's model", fix=fix)


def preflight(spec: TrainSpec) -> tuple[Path, dict[str, Any]] | None:
    """Every check of the configuration that needs no process group and no compute, run before anything starts
    (``python -m rat.train --validate-only`` runs only these): the architecture exists, it takes the configured
    resolutions, the betons are readable rat betons, the run folder is writable, and a resumed checkpoint is readable
    and was trained with the same settings. Returns the checkpoint to resume (path and contents), if any.

    Raises:
        ConfigError: a bad setting or a resume that would change the run; the message names the key.
        FileNotFoundError: a missing beton or resume checkpoint.
        CheckpointError: an unreadable resume checkpoint.
        OutputError: the run folder cannot be written.
        RunFinished: the resumed run has trained all its epochs.
    """
    if spec.model.sync_bn and (spec.training.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("model.sync_bn 1 needs CUDA devices (torch's SyncBatchNorm has no CPU implementation): on "
                          "the CPU use --model.sync_bn 0, which averages the processes' BatchNorm statistics at every "
                          "epoch end and checkpoint")
    arch = spec.model.arch
    try:
        check_arch(arch)
    except UnknownArchError as exc:
        raise ConfigError(f"model.arch: {exc}") from exc
    data = spec.data
    if bool(data.train_dataset) != bool(data.val_dataset):
        raise ConfigError("give both data.train_dataset and data.val_dataset, or neither (= the demo dataset)")
    for name, beton in (("train_dataset", data.train_dataset), ("val_dataset", data.val_dataset)):
        if beton:
            try:
                read_beton_info(beton)
            except (ValueError, FileNotFoundError) as exc:
                raise ConfigError(f"data.{name}: {exc}") from exc
    try:
        classes, classes_from = _data_classes(spec)
        num_classes = data.num_classes or len(classes)
        check_classes(len(classes), num_classes, expected_from=classes_from, actual_from="data.num_classes",
                      fix="leave data.num_classes at 0 (= the data's class count)")
    except ClassMismatchError as exc:
        raise ConfigError(str(exc)) from exc
    for key, value in (("resolution.min_res", spec.resolution.min_res), ("resolution.max_res", spec.resolution.max_res),
                       ("validation.resolution", spec.validation.resolution)):
        if value:
            try:
                check_input_size(arch, value, num_classes=num_classes)
            except InputSizeError as exc:
                raise ConfigError(f"{key}={value}: {exc}") from exc
    if spec.model.init_checkpoint:
        _check_init_checkpoint(spec, classes, classes_from, num_classes)
    if spec.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=1 needs the tensorboard package: pip install tensorboard (or "
                          "rat[tensorboard]), or set --logging.tensorboard 0")
    run_dir = Path(spec.logging.folder)  # writable and locked: claim_run_folder, before these checks
    used = _run_records(run_dir)
    resume = spec.training.resume
    # a used folder continues only its own run: auto, or an explicit checkpoint of its checkpoints/ folder
    if used and resume != "auto" and not (resume and Path(resume).resolve().parent
                                           == (run_dir / "checkpoints").resolve()):
        held = f"run folder {run_dir} already holds a run ({', '.join(used[:4])}{', ...' if len(used) > 4 else ''})"
        if not resume:
            raise ConfigError(f"{held}: continue it with --training.resume auto, or start a new run in another "
                              "--logging.folder")
        raise ConfigError(f"{held} and training.resume={resume} is a checkpoint of another folder: continuing it "
                          "here would mix two runs; resume it in its own or a new --logging.folder, or this folder's "
                          "run with --training.resume auto")
    resumed = load_resume_checkpoint(spec.training.resume, run_dir)
    if resumed is None:
        return None
    path, state = resumed
    recorded = state.get("config") if isinstance(state.get("config"), dict) else None
    if recorded is None or "arch" not in state:
        raise ConfigError(f"cannot resume {path}: it is not a rat.train checkpoint (no recorded config); use it as "
                          f"--model.init_checkpoint {path} to start a new run from its weights")
    refused, allowed = config_changes(recorded, spec.to_dict())
    if refused:
        raise ConfigError(f"cannot resume {path} with a different configuration: {'; '.join(refused)}. Resume with "
                          f"the recorded settings (-C {run_dir / 'params.json'} --training.resume auto), or start a "
                          "new run in another --logging.folder")
    try:
        _check_checkpoint_classes(path, state, classes, classes_from, num_classes, "training.resume")
    except ClassMismatchError as exc:
        raise ConfigError(f"cannot resume: {exc}") from exc
    if allowed:
        _logger.warning("resuming %s with changed settings: %s", path, "; ".join(allowed))
    epochs = spec.training.epochs
    if state.get("epoch", 0) >= epochs and not state.get("batches_done"):
        raise RunFinished(f"run {run_dir} has already finished: {path} is at epoch {state.get('epoch')} of "
                          f"training.epochs={epochs}; nothing to do (raise --training.epochs to train longer)")
    return resumed


def _check_init_checkpoint(spec: TrainSpec, classes: list[str], classes_from: str, num_classes: int) -> None:
    """``model.init_checkpoint`` loads into this run's model: built on the meta device (no memory, no compute) and
    loaded strictly, as the run will; and it was trained on the same classes when it records them.

    Raises:
        ConfigError: unreadable, another architecture, other shapes or other classes.
    """
    path = spec.model.init_checkpoint
    kwargs = model_kwargs(spec.model, num_classes, spec.resolution.max_res)
    try:
        checkpoint = load_checkpoint_file(path)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that copying into meta parameters is a no-op
            create_model(spec.model.arch, checkpoint=checkpoint, **kwargs)
        if isinstance(checkpoint.get("classes"), list):
            check_classes(checkpoint["classes"], classes, expected_from=f"checkpoint {path}", actual_from=classes_from,
                          fix="model.init_checkpoint needs a checkpoint trained on the same classes")
    except (CheckpointError, ClassMismatchError, ValueError, RuntimeError, OSError) as exc:
        raise ConfigError(f"model.init_checkpoint {path}: {' '.join(str(exc).split())}") from exc
