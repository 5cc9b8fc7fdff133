"""rat models: ConvStem ViTs and ConvNeXts as timm models, one [0, 1]-input factory, safe strict checkpoint loading.

Importing this package registers the ``*_cvst`` architectures with timm (``timm.list_models('*_cvst')``).
"""
from .checkpoint import (
    RELEASE_NORMALIZATION,
    ModelRecipe,
    RatCheckpoint,
    read_checkpoint,
    register_record_builder,
    resolve_normalization,
)
from .convnext_cvst import ConvNeXtCvSt
from .convnext_iso_cvst import ConvNeXtIsotropicCvSt
from .factory import (
    add_input_normalization,
    build_model,
    checkpoint_filter,
    create_model,
    create_model_from_checkpoint,
    dynamic_size_kwargs,
)
from .flops import count_flops, count_params
from .layers import ConvStem, ImageNormalizer
from .vit_cvst import ConvStemPatchEmbed
from .weights import CheckpointError, load_checkpoint_file, select_state_dict, unwrap_state_dict

__all__ = [
    "CheckpointError",
    "ConvNeXtCvSt",
    "ConvNeXtIsotropicCvSt",
    "ConvStem",
    "ConvStemPatchEmbed",
    "ImageNormalizer",
    "ModelRecipe",
    "RELEASE_NORMALIZATION",
    "RatCheckpoint",
    "add_input_normalization",
    "build_model",
    "checkpoint_filter",
    "count_flops",
    "count_params",
    "create_model",
    "create_model_from_checkpoint",
    "dynamic_size_kwargs",
    "load_checkpoint_file",
    "read_checkpoint",
    "register_record_builder",
    "resolve_normalization",
    "select_state_dict",
    "unwrap_state_dict",
]
