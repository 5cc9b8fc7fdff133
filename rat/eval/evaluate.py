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

from rat.attacks import DEFAULT_EPS, check_eps
from rat.eval.autoattack import (
    AUTOATTACK_VERSION,
    attack_settings,
    build_autoattack,
    check_square,
    resolve_attacks,
    robust_after_attack,
)
from rat.eval.data import iter_eval_batches, preprocessing_info, select_subset, shard_batches
from rat.eval.model import ModelSource, build_eval_model, model_recipe
from rat.eval.results import RESULT_FORMAT, ResultError, accuracies, eps_tag, load_result
from rat.eval.spec import (
    DEFAULT_RESOLUTION,
    IDENTITY_KEYS,
    EvalSpec,
    check_spec,
    evaluation_identity,
    state_fingerprint,
)
from rat.eval.state import EvalState, atomic_write_json, flags_to_str
from rat.logging import lines_around_bar, progress

__all__ = [
    "OutputTakenError", "ResolvedEval", "check_output", "default_model_name", "default_output", "file_sha256",
    "finished_result", "resolve", "run_evaluation", "state_path_for",
]

_logger = logging.getLogger(__name__)


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


def _check_data_classes(spec: EvalSpec, source: ModelSource) -> None:
    """A checkpoint's classes (their number, and their names when the checkpoint records them) against the data's:
    a label the model cannot predict, or one that means another class, would count silently as an error or a hit.

    Raises:
        ClassMismatchError: they differ (a ValueError: bad input).
    """
    from rat.data.meta import check_checkpoint_classes

    if spec.checkpoint is None:
        return
    classes = source.recipe.checkpoint.classes if source.recipe.checkpoint is not None else None
    check_checkpoint_classes(classes, source.model_kwargs.get("num_classes"), f"checkpoint {spec.checkpoint}",
                             spec.data,
                             fix="evaluate on the data the model was trained for (or pass the matching --checkpoint)")


@dataclasses.dataclass
class ResolvedEval:
    """An ``EvalSpec`` with every default filled in (eps, resolution, output, name) and its model source read."""

    spec: EvalSpec
    source: ModelSource
    attacks: list[str]
    device: torch.device


def resolve(spec: EvalSpec) -> ResolvedEval:
    """Check a spec, read the checkpoint's architecture and fill in the defaults.

    Raises:
        ValueError: bad threat model, version, attacks, precision or batch size (the message says which).
        CheckpointError: the checkpoint does not name its architecture and no --arch was given, or names another.
    """
    from rat.models.preflight import check_input_size

    check_spec(spec)
    attacks = resolve_attacks(spec.version, spec.attacks)
    recipe = model_recipe(spec)
    source = ModelSource(recipe, None if spec.checkpoint is None else file_sha256(spec.checkpoint))
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

    model = build_eval_model(source.recipe, resolution=resolution, device=device, precision=spec.precision)
    quantization = source.quantization  # rat.quant format, or None
    source.release()  # free the loaded checkpoint (optimizer state and all)
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
