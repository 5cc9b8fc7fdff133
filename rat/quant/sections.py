"""The fastargs Sections of ``python -m rat.quant SUBCOMMAND``: one declare function per subcommand."""
from __future__ import annotations

from collections.abc import Callable

from fastargs import Param, Section
from fastargs.validation import OneOf

from rat.attacks import NORMS
from rat.config import CommaList, Flag, PositiveFloat, Progress, float_in, int_in
from rat.logging import PROGRESS_HELP

QUANT_SUBCOMMANDS = ("ptq", "sweep", "fit", "generate", "estimate")


def _declare_quant_model() -> None:
    Section("qmodel", "The full-precision model (a rat checkpoint: arch and model_kwargs come from it)").params(
        checkpoint=Param(str, "rat trainer checkpoint (required)", default=""),
        use_ema=Param(Flag(), "1: the checkpoint's EMA weights", default=0),
        resolution=Param(int_in(0), "input side; 0 = the checkpoint's training resolution", default=0),
        device=Param(OneOf(["auto", "cpu", "cuda"]), "auto = cuda when available", default="auto"),
        batch_size=Param(int_in(1), "images per forward pass", default=100),
    )


def _declare_quant_data(eval_data: bool, calib: bool, split: bool = False) -> None:
    params = {"demo_root": Param(str, "where the demo betons live; empty = ~/.cache/rat/demo", default=""),
              "num_workers": Param(int_in(0), "loader workers", default=2)}
    if eval_data and split:  # estimate: the score part of the guide/score split (docs/quant.md)
        params["data"] = Param(str, "val .beton or ImageNet-style folder, the one generate's guide images came "
                               "from; empty = the demo val set", default="")
        params["n_ex"] = Param(int_in(1), "scoring images: the next n_ex of rat.eval's seeded order after the guide "
                               "part", default=200)
        params["guide_n"] = Param(int_in(-1), "images of the guide part the scoring images skip; -1 = the generated "
                                  "set's recorded guide part", default=-1)
    elif eval_data:
        params["data"] = Param(str, "val .beton or ImageNet-style folder; empty = the demo val set", default="")
        params["n_ex"] = Param(int_in(1), "evaluation images (the fixed subset of rat.eval)", default=300)
    if calib:
        params["calib_data"] = Param(str, "calibration .beton or folder; empty = the demo train set", default="")
        params["calib_n"] = Param(int_in(1), "calibration images", default=256)
    Section("qdata", "Images for calibration and evaluation").params(**params)


def _declare_quant_attack() -> None:
    Section("qattack", "Robust accuracy: APGD-CE, optionally AutoAttack").params(
        norm=Param(OneOf(NORMS), "threat model", default="Linf"),
        eps=Param(float_in(0), "radius in [0,1] pixel units; 0 = Linf 4/255, L2 2, L1 75", default=0.0),
        n_iter=Param(int_in(1), "APGD steps", default=10),
        autoattack=Param(OneOf(["", "fast", "standard"]), "'' = off, else AutoAttack version", default=""),
        seed=Param(int_in(0), "attack seed", default=0),
    )


def _declare_quant_scheme() -> None:
    Section("qscheme", "How layers are quantized (the seed's scheme by default)").params(
        fold_bn=Param(Flag(), "1: fold each BatchNorm into the convolution before it, then quantize", default=1),
        quant_bias=Param(Flag(), "1: quantize biases at the accumulator scale (INT32 for INT, bfloat16 for FLOAT/POT); "
                         "0: keep them in float", default=1),
    )


