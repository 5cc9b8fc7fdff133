"""One AutoAttack evaluation: a model, a threat model, a resolution, a version, a fixed subset of the val set.

``run_evaluation(spec)`` builds the model from a checkpoint (the architecture comes from the checkpoint), loops over
fixed batches of the subset and runs AutoAttack's attacks one at a time on each batch (``rat.eval.autoattack``). After
every attack of every batch it saves the per-example robust flags atomically (``rat.eval.state``), so a killed run
restarts where it stopped, without redoing finished batches, and gives the same result as an uninterrupted one
(AutoAttack reseeds every attack call with the fixed seed, so a batch's result does not depend on the others).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rat.attacks import DEFAULT_EPS, NORMS, check_eps
from rat.eval.autoattack import (
    AUTOATTACK_VERSION,
    attack_settings,
    build_autoattack,
    check_square,
    resolve_attacks,
    robust_after_attack,
)
from rat.eval.data import iter_eval_batches, preprocessing_info, select_subset, shard_batches
from rat.eval.results import RESULT_FORMAT, ResultError, accuracies, eps_tag, load_result
from rat.eval.spec import DEFAULT_RESOLUTION, IDENTITY_KEYS, EvalSpec, evaluation_identity, state_fingerprint
from rat.eval.state import EvalState, atomic_write_json, flags_to_str
from rat.logging import lines_around_bar, progress
from rat.models.checkpoint import CheckpointError
from rat.precision import PRECISIONS

__all__ = [
    "CheckpointError", "OutputTakenError", "ResolvedEval", "build_eval_model", "check_output", "default_model_name",
    "default_output", "file_sha256", "finished_result", "resolve", "run_evaluation", "state_path_for",
]

_logger = logging.getLogger(__name__)

@dataclasses.dataclass
class _ModelSource:
    arch: str
    model_kwargs: dict[str, Any]
    train_resolution: int | None
    checkpoint_sha256: str | None
    normalization: str = ""  # where the model's input normalization comes from
    checkpoint: dict[str, Any] | None = dataclasses.field(default=None, repr=False)  # loaded once, for create_model


def default_model_name(checkpoint: str | Path | None, arch: str) -> str:
    """``<folder>-<file stem>`` of a checkpoint, where the folder is the run folder for the trainer's layout
    (``runs/convnext_b/checkpoints/last.pt`` → ``convnext_b-last``); the architecture without a checkpoint."""
    if checkpoint is None:
        return arch
    path = Path(checkpoint).resolve()
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{folder.name}-{path.stem}" if folder.name else path.stem


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _requested_normalize(spec: EvalSpec) -> bool | None:
    """The normalization asked for: ``spec.normalize``, else a ``normalize`` in ``spec.model_kwargs``, else None."""
    if spec.normalize is not None:
        return spec.normalize
    value = spec.model_kwargs.get("normalize")
    return None if value is None else bool(value)


def _resolve_source(spec: EvalSpec) -> _ModelSource:
    """Architecture, model kwargs and input normalization from the checkpoint (and the spec), with clear errors."""
    from rat.models import CheckpointError as UnreadableCheckpoint
    from rat.models import checkpoint_model_kwargs, load_checkpoint_file, resolve_normalization
    from rat.models.preflight import check_arch

    if spec.arch is not None:
        check_arch(spec.arch)
    if spec.checkpoint is None:
        if spec.arch is None:
            raise CheckpointError("nothing to evaluate: pass --checkpoint PATH, or --arch NAME for random weights")
        kwargs = dict(spec.model_kwargs)
        kwargs["normalize"], why = resolve_normalization(spec.arch, None, _requested_normalize(spec))
        return _ModelSource(spec.arch, kwargs, None, None, why)
    path = Path(spec.checkpoint)
    try:
        ckpt = load_checkpoint_file(path)
    except UnreadableCheckpoint as exc:
        raise CheckpointError(str(exc)) from exc
    arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if arch is None:
        if spec.arch is None:
            raise CheckpointError(f"checkpoint {path} does not name its architecture (not a rat trainer checkpoint): "
                                  "pass --arch NAME, e.g. --arch convnext_base_cvst")
        arch = spec.arch
    elif spec.arch is not None and spec.arch != arch:
        raise CheckpointError(f"checkpoint {path} holds a {arch} but --arch {spec.arch} was given: drop --arch "
                              "(rat checkpoints name their architecture)")
    if spec.use_ema and isinstance(ckpt, dict) and "model_ema" in ckpt and ckpt["model_ema"] is None:
        raise CheckpointError(f"checkpoint {path} has no EMA weights: drop --use-ema")
    try:
        kwargs, train_resolution, why = checkpoint_model_kwargs(
            ckpt, arch, normalize=_requested_normalize(spec), use_ema=spec.use_ema, source=str(path),
            **spec.model_kwargs)
    except UnreadableCheckpoint as exc:  # bad input: the message names --normalize
        raise CheckpointError(str(exc)) from exc
    return _ModelSource(arch, kwargs, train_resolution, file_sha256(path), why, ckpt)


class _ContiguousInputGrad(torch.autograd.Function):
    """Identity whose backward returns a contiguous gradient.

    A channels_last model gives channels_last input gradients, and AutoAttack calls ``.view`` on them (which needs
    a contiguous tensor); this keeps the speed of channels_last and hands AutoAttack the layout it expects.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class EvalModel(nn.Module):
    """The model as AutoAttack sees it: contiguous input gradients, optional autocast, fp32 logits.

    Args:
        model: the classifier on [0,1] inputs.
        dtype: autocast dtype (``torch.bfloat16``/``torch.float16``) or None for fp32.
        device_type: ``cuda`` or ``cpu``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, device_type: str):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x = _ContiguousInputGrad.apply(x)
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.model(x).float()


def build_eval_model(arch: str, checkpoint: str | Path | dict[str, Any] | None, *, resolution: int,
                     model_kwargs: dict[str, Any], use_ema: bool, device: torch.device,
                     precision: str = "fp32") -> nn.Module:
    """The model to attack: built at ``resolution`` (ViT position embeddings resampled by the factory), weights loaded
    strictly, on ``device``, channels_last, eval mode, parameters frozen, optionally under autocast.

    Raises:
        CheckpointError: the checkpoint's weights do not fit the architecture.
    """
    from rat.models import create_model, load_checkpoint_file

    kwargs = dict(model_kwargs)
    normalize = kwargs.pop("normalize", None)
    ckpt = load_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    try:
        if ckpt is not None and "quant" in ckpt:
            # A rat.quant checkpoint: its quantized weights *and* the quantization of every layer's input, i.e. the
            # deployed model as rat.quant simulates it (create_model alone would run float activations).
            from rat.quant import load_quantized_model

            if use_ema:
                raise CheckpointError("a rat.quant checkpoint holds one quantized model and no EMA weights: drop "
                                      "--use-ema")
            model = load_quantized_model(ckpt, img_size=resolution).model
        else:
            model = create_model(arch, checkpoint=ckpt, img_size=resolution, normalize=normalize, use_ema=use_ema,
                                 **kwargs)
    except (RuntimeError, CheckpointError) as exc:
        if checkpoint is None:
            raise
        where = "" if isinstance(checkpoint, dict) else f" {checkpoint}"
        raise CheckpointError(f"checkpoint{where} does not fit architecture {arch} (model kwargs {kwargs}): {exc}. "
                              "Pass the --arch the checkpoint was trained with (and --model-kwargs such as "
                              "num_classes)") from exc
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    model.requires_grad_(False)
    return EvalModel(model, PRECISIONS[precision], device.type).eval()


def _software_versions(device: torch.device) -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                                "pyautoattack": AUTOATTACK_VERSION, "numpy": np.__version__}
    for package in ("timm", "ffcv", "rat"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["cuda"] = torch.version.cuda
    versions["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return versions


# --- What defines an evaluation (rat.eval.spec: evaluation_identity, IDENTITY_KEYS): its default file name, and the
# check that a result is never replaced by another's.
def default_output(spec: EvalSpec, identity: dict[str, Any]) -> Path:
    """``aa_<norm>-<eps>_r<res>_<version>_n<n_ex>[_shard<i>of<k>]_<checkpoint stem>[-ema]_<fingerprint>.json`` next
    to the checkpoint (or in the cwd), where the fingerprint (8 hex digits) hashes everything else that defines the
    evaluation (checkpoint hash, seed, precision, batch size, n_iter, data...): another evaluation gets another name."""
    folder = Path(spec.checkpoint).parent if spec.checkpoint is not None else Path.cwd()
    shard = f"_shard{spec.shard[0]}of{spec.shard[1]}" if spec.shard else ""
    stem = Path(spec.checkpoint).stem if spec.checkpoint is not None else identity["arch"]
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return folder / (f"aa_{spec.norm}-{eps_tag(spec.norm, spec.eps)}_r{spec.resolution}_{spec.version}_n{spec.n_ex}"
                     f"{shard}_{stem}{'-ema' if spec.use_ema else ''}_{fingerprint}.json")


def check_output(output: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse an output that is a folder, or a file holding anything but a result of this same evaluation; returns
    the result found there (None when there is no file yet).

    Raises:
        ValueError: the message names the file, what differs, and the fix.
    """
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder: pass a file name such as {output / 'result.json'}")
    if not output.exists():
        return None
    try:
        existing = load_result(output)
    except ResultError as exc:
        raise ValueError(f"{exc}; refusing to overwrite it: pass another --output, or move it away") from exc
    differs = [k for k in IDENTITY_KEYS if k in existing and existing[k] != identity[k]]
    if differs:
        raise ValueError(f"{output} holds the result of a different evaluation (differs in {', '.join(differs)}); "
                         "refusing to replace it: pass another --output, or move it away")
    return existing


