"""What the ``python -m rat.quant`` subcommands share: the model from its checkpoint (through rat.models' one reader),
the image sources and their fixed subsets, the attack, and outputs that are never overwritten."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rat.attacks import DEFAULT_EPS, check_eps
from rat.config import ConfigError
from rat.models import CheckpointError
from rat.quant.ptq import QuantizationError

__all__ = ["attack_spec", "data_paths", "fresh_output", "load_images", "load_model", "pick_device", "read_images",
           "split_indices"]

_logger = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("qmodel.device=cuda but no CUDA device is available: use auto or cpu")
    return torch.device(name)


def fresh_output(path: str, key: str) -> Path:
    if not path:
        raise ConfigError(f"{key} is required")
    out = Path(path)
    if out.exists():
        raise FileExistsError(f"{key}={out} exists: rat.quant never overwrites results, pick another path")
    taken = next((p for p in out.parents if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise FileExistsError(f"{key}: {taken} is a file, not a folder, so {out} cannot be written: pick another path")
    return out


def _demo_paths(configured: str) -> tuple[Path, Path]:
    from rat.data.demo import demo_root, ensure_demo_betons

    return ensure_demo_betons(demo_root(configured))


def load_images(path: str | Path, n: int, resolution: int, device: torch.device, num_workers: int, key: str,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ``n``-image subset (rat.eval's rule) of a beton or folder, as [0, 1] tensors on ``device``."""
    from rat.eval.data import dataset_size, eval_subset

    total = dataset_size(path)
    if n > total:
        raise QuantizationError(f"{key}: {path} has {total} images, fewer than the {n} asked for: lower the count")
    return read_images(path, eval_subset(total, n), resolution, device, num_workers)


def split_indices(total: int, guide_n: int, score_n: int) -> tuple[np.ndarray, np.ndarray]:
    """The guide/score split of an evaluation source of ``total`` images (docs/quant.md): the guide part is rat.eval's
    seeded subset of ``guide_n`` images, the score part the next ``score_n`` images of the same seeded order, so the
    two share no image by construction.

    Raises:
        QuantizationError: the two parts do not fit in the source.
    """
    from rat.eval.data import eval_subset

    if guide_n + score_n > total:
        raise QuantizationError(f"the source has {total} images, fewer than the {guide_n} guide + {score_n} scoring "
                                "images asked for: lower qdata.guide_n or qdata.n_ex")
    guide = eval_subset(total, guide_n) if guide_n else np.zeros(0, dtype=np.int64)
    score = np.setdiff1d(eval_subset(total, guide_n + score_n), guide) if score_n else np.zeros(0, dtype=np.int64)
    return guide, score


def read_images(path: str | Path, indices: np.ndarray, resolution: int, device: torch.device, num_workers: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``indices`` of a beton or folder, as [0, 1] tensors on ``device``."""
    from rat.eval.data import iter_eval_batches

    xs, ys = [], []
    for x, y in iter_eval_batches(path, indices, [len(indices)], resolution=resolution, device=device,
                                  num_workers=num_workers):
        xs.append(x.float().contiguous())
        ys.append(y.long())
    return torch.cat(xs), torch.cat(ys)


def load_model(qmodel: dict[str, Any], device: torch.device, labeled: tuple[str, ...] = (),
               ) -> tuple[torch.nn.Module, dict[str, Any], int]:
    """The full-precision model, what it is (``arch``, ``model_kwargs``, ``checkpoint``) and its resolution (asked,
    else the checkpoint's training resolution, else rat.eval's default), read with ``rat.models.read_checkpoint``;
    the checkpoint's classes are checked against those of each ``labeled`` source (whose labels will be compared with
    its predictions)."""
    from rat.data.meta import check_checkpoint_classes
    from rat.eval.spec import DEFAULT_RESOLUTION
    from rat.models import create_model_from_checkpoint, read_checkpoint

    if not qmodel["checkpoint"]:
        raise ConfigError("qmodel.checkpoint is required (a rat trainer checkpoint)")
    ckpt = read_checkpoint(qmodel["checkpoint"], use_ema=bool(qmodel["use_ema"]))
    if ckpt.arch is None:
        raise CheckpointError(f"{qmodel['checkpoint']} does not name its architecture: rat.quant needs a rat trainer "
                              "checkpoint (arch + model_kwargs)")
    for path in labeled:
        check_checkpoint_classes(ckpt.classes, (ckpt.model_kwargs or {}).get("num_classes"),
                                 f"checkpoint {qmodel['checkpoint']}", path,
                                 fix="score the model on the data it was trained for (or pass its checkpoint)")
    resolution = qmodel["resolution"] or ckpt.resolution or DEFAULT_RESOLUTION
    model = create_model_from_checkpoint(ckpt, img_size=resolution)
    model = model.to(device).eval()
    model.requires_grad_(False)
    meta = {"arch": ckpt.arch, "model_kwargs": dict(ckpt.model_kwargs), "checkpoint": qmodel["checkpoint"]}
    return model, meta, resolution


def attack_spec(cfg: dict[str, Any], resolution: int):
    from rat.quant.sweep import AttackSpec

    a = cfg["qattack"]
    eps = a["eps"] or DEFAULT_EPS[a["norm"]]
    try:
        warning = check_eps(a["norm"], eps, resolution)
    except ValueError as exc:
        raise ConfigError(f"qattack.eps: {exc}") from exc
    if warning:
        _logger.warning("qattack.eps: %s", warning)
    return AttackSpec(norm=a["norm"], eps=eps, n_iter=a["n_iter"],
                      autoattack=a["autoattack"], seed=a["seed"])


def data_paths(cfg: dict[str, Any]) -> tuple[str, str]:
    """(calibration, evaluation) image sources; the demo train/val betons for those left empty."""
    data = cfg["qdata"]
    calib, val = data.get("calib_data", ""), data.get("data", "")
    for key, path in (("calib_data", calib), ("data", val)):
        if path and not Path(path).exists():
            raise ConfigError(f"qdata.{key}={path} does not exist: pass a .beton or an ImageNet-style folder (one "
                              "subfolder of images per class), or leave it empty for the demo data")
        if path and Path(path).is_file():  # a file must be a rat beton (a folder is listed when it is read)
            from rat.data import read_beton_info

            try:
                read_beton_info(path)
            except (ValueError, FileNotFoundError) as exc:
                raise ConfigError(f"qdata.{key}={path} is not a usable .beton (pass a beton or an image folder): "
                                  f"{exc}") from exc
        elif path:  # a folder: listed as rat.eval lists it (by real path: links back into it refused)
            from rat.data import list_image_folder

            try:
                list_image_folder(path)
            except ValueError as exc:
                raise ConfigError(f"qdata.{key}: {exc}") from exc
    if ("calib_data" in data and not calib) or ("data" in data and not val):
        train_beton, val_beton = _demo_paths(data["demo_root"])
        calib, val = calib or str(train_beton), val or str(val_beton)
    return calib, val
