"""Print parameters and forward FLOPs of models, e.g. `python tools/model_info.py convnext_tiny_cvst --res 224`.

FLOPs come from torch's FlopCounterMode on the meta device (no weights are allocated, any model size is quick):
one multiply-add is 2 FLOPs, so `gmacs` (= FLOPs / 2) is what fvcore-based tables such as the paper's call "GFLOPs".
A training step (forward + backward) costs about 3x the forward FLOPs; use that for MFU.
"""
from __future__ import annotations

import argparse
import json
import logging

import timm
import torch

import rat.models as rat_models
from rat.logging import logging_scope, setup_logging

_logger = logging.getLogger("rat.tools.model_info")


def model_info(name: str, res: int, num_classes: int | None = None, normalize: bool = True) -> dict:
    """Parameters and forward FLOPs (batch 1) of ``rat.models.create_model(name, img_size=res)``."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.device("meta"):
        model = rat_models.create_model(name, img_size=res, normalize=normalize, **kwargs)
    flops = rat_models.count_flops(model, res)
    return {
        "model": name,
        "res": res,
        "params": rat_models.count_params(model),
        "flops": flops,
        "gflops": round(flops / 1e9, 3),
        "gmacs": round(flops / 2e9, 3),
    }


@logging_scope()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="model names; default: every rat *_cvst model")
    parser.add_argument("--res", type=int, nargs="+", default=[224], help="input resolution(s) (default 224)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the cfg's)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a text summary")
    args = parser.parse_args(argv)
    setup_logging(level=logging.WARNING)
    names = args.names or timm.list_models("*_cvst")
    for name in names:
        if not timm.is_model(name):
            parser.error(f"unknown model '{name}' (rat's models: {', '.join(timm.list_models('*_cvst'))})")
    for name in names:
        for res in args.res:
            info = model_info(name, res, num_classes=args.num_classes)
            if args.json:
                print(json.dumps(info))
            else:
                print(f"{name:28s} res {res:4d}  params {info['params']:>13,d}  "
                      f"forward {info['gflops']:8.3f} GFLOPs ({info['gmacs']:.3f} GMACs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