class OutputTakenError(ValueError):
    """``--output`` came to hold another evaluation's result while this one was starting (another process wrote it);
    nothing was replaced."""


def finished_result(output: Path, identity: dict[str, Any], subset_name: str) -> dict[str, Any] | None:
    """The result at ``output`` when it is this very evaluation's complete result (every identity key and the subset
    recorded and equal), to be reused; None when there is none (or an older file that does not record everything,
    which the evaluation replaces as before).

    Raises:
        ValueError: ``output`` holds another evaluation's result or an unreadable file (:func:`check_output`).
    """
    existing = check_output(output, identity)
    if existing is None:
        return None
    if all(k in existing for k in IDENTITY_KEYS) and (existing.get("subset") or {}).get("name") == subset_name:
        return existing
    return None


def _recheck_output(output: Path, identity: dict[str, Any], subset_name: str) -> dict[str, Any] | None:
    """:func:`finished_result` again, once this process holds the evaluation's lock: another process may have
    written ``output`` since :func:`resolve` looked (two runs with different settings on one ``--output``)."""
    try:
        return finished_result(output, identity, subset_name)
    except ValueError as exc:
        raise OutputTakenError(f"{exc} (another process wrote it while this evaluation was starting)") from exc


def state_path_for(output: Path) -> Path:
    """The state file of a result: ``<result>.state.json``."""
    return output.with_name(output.name + ".state.json")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_spec(spec: EvalSpec) -> None:
    if spec.norm not in NORMS:
        raise ValueError(f"unknown norm {spec.norm!r}: use one of {', '.join(NORMS)}")
    if spec.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {spec.precision!r}: use one of {', '.join(PRECISIONS)}")
    if spec.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {spec.batch_size}")
    if spec.eps is not None and not spec.eps > 0:
        raise ValueError(f"eps must be positive, got {spec.eps}")
    if spec.resolution is not None and spec.resolution < 1:
        raise ValueError(f"resolution must be positive, got {spec.resolution}")


