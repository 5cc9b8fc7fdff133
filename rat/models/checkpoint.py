"""The one reader of a checkpoint: what it holds, the model it rebuilds, and the records that change how it is built.

Every checkpoint → model path goes through here: :func:`read_checkpoint` reads a file (or a loaded dict) once into a
:class:`RatCheckpoint` (the weights in any layout :mod:`rat.models.weights` understands, the EMA choice, and what a rat
checkpoint records: ``arch``, ``model_kwargs`` with the training ``img_size``, the training ``config``, the
``classes``, a ``quant`` record); :meth:`RatCheckpoint.recipe` resolves the model to build (architecture, kwargs,
input normalization and where it comes from) into a :class:`ModelRecipe`; ``rat.models.build_model`` builds it, the
one way to do so. ``rat.train`` and ``rat.quant.ptq`` write checkpoints; rat.eval, rat.quant and
``create_model(..., checkpoint=...)`` read them only here.

A record is a checkpoint entry that changes how its model is built beyond the weights (``quant``: rat.quant's
activation quantizers). The module that writes a record registers its builder (:func:`register_record_builder`);
:data:`RECORD_MODULES` names that module for each record, and :func:`apply_records` imports it when it meets the
record, so that a reader in a lower layer (rat.eval) needs no import of the writer (rat.quant). Only the modules of
this fixed table are ever imported, never a name read from a file.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import get_arch_name, is_model
from torch import nn

from .weights import CheckpointError, is_reference_layout, load_checkpoint_file, select_state_dict, unwrap_state_dict

_logger = logging.getLogger(__name__)

__all__ = [
    "NORMALIZE_HINT", "RECORD_MODULES", "RELEASE_NORMALIZATION", "ModelRecipe", "RatCheckpoint", "apply_records",
    "read_checkpoint", "register_record_builder", "resolve_normalization",
]

# Input normalization of the paper's released checkpoints (Singh, Croce & Hein 2023, github.com/nmndeep/revisiting-at),
# for files in the reference layout that carry no normalize.* buffers. The reference normalizes only through
# normalize_model(), whose buffers are saved with the weights, and its training script passes
# --model.add_normalization 0. RobustBench's loader (model_zoo/imagenet.py, get_convstem_models) builds the
# Singh2023Revisiting_{ConvNeXt-T,S,B,L,ViT-B}-ConvStem models without normalization and ViT-S-ConvStem inside
# normalize_model(IMAGENET_MEAN, IMAGENET_STD). ViT-M-CvSt and ConvNeXt-iso-CvSt are not in RobustBench; their
# releases follow the training script.
RELEASE_NORMALIZATION: dict[str, bool] = {
    "convnext_tiny_cvst": False,
    "convnext_small_cvst": False,
    "convnext_base_cvst": False,
    "convnext_large_cvst": False,
    "convnext_iso_small_cvst": False,
    "vit_small_patch16_cvst": True,
    "vit_medium_patch16_cvst": False,
    "vit_base_patch16_cvst": False,
}
NORMALIZE_HINT = ("pass normalize=True (ImageNet mean/std inside the model) or normalize=False (raw [0, 1] inputs); "
                  "on the command line --normalize 1 or --normalize 0")

# Record → the module that registers its builder when imported (the record's writer).
RECORD_MODULES: dict[str, str] = {"quant": "rat.quant.ptq"}
RecordBuilder = Callable[["RatCheckpoint", nn.Module], nn.Module]
_RECORD_BUILDERS: dict[str, RecordBuilder] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class RatCheckpoint:
    """A checkpoint as read by :func:`read_checkpoint`: the facts it holds, nothing resolved yet.

    Attributes:
        source: its name in messages: the path, or ``'checkpoint'`` for a dict.
        entries: everything it holds (weights, optimizer state, ...), as read.
        use_ema: :attr:`weights` are the EMA weights.
        arch: the recorded architecture (a rat checkpoint); None for a file that does not name it.
        model_kwargs: the recorded ``create_model`` kwargs; None when not recorded.
        resolution: the training resolution (``model_kwargs['img_size']``); None when not recorded.
        config: the training configuration (``rat.train``'s sections); None when not recorded.
        classes: the class names, label order; None when not recorded.
        records: the entries that change how the model is built (:data:`RECORD_MODULES`), e.g. ``{'quant': ...}``.
    """

    source: str
    entries: Mapping[str, Any] = dataclasses.field(repr=False)
    use_ema: bool = False
    arch: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
    resolution: int | None = None
    config: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False)
    classes: list[str] | None = dataclasses.field(default=None, repr=False)
    records: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict to load (EMA or not; keys unchanged). Selected on first use: an EMA-less file fails here."""
        return select_state_dict(self.entries, use_ema=self.use_ema)

    @property
    def trained_without_ema(self) -> bool:
        """A rat trainer checkpoint of a run without EMA (it records ``model_ema: None``)."""
        return "model_ema" in self.entries and self.entries["model_ema"] is None

    def check_arch(self, name: str) -> None:
        """Refuse loading into ``name`` when the recorded architecture is another one (a pretrained tag may differ)."""
        if self.arch is not None and is_model(self.arch) and get_arch_name(self.arch) != get_arch_name(name):
            raise CheckpointError(f"{self.source} holds a '{self.arch}' model, not '{name}'")

    def says_normalization(self, name: str) -> tuple[bool | None, str, bool]:
        """What the checkpoint says about the input normalization of its model, loaded as ``name``.

        In order: a rat trainer checkpoint's ``model_kwargs['normalize']``; ``normalize.mean/std`` buffers in the
        weights (normalization on); a revisiting-at release in the reference layout of one of the paper's
        architectures (:data:`RELEASE_NORMALIZATION`). Anything else does not say.

        Returns:
            ``(normalize, reason, recorded)``: ``recorded`` is True when the file itself records it (trainer record,
            buffers) and False for the release table; ``(None, '', False)`` when the checkpoint does not say.
        """
        weights = self.weights  # first: a checkpoint without the weights asked for (EMA) fails before anything else
        if self.model_kwargs is not None and "normalize" in self.model_kwargs:
            return bool(self.model_kwargs["normalize"]), "recorded in the checkpoint (model_kwargs)", True
        inner, norm = unwrap_state_dict(weights)
        if norm:
            return True, "the checkpoint carries normalize.mean/std", True
        arch = get_arch_name(name)
        if arch in RELEASE_NORMALIZATION and is_reference_layout(inner):
            why = f"paper release of {arch} (reference layout, rat's release table)"
            return RELEASE_NORMALIZATION[arch], why, False
        return None, "", False

    def recipe(self, arch: str | None = None, *, normalize: bool | None = None, **overrides: Any) -> ModelRecipe:
        """The model this checkpoint rebuilds: its recorded ``arch`` and ``model_kwargs`` (recorded only with an
        ``arch``) with ``overrides`` applied, ``img_size`` taken out as the training resolution, and the input
        normalization resolved once (:func:`resolve_normalization`).

        Args:
            arch: the architecture for a file that does not record one (else checked against the record).
            normalize: the input normalization asked for; None: what the checkpoint says.
            **overrides: replace entries of the recorded ``model_kwargs`` (e.g. ``num_classes``, ``drop_path_rate``).

        Raises:
            CheckpointError: no architecture, another one, or an input normalization the checkpoint does not say or
                contradicts.
        """
        name = arch if arch is not None else self.arch
        if name is None:
            raise CheckpointError(f"{self.source} does not name its architecture: pass the architecture it holds")
        self.check_arch(name)
        kwargs = dict(self.model_kwargs) if self.arch is not None and self.model_kwargs is not None else {}
        kwargs.update(overrides)
        kwargs.pop("normalize", None)
        img_size = kwargs.pop("img_size", None)
        if isinstance(img_size, (tuple, list)):
            img_size = int(img_size[-1])
        kwargs["normalize"], why = resolve_normalization(name, self, normalize)
        return ModelRecipe(name, kwargs, img_size, why, self)


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """What ``rat.models.build_model`` builds.

    Attributes:
        arch: a registered timm model name.
        model_kwargs: ``create_model`` kwargs, ``normalize`` (resolved) included, ``img_size`` not.
        resolution: the checkpoint's training resolution, if it records one (or the kwargs override it).
        normalization: where the input normalization comes from (for logs and results).
        checkpoint: the weights to load; None for a fresh model.
    """

    arch: str
    model_kwargs: Mapping[str, Any]
    resolution: int | None = None
    normalization: str = ""
    checkpoint: RatCheckpoint | None = dataclasses.field(default=None, repr=False)


def read_checkpoint(checkpoint: str | Path | Mapping[str, Any], *, use_ema: bool = False) -> RatCheckpoint:
    """Read a checkpoint once: a path (torch or ``.safetensors``, read without executing anything,
    :func:`~rat.models.weights.load_checkpoint_file`) or an already loaded dict.

    Args:
        checkpoint: a rat trainer or rat.quant checkpoint, a bare state dict (rat or timm keys) or a revisiting-at
            release.
        use_ema: the EMA weights (``model_ema``/``state_dict_ema``) are the ones to load.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is unsafe, unreadable or not a dict.
    """
    if isinstance(checkpoint, Mapping):
        source, entries = "checkpoint", dict(checkpoint)
    else:
        source, entries = str(checkpoint), load_checkpoint_file(checkpoint)
    arch = entries.get("arch") if isinstance(entries.get("arch"), str) else None
    kwargs = dict(entries["model_kwargs"]) if isinstance(entries.get("model_kwargs"), Mapping) else None
    size = (kwargs or {}).get("img_size")
    resolution = int(size[-1] if isinstance(size, (list, tuple)) else size) if size else None
    config = entries.get("config") if isinstance(entries.get("config"), Mapping) else None
    classes = entries.get("classes") if isinstance(entries.get("classes"), list) else None
    records = {name: dict(entries[name]) for name in RECORD_MODULES if isinstance(entries.get(name), Mapping)}
    return RatCheckpoint(source, entries, bool(use_ema), arch, kwargs, resolution, config, classes, records)


def resolve_normalization(name: str, checkpoint: RatCheckpoint | None, normalize: bool | None) -> tuple[bool, str]:
    """The input normalization a model runs with: what the checkpoint says, or the explicit ``normalize``.

    Without a checkpoint, ``None`` means True (a fresh model normalizes with its cfg's mean/std). A checkpoint that does
    not say needs an explicit value; an explicit value that contradicts the checkpoint's record or buffers is an
    error, one that contradicts the release table wins (with a warning).

    Returns:
        ``(normalize, reason)``.

    Raises:
        CheckpointError: the checkpoint does not say and ``normalize`` is None, or they disagree.
    """
    if checkpoint is None:
        return (True, "default for a model without checkpoint") if normalize is None else (bool(normalize), "given")
    source = checkpoint.source
    said, why, recorded = checkpoint.says_normalization(name)
    if normalize is None:
        if said is None:
            raise CheckpointError(f"{source} does not record whether its model normalizes its input: {NORMALIZE_HINT}")
        return said, why
    normalize = bool(normalize)
    if said is not None and said != normalize:
        if not recorded:
            _logger.warning("%s: normalize=%s given although the %s says %s", source, normalize, why, said)
            return normalize, "given (overrides the release table)"
        raise CheckpointError(f"{source}: {why}, normalize={said}, but normalize={normalize} was given; create it "
                              f"with normalize={said} (or leave normalize out)")
    return normalize, "given" if said is None else why


def register_record_builder(record: str, builder: RecordBuilder) -> None:
    """Register how a checkpoint's ``record`` is built into its model: ``builder(checkpoint, model)`` gets the model
    with the checkpoint's weights loaded and returns the model as deployed. Called by the module
    :data:`RECORD_MODULES` names for ``record``, when it is imported."""
    if record not in RECORD_MODULES:
        raise ValueError(f"unknown checkpoint record {record!r}: add it to rat.models.checkpoint.RECORD_MODULES")
    _RECORD_BUILDERS[record] = builder


def apply_records(checkpoint: RatCheckpoint, model: nn.Module) -> nn.Module:
    """The model as the checkpoint deploys it: every record's builder applied in turn (the builder's module imported
    from :data:`RECORD_MODULES` on first use); the model itself when the checkpoint has no record."""
    for record in checkpoint.records:
        if record not in _RECORD_BUILDERS:
            importlib.import_module(RECORD_MODULES[record])  # registers the builder
        model = _RECORD_BUILDERS[record](checkpoint, model)
    return model
