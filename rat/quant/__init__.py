"""rat.quant: robustness after deployment — simulated post-training quantization (INT, POT, FLOAT formats), sweeps
of accuracy and robust accuracy over formats and bit widths, a fit of accuracy loss against weight similarity, and
data-free robustness estimation with a label-conditioned generator. CLI: ``python -m rat.quant``; see docs/quant.md.
"""
from rat.quant.fit import FitError, fit_curve, fit_sweeps, fit_table, load_records, plot_fits
from rat.quant.formats import (
    BIT_RANGES,
    FORMATS,
    FormatError,
    QuantFormat,
    fake_quantize,
    parse_format,
    quantize_bias,
    same_grid_as,
    sweep_grid,
)
from rat.quant.generator import (
    GeneratorError,
    LabelGenerator,
    adjust_generator,
    label_accuracy,
    record_norm_stats,
    sample,
    stat_targets,
    train_generator,
)
from rat.quant.ptq import (
    MIN_CALIB_IMAGES,
    QuantizationError,
    QuantizedModel,
    calibrate,
    fold_batchnorm,
    layer_tensors,
    load_quantized_model,
    quantizable_layers,
    quantize_model,
    save_quantized_checkpoint,
)
from rat.quant.similarity import js_histogram, js_softmax, layer_flops, layer_params, model_macs, model_similarity
from rat.quant.sweep import AttackSpec, accuracy, evaluate_point, robust_accuracy, run_sweep, write_csv

__all__ = [
    "BIT_RANGES", "FORMATS", "MIN_CALIB_IMAGES", "AttackSpec", "FitError", "FormatError", "GeneratorError",
    "LabelGenerator", "QuantFormat", "QuantizationError", "QuantizedModel", "accuracy", "adjust_generator",
    "calibrate", "evaluate_point", "fake_quantize", "fit_curve", "fit_sweeps", "fit_table", "fold_batchnorm",
    "js_histogram", "js_softmax", "label_accuracy", "layer_flops", "layer_params", "layer_tensors",
    "load_quantized_model", "load_records", "model_macs", "model_similarity", "parse_format", "plot_fits",
    "quantizable_layers", "quantize_bias", "quantize_model", "record_norm_stats", "robust_accuracy", "run_sweep",
    "sample", "same_grid_as", "save_quantized_checkpoint", "stat_targets", "sweep_grid", "train_generator",
    "write_csv",
]