def _check_data_classes(spec: EvalSpec, source: _ModelSource) -> None:
    """A checkpoint's classes (their number, and their names when the checkpoint records them) against the data's:
    a label the model cannot predict, or one that means another class, would count silently as an error or a hit.

    Raises:
        ClassMismatchError: they differ (a ValueError: bad input).
    """
    from rat.data.meta import check_checkpoint_classes

    if spec.checkpoint is None:
        return
    check_checkpoint_classes({**(source.checkpoint or {}), "model_kwargs": source.model_kwargs},
                             f"checkpoint {spec.checkpoint}", spec.data,
                             fix="evaluate on the data the model was trained for (or pass the matching --checkpoint)")


@dataclasses.dataclass
class ResolvedEval:
    """An ``EvalSpec`` with every default filled in (eps, resolution, output, name) and its model source read."""

    spec: EvalSpec
    source: _ModelSource
    attacks: list[str]
    device: torch.device


def resolve(spec: EvalSpec) -> ResolvedEval:
    """Check a spec, read the checkpoint's architecture and fill in the defaults.

    Raises:
        ValueError: bad threat model, version, attacks, precision or batch size (the message says which).
        CheckpointError: the checkpoint does not name its architecture and no --arch was given, or names another.
    """
    from rat.models.preflight import check_input_size

    _check_spec(spec)
    attacks = resolve_attacks(spec.version, spec.attacks)
    source = _resolve_source(spec)
    eps = float(spec.eps) if spec.eps is not None else DEFAULT_EPS[spec.norm]
    resolution = spec.resolution or source.train_resolution or DEFAULT_RESOLUTION
    check_input_size(source.arch, resolution, **source.model_kwargs)
    warning = check_eps(spec.norm, eps, resolution)  # ValueError: a radius that covers the whole image
    if warning:
        _logger.warning("--eps: %s", warning)
    _check_data_classes(spec, source)
    filled = dataclasses.replace(spec, eps=eps, resolution=resolution)
    identity = evaluation_identity(filled, source, attacks)
    output = Path(spec.output) if spec.output is not None else default_output(filled, identity)
    check_output(output, identity)
    name = spec.name or default_model_name(spec.checkpoint, source.arch)
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return ResolvedEval(dataclasses.replace(filled, output=output, name=name), source, attacks, device)


