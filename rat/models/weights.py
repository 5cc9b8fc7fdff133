"""Safe checkpoint-file reading, the weights' key layouts, and strict, explainable state-dict loading.

Checkpoints are untrusted files: torch checkpoints are read with ``torch.load(..., weights_only=True)`` (a pickle that
carries code or arbitrary objects is rejected, never executed) and ``.safetensors`` files with safetensors.

Key layouts understood here (everything else is an error, never a guess):

* rat: ``create_model(...).state_dict()``, i.e. timm's keys, bare or in a rat trainer checkpoint
  (``{'model': ..., 'model_ema': ..., 'arch': ..., 'model_kwargs': ...}``); checkpoints written while rat wrapped the
  timm network hold ``model.<timm keys>`` (older ones also ``normalize.mean/std``);
* a plain timm state dict (``<timm keys>``);
* revisiting-at releases: ``DDP(WrappedModel(normalize_model(model)))`` gives ``module.base_model.normalize.mean``,
  ``module.base_model.model.<keys>``; EMA files lack ``module.``; RobustBench-style files lack ``base_model.``; models
  trained without normalization lack ``normalize.*`` and ``model.``. Full training checkpoints nest the weights under
  ``model_state_dict`` / ``state_dict_ema``.

Wrapper prefixes (``module.`` from DDP/EMA, ``_orig_mod.`` from torch.compile, ``base_model.`` from the reference's
``WrappedModel``) are stripped only when *every* key carries them; the ``normalize.`` / ``model.`` pair is split off
only when every other key starts with ``model.``. Family-specific renames (the reference ConvStem's ``stem.stem.N``)
live in each family's ``checkpoint_filter_fn``, which starts with :func:`filter_state_dict` (the steps every layout
needs: unwrap, check the input normalization, resample a position embedding to the model's grid).
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .layers import ImageNormalizer

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "load_checkpoint_file",
    "select_state_dict",
    "unwrap_state_dict",
    "check_normalization",
    "filter_state_dict",
    "model_input_normalization",
    "is_reference_layout",
    "remap_reference_stem",
    "resample_pos_embed_to_model",
    "load_state_dict_strict",
]

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.")
# Stem prefixes that only the reference code (revisiting-at's ConvStem nn.Sequential) produces.
REFERENCE_STEM_PREFIXES = ("stem.stem.", "patch_embed.proj.stem.")
# Checkpoint dict entries holding model weights, most specific first (rat/FB ConvNeXt, revisiting-at, timm train.py).
_WEIGHT_KEYS = ("model", "model_state_dict", "state_dict")
_EMA_KEYS = ("model_ema", "state_dict_ema")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, does not match the model it is loaded into, or cannot be used as asked
    (no architecture recorded, another architecture, no EMA weights). Bad input: the command-line tools report it in
    one line and exit with status 2."""


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file without executing anything it contains.

    Args:
        path: A torch checkpoint (``torch.save``; read with ``weights_only=True``) or a ``.safetensors`` file.

    Returns:
        The stored dict (a state dict, or a checkpoint dict that holds one).

    Raises:
        FileNotFoundError: The path does not exist (or is a folder).
        CheckpointError: The file is not a plain weights file (e.g. a pickle carrying code) or is corrupt.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {path} {what}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except SafetensorError as err:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {err}") from err
    with path.open("rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save writes a zip (or a legacy pickle)
        what = "the file is empty" if not head else "not a torch checkpoint (neither a zip nor a pickle)"
        raise CheckpointError(f"cannot read checkpoint {path}: {what}; pass a file written by torch.save (rat.train "
                              "writes them under <run>/checkpoints/)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain weights file (checkpoints are untrusted and read with "
            f"torch.load(weights_only=True), which rejected it: {_unpickler_reason(err)}). A file that holds more "
            f"than tensors and plain containers is never unpickled; if you trust it, re-save only its weights: "
            f"torch.save(model.state_dict(), new_path)") from err
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:  # torch.load on a non-checkpoint file
        raise CheckpointError(f"cannot read checkpoint {path}: empty, truncated or not a torch checkpoint "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); pass a file written by "
                              "torch.save (rat.train writes them under <run>/checkpoints/)") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def _unpickler_reason(err: Exception) -> str:
    """The specific part of torch's weights_only error (e.g. 'Unsupported global: GLOBAL builtins.exec ...')."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = text.split("Please use `torch.serialization", 1)[0]  # no advice to allowlist untrusted globals
    return " ".join(text.split())[:300]


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Pick the model weights out of a checkpoint dict.

    Args:
        checkpoint: A state dict, or a dict holding one under ``model``/``model_state_dict``/``state_dict`` (EMA
            weights under ``model_ema``/``state_dict_ema``).
        use_ema: Return the EMA weights; an error if the checkpoint has none.

    Returns:
        The state dict, keys unchanged.
    """
    if _is_state_dict(checkpoint):
        if use_ema:
            raise CheckpointError("use_ema=True but the checkpoint is a bare state dict without EMA weights")
        return dict(checkpoint)
    names = _EMA_KEYS if use_ema else _WEIGHT_KEYS
    for name in names:
        value = checkpoint.get(name)
        if isinstance(value, Mapping) and _is_state_dict(value):
            return dict(value)
    what = "EMA weights" if use_ema else "model weights"
    raise CheckpointError(
        f"checkpoint has no {what}: expected a state dict under one of {list(names)}, found top-level keys "
        f"{sorted(checkpoint)[:20]}" + (" (the run was trained without EMA?)" if use_ema else ""))


