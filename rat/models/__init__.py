"""rat models: ConvStem ViTs and ConvNeXts as timm models, one [0, 1]-input factory, safe strict checkpoint loading.

Importing this package registers the ``*_cvst`` architectures with timm (``timm.list_models('*_cvst')``).
"""
from .checkpoint import CheckpointError, load_checkpoint_file, select_state_dict, unwrap_state_dict
from .convnext_cvst import ConvNeXtCvSt
from .convnext_iso_cvst import ConvNeXtIsotropicCvSt
from .factory import (
    RELEASE_NORMALIZATION,
    add_input_normalization,
    checkpoint_filter,
    checkpoint_model_kwargs,
    create_model,
    create_model_from_checkpoint,
    dynamic_size_kwargs,
    resolve_normalization,
)
from .flops import count_flops, count_params
from .layers import ConvStem, ImageNormalizer
from .vit_cvst import ConvStemPatchEmbed

__all__ = [
    "CheckpointError",
    "ConvNeXtCvSt",
    "ConvNeXtIsotropicCvSt",
    "ConvStem",
    "ConvStemPatchEmbed",
    "ImageNormalizer",
    "RELEASE_NORMALIZATION",
    "add_input_normalization",
    "checkpoint_filter",
    "checkpoint_model_kwargs",
    "count_flops",
    "count_params",
    "create_model",
    "create_model_from_checkpoint",
    "dynamic_size_kwargs",
    "load_checkpoint_file",
    "resolve_normalization",
    "select_state_dict",
    "unwrap_state_dict",
]