def run_evaluation(spec: EvalSpec | ResolvedEval, progress_setting: str = "auto") -> dict[str, Any]:
    """Run (or resume) one evaluation and write its JSON result; see the module docstring. ``progress_setting``
    (``auto``, ``1``, ``0``; :func:`rat.logging.progress`): a tqdm bar over the batches, or one log line per batch.

    Returns:
        The result (also written to the spec's ``output``, by default ``default_output``).
    """
    wall_start = time.time()
    started = _now()
    resolved = spec if isinstance(spec, ResolvedEval) else resolve(spec)
    spec, source, attacks, device = resolved.spec, resolved.source, resolved.attacks, resolved.device
    eps, resolution, output, name = float(spec.eps), int(spec.resolution), Path(spec.output), str(spec.name)

    indices, subset = select_subset(spec.data, spec.n_ex, spec.subset)
    identity = evaluation_identity(spec, source, attacks)
    done = _recheck_output(output, identity, subset["name"])
    if done is not None:
        _reused(done, output)
        return done
    n_total = subset["dataset_size"]
    preprocessing = preprocessing_info(spec.data)
    n_batches = -(-len(indices) // spec.batch_size)
    batch_ids = shard_batches(n_batches, *spec.shard) if spec.shard else range(n_batches)

    def batch_slice(b: int) -> slice:
        return slice(b * spec.batch_size, min((b + 1) * spec.batch_size, len(indices)))

    model = build_eval_model(source.arch, source.checkpoint, resolution=resolution, model_kwargs=source.model_kwargs,
                             use_ema=spec.use_ema, device=device, precision=spec.precision)
    quantization = ((source.checkpoint or {}).get("quant") or {}).get("name")  # rat.quant format, or None
    source.checkpoint = None  # free the loaded checkpoint (optimizer state and all)
    adversary = build_autoattack(model, norm=spec.norm, eps=eps, attacks=attacks, device=device, seed=spec.seed,
                                 n_iter=spec.n_iter, n_queries=spec.n_queries)
    settings = attack_settings(adversary)
    shard = {"index": spec.shard[0], "count": spec.shard[1]} if spec.shard else None
    steps = ["clean", *attacks]
    state = EvalState.load_or_create(state_path_for(output), state_fingerprint(identity, settings, subset), steps)
    try:  # holding the evaluation's lock now: what resolve() saw of the output may have changed
        done = _recheck_output(output, identity, subset["name"])
    except OutputTakenError:
        state.close(finished=False)
        raise
    if done is not None:
        state.close(finished=False)
        _reused(done, output)
        return done
    finished = [b for b in batch_ids if state.is_done(b)]
    todo = [b for b in batch_ids if not state.is_done(b)]
    _logger.info("evaluating %s (%s) %s eps=%.6g at %d px, %s (%s) on %d of %d images (%s subset)%s, %d batches of %d "
                 "on %s", name, source.arch, spec.norm, eps, resolution, spec.version, ", ".join(attacks), spec.n_ex,
                 n_total, subset["name"],
                 f", shard {shard['index']}/{shard['count']}" if shard else "", len(batch_ids), spec.batch_size, device)
    if finished:
        _logger.info("resuming from %s: skipping %d finished batches, %d to go", state.path, len(finished), len(todo))

    todo_indices = np.concatenate([indices[batch_slice(b)] for b in todo]) if todo else indices[:0]
    sizes = [batch_slice(b).stop - batch_slice(b).start for b in todo]
    batches = iter_eval_batches(spec.data, todo_indices, sizes, resolution=resolution, device=device,
                                num_workers=spec.num_workers)
    bar = progress(total=len(batch_ids), initial=len(finished), desc="AutoAttack batches", setting=progress_setting,
                   every=1, logger=_logger, unit="batch")
    with lines_around_bar(bar):
        for b, (x, y) in zip(todo, batches):
            x = x.contiguous()  # AutoAttack reshapes with .view
            _run_batch(state, b, x, y, model, adversary, attacks)
            robust = state.flags(b, steps[-1])
            bar.set_postfix(batch=f"{b + 1}/{n_batches}", clean=f"{sum(state.flags(b, 'clean'))}/{len(robust)}",
                            robust=f"{sum(robust)}/{len(robust)}", took=f"{state.batches[b]['time_s']:.1f}s")
            bar.update(1)
    bar.close()

    per_example: dict[str, Any] = {"indices": [int(i) for b in batch_ids for i in indices[batch_slice(b)]]}
    for step in steps:
        per_example[step] = "".join(state.batches[b]["flags"][step] for b in batch_ids)
    clean, after = accuracies(per_example, attacks)
    check_square({"clean": clean, **after})
    result = {
        "format": RESULT_FORMAT,
        "model": name,
        "arch": source.arch,
        "model_kwargs": source.model_kwargs,
        "checkpoint": str(Path(spec.checkpoint).resolve()) if spec.checkpoint is not None else None,
        "checkpoint_sha256": source.checkpoint_sha256,
        "use_ema": spec.use_ema,
        "quantization": quantization,
        "normalize": bool(source.model_kwargs["normalize"]),
        "normalize_source": source.normalization,
        "norm": spec.norm,
        "eps": eps,
        "resolution": resolution,
        "version": spec.version,
        "attacks": attacks,
        "attack_settings": settings,
        "standard_settings": spec.n_iter is None and spec.n_queries is None,
        "n_iter": spec.n_iter,
        "n_queries": spec.n_queries,
        "n_ex": spec.n_ex,
        "data": str(Path(spec.data).resolve()),
        "subset": subset,
        "preprocessing": preprocessing,
        "shard": shard,
        "batch_size": spec.batch_size,
        "precision": spec.precision,
        "seed": spec.seed,
        "device": str(device),
        "clean_accuracy": clean,
        "robust_accuracy": after[attacks[-1]],
        "robust_accuracy_after": after,
        "time_s": state.total_time(),
        "wall_s": time.time() - wall_start,
        "started": started,
        "finished": _now(),
        "runs": state.runs,
        "software": _software_versions(device),
        "output": str(output),
        "per_example": per_example,
    }
    result.update({k: identity[k] for k in IDENTITY_KEYS if k not in result})  # every setting that defines it
    try:  # under the lock, immediately before writing: never replace another evaluation's result
        check_output(output, identity)
    except ValueError as exc:
        state.close(finished=False)
        raise OutputTakenError(f"{exc}; this evaluation's batches are kept in {state.path}") from exc
    atomic_write_json(output, result)
    state.close(finished=True)
    _logger.info("wrote %s", output)
    return result


def _reused(result: dict[str, Any], output: Path) -> None:
    _logger.info("already done: %s holds this evaluation's result (finished %s); reusing it, nothing recomputed "
                 "(delete it to compute it again)", output, result.get("finished", "?"))


def _run_batch(state: EvalState, batch: int, x: torch.Tensor, y: torch.Tensor, model: nn.Module, adversary: Any,
               attacks: list[str]) -> None:
    """Run the unfinished steps (clean, then each attack on the points still robust) of one batch."""
    done = state.done_steps(batch)
    if "clean" not in done:
        start = time.time()
        with torch.no_grad():
            robust = model(x).argmax(dim=1).eq(y).cpu()
        state.record(batch, "clean", robust, time.time() - start)
        done = ["clean"]
    robust = torch.tensor(state.flags(batch, done[-1]), dtype=torch.bool)
    for attack in attacks[len(done) - 1:]:
        start = time.time()
        alive = robust.nonzero().squeeze(1)
        if alive.numel() > 0:
            on_device = alive.to(x.device)
            robust[alive] = robust_after_attack(adversary, attack, x[on_device], y[on_device])
        state.record(batch, attack, robust, time.time() - start)
        _logger.debug("batch %d %s: %s", batch, attack, flags_to_str(robust))