def unwrap_state_dict(state_dict: Mapping[str, torch.Tensor],
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Strip wrapper prefixes and split off input-normalization buffers.

    Args:
        state_dict: Weights in any of the layouts listed in this module's docstring.

    Returns:
        ``(inner, normalization)``: the inner classifier's weights with plain timm-style keys, and the
        ``normalize.*`` buffers (``{'mean': ..., 'std': ...}``) if the checkpoint carries them, else ``{}``.
    """
    sd = dict(state_dict)
    stripped = True
    while stripped and sd:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    norm = {k[len("normalize."):]: v for k, v in sd.items() if k.startswith("normalize.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("normalize.")}
    if rest and all(k.startswith("model.") for k in rest):
        rest = {k[len("model."):]: v for k, v in rest.items()}
    elif norm:
        others = sorted(k for k in rest if not k.startswith("model."))[:5]
        raise CheckpointError(
            f"checkpoint has normalize.* buffers but keys outside 'model.' as well (e.g. {others}); expected the "
            f"layout normalize.mean, normalize.std, model.<weights>")
    if any(k.startswith("normalize.") for k in rest):
        raise CheckpointError("checkpoint nests two input normalizations (normalize.* inside model.*); not supported")
    if norm and set(norm) != {"mean", "std"}:
        raise CheckpointError(f"checkpoint normalize.* entries must be mean and std, got {sorted(norm)}")
    return rest, norm


def check_normalization(
        norm: Mapping[str, torch.Tensor],
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        source: str = "checkpoint",
) -> None:
    """Check that a checkpoint's ``normalize.*`` buffers agree with the model's input normalization.

    Args:
        norm: ``{'mean': ..., 'std': ...}`` from :func:`unwrap_state_dict`, or empty (nothing to check).
        mean: The model's normalization mean, or None if the model does not normalize its input.
        std: The model's normalization std, or None.
        source: Name of the checkpoint for messages.
    """
    if not norm:
        return
    ckpt_mean = [round(float(v), 4) for v in norm["mean"].flatten()]
    ckpt_std = [round(float(v), 4) for v in norm["std"].flatten()]
    if mean is None or std is None:
        raise CheckpointError(
            f"{source} was trained with input normalization (mean={ckpt_mean}, std={ckpt_std}) but the model does "
            f"not normalize its input; create it with normalize=True")
    ok = (norm["mean"].numel() == len(mean) and norm["std"].numel() == len(std)
          and torch.allclose(norm["mean"].flatten().float(), torch.tensor(mean, dtype=torch.float32), atol=1e-4)
          and torch.allclose(norm["std"].flatten().float(), torch.tensor(std, dtype=torch.float32), atol=1e-4))
    if not ok:
        raise CheckpointError(
            f"{source} normalizes inputs with mean={ckpt_mean}, std={ckpt_std} but the model uses "
            f"mean={[round(m, 4) for m in mean]}, std={[round(s, 4) for s in std]}")


def model_input_normalization(model: nn.Module) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` a model normalizes its input with, ``(None, None)`` if it takes raw [0, 1] inputs.

    A model from :func:`rat.models.create_model` says it with its ``normalize`` module (an
    :class:`~rat.models.layers.ImageNormalizer`, or None for raw inputs). A plain timm model (``timm.create_model``)
    has none; its pretrained cfg's mean/std are what its caller normalizes with.
    """
    if "normalize" in model._modules:
        normalizer = model._modules["normalize"]
        if isinstance(normalizer, ImageNormalizer):
            return normalizer.mean_values, normalizer.std_values
        return None, None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("mean"), cfg.get("std")


def filter_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint filter of any timm model, and the first step of every rat family's ``checkpoint_filter_fn``.

    Strips wrapper prefixes and splits off ``normalize.*`` buffers (:func:`unwrap_state_dict`), checks those against
    the model's input normalization (:func:`model_input_normalization`), and resamples an absolute position
    embedding to the model's patch grid (:func:`resample_pos_embed_to_model`): the model is built at the resolution
    it should run at, and the checkpoint adapts to it.

    Args:
        state_dict: Weights in any layout this module's docstring lists.
        model: The target model.

    Returns:
        Weights with the model's timm-style keys (family-specific names still to map).

    Raises:
        CheckpointError: The checkpoint's normalization buffers differ from the model's.
    """
    state_dict, norm = unwrap_state_dict(state_dict)
    check_normalization(norm, *model_input_normalization(model))
    return resample_pos_embed_to_model(state_dict, model)


def is_reference_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether unwrapped weights (:func:`unwrap_state_dict`) come from the reference code: its ConvStem is an
    ``nn.Sequential`` under ``stem.stem.`` (ConvNeXt) or ``patch_embed.proj.stem.`` (ViT), names no other code uses."""
    return any(k.startswith(REFERENCE_STEM_PREFIXES) for k in state_dict)


def remap_reference_stem(state_dict: Mapping[str, torch.Tensor], ref_prefix: str, rat_prefix: str,
                         ) -> dict[str, torch.Tensor]:
    """Rename the reference ConvStem keys (``{ref_prefix}N.*``, an ``nn.Sequential`` of conv, LN, GELU, ...).

    In the reference, sequential index ``3 i`` is conv ``i`` and ``3 i + 1`` its LayerNorm (GELU, at ``3 i + 2``,
    has no parameters; the ViT projection sits at ``3 n``). These map to rat's ``{rat_prefix}i.conv.*`` and
    ``{rat_prefix}i.bn.*``. Keys that do not start with ``ref_prefix`` pass unchanged; a reference stem key at an
    activation index is left as is so that the strict load reports it.

    Args:
        state_dict: Weights with plain timm-style keys.
        ref_prefix: Reference stem prefix, e.g. ``'stem.stem.'`` or ``'patch_embed.proj.stem.'``.
        rat_prefix: rat stem prefix, e.g. ``'stem.'`` or ``'patch_embed.proj.'``.

    Returns:
        The renamed state dict.
    """
    pattern = re.compile(re.escape(ref_prefix) + r"(\d+)\.(weight|bias)$")
    out = {}
    for k, v in state_dict.items():
        match = pattern.match(k)
        if match is not None:
            index, kind = divmod(int(match.group(1)), 3)
            if kind in (0, 1):
                k = f"{rat_prefix}{index}.{'conv' if kind == 0 else 'bn'}.{match.group(2)}"
        out[k] = v
    return out


def resample_pos_embed_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a ViT checkpoint's absolute position embedding to the model's patch grid (square grids only).

    Args:
        state_dict: Inner (timm-style) weights; changed in place and returned.
        model: A timm VisionTransformer (needs ``pos_embed``, ``patch_embed.grid_size``, ``num_prefix_tokens``).

    Returns:
        The state dict.
    """
    pos = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state_dict
    num_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    old_grid = checkpoint_grid_size(pos, num_prefix)
    state_dict["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=list(model.patch_embed.grid_size), old_size=list(old_grid), num_prefix_tokens=num_prefix)
    _logger.info("Resampled pos_embed from grid %s to %s", old_grid, tuple(model.patch_embed.grid_size))
    return state_dict


def checkpoint_grid_size(pos_embed: torch.Tensor, num_prefix_tokens: int) -> tuple[int, int]:
    """Square patch grid of a position embedding ``(1, prefix + H * W, dim)``."""
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or side * side != num_patches:
        raise CheckpointError(
            f"checkpoint pos_embed has {pos_embed.shape[1]} tokens ({num_prefix_tokens} prefix): not a square patch "
            f"grid, cannot infer its resolution")
    return side, side


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                           hint: str = "") -> None:
    """Load weights strictly, reporting every missing, unexpected and mis-shaped key in one error.

    Args:
        model: Target module.
        state_dict: Weights whose keys must equal ``model.state_dict()``'s exactly.
        source: Name of the checkpoint for messages.
        hint: Extra sentence appended to the error (e.g. how the checkpoint was created).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        def _fmt(keys: list[str]) -> str:
            shown = ", ".join(keys[:12])
            return shown + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        parts = [f"{source} does not match {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_fmt(mismatched)}")
        if hint:
            parts.append(hint)
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