def declare_quant_sections(subcommand: str) -> Callable[[], None]:
    """The ``declare`` function (for :func:`make_config`) of one ``python -m rat.quant`` subcommand."""
    def ptq() -> None:
        _declare_quant_model()
        _declare_quant_data(eval_data=False, calib=True)
        _declare_quant_scheme()
        Section("ptq", "Post-training quantization to one format").params(
            format=Param(str, "INT<b> (2-16), POT<b> (2-8) or FLOAT<b>_E<e>M<m> (3-8), e.g. int8, float8_e4m3",
                         default=""),
            output=Param(str, "quantized checkpoint to write (must not exist)", default=""),
        )

    def sweep() -> None:
        _declare_quant_model()
        _declare_quant_data(eval_data=True, calib=True)
        _declare_quant_attack()
        _declare_quant_scheme()
        Section("sweep", "Every format and bit width for one model").params(
            kinds=Param(CommaList(OneOf(["INT", "POT", "FLOAT", "int", "pot", "float"]), "formats"),
                        "format families of the grid (INT 2-16, POT 2-8, FLOAT 3-8 with every e)",
                        default="INT,POT,FLOAT"),
            formats=Param(str, "comma-separated formats instead of the grid, e.g. int8,int4,pot4", default=""),
            name=Param(str, "model name in the results; empty = the checkpoint's run folder", default=""),
            output=Param(str, "results folder: sweep.jsonl and sweep.csv (must not hold a sweep.jsonl)",
                         default=""),
            progress=Param(Progress(), PROGRESS_HELP, default="auto"),
            same_grid=Param(Flag(), "1: also evaluate formats whose grid equals an earlier one's (FLOAT E1 = INT, "
                            "FLOAT M0 = POT; recorded with same_grid_as, left out of fits); 0: skip them", default=1),
            bins=Param(int_in(2), "bins of the histogram similarity (recorded as hist_js_*)", default=256),
        )

    def fit() -> None:
        Section("fit", "Fit accuracy loss against weight similarity across sweeps").params(
            sweeps=Param(str, "comma-separated sweep.jsonl files (one or more models)", default=""),
            similarity=Param(OneOf(["js_flops", "js_param", "js_flops_wt_log", "js_flops_wt_cbrt", "hist_js_flops",
                                    "hist_js_param", "hist_js_flops_wt_log", "hist_js_flops_wt_cbrt"]),
                             "x axis of the plot: the seed's softmax JS (js_*) or the histogram JS (hist_js_*), "
                             "weighted by FLOPs, parameters, FLOPs x log10(MACs) or FLOPs x MACs^(1/3)",
                             default="js_flops"),
            output=Param(str, "plot (.png); the fit summary goes next to it as .json", default=""),
        )

    def generate() -> None:
        _declare_quant_model()
        _declare_quant_attack()
        Section("qdata", "Real images: the guide part that sets the adjustment's targets, and your own unlabeled "
                "images for the activation statistics of a model without BatchNorm").params(
            data=Param(str, "val .beton or ImageNet-style folder the guide part comes from; empty = the demo val set",
                       default=""),
            guide_n=Param(int_in(1), "guide images: the first guide_n of rat.eval's seeded order of qdata.data "
                          "(estimate scores only on images after them)", default=100),
            demo_root=Param(str, "where the demo betons live; empty = ~/.cache/rat/demo", default=""),
            stats_data=Param(str, ".beton or folder; empty for BatchNorm models", default=""),
            stats_n=Param(int_in(1), "images to record statistics on", default=256),
            num_workers=Param(int_in(0), "loader workers", default=2),
        )
        Section("generate", "Train and adjust the label-conditioned generator").params(
            target_clean=Param(float_in(-1, 100), "the model's real clean accuracy in %, measured on the guide part "
                               "(qdata.guide_n images of qdata.data); -1 = rat measures it there", default=-1.0),
            target_robust=Param(float_in(-1, 100), "its real robust accuracy in % on the guide part (APGD, qattack's "
                                "threat model); -1 = rat measures it there", default=-1.0),
            steps=Param(int_in(1), "stage-1 training steps", default=400),
            rounds=Param(int_in(0), "adjustment rounds (0 = no adjustment)", default=8),
            steps_per_round=Param(int_in(1), "generator steps per adjustment round", default=40),
            batch_size=Param(int_in(2), "generated images per step", default=64),
            lr=Param(PositiveFloat(), "Adam learning rate", default=1e-3),
            mix=Param(float_in(0, 1), "initial share of inter-class samples", default=0.2),
            stat_weight=Param(float_in(0), "weight of the feature-statistics term", default=1.0),
            width=Param(int_in(4), "channels of the generator's first feature map (its cost grows with the square)",
                        default=128),
            n_samples=Param(int_in(1), "images in the generated set", default=1000),
            tolerance=Param(float_in(0), "stop adjusting once clean and robust are this close (points)", default=1.0),
            seed=Param(int_in(0), "seed", default=0),
            output=Param(str, "generated set (.pt, must not exist): images, labels, generator", default=""),
            progress=Param(Progress(), PROGRESS_HELP, default="auto"),
        )

    def estimate() -> None:
        _declare_quant_model()
        _declare_quant_data(eval_data=True, calib=False, split=True)
        _declare_quant_attack()
        _declare_quant_scheme()
        Section("estimate", "Clean/robust accuracy of FP and quantized models on a generated set").params(
            generated=Param(str, "generated set from `generate`", default=""),
            formats=Param(str, "comma-separated formats to estimate, e.g. int8,int4,pot4,float6_e3m2", default=""),
            real=Param(Flag(), "1: also measure on qdata.data (or the demo val set) and report the errors", default=0),
            output=Param(str, "results JSON (must not exist)", default=""),
        )

    return {"ptq": ptq, "sweep": sweep, "fit": fit, "generate": generate, "estimate": estimate}[subcommand]
