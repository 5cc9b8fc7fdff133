"""Write an ImageNet-style folder or a CIFAR archive to an FFCV ``.beton`` and its classes file.

Flags follow ffcv-imagenet's ``write_imagenet.py`` (``--cfg.*``). Examples::

    # ImageNet: <data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG
    python tools/write_ffcv.py --cfg.data_dir=/data/imagenet --cfg.split=train --cfg.write_path=/data/ffcv/train.beton
    python tools/write_ffcv.py --cfg.data_dir=/data/imagenet --cfg.split=val --cfg.write_path=/data/ffcv/val.beton \\
        --cfg.classes_from=/data/ffcv/train.beton
    # any folder of class sub-directories
    python tools/write_ffcv.py --cfg.data_dir=/data/my_classes --cfg.write_path=/data/my.beton
    # CIFAR-10/100 from the python archive
    python tools/write_ffcv.py --cfg.dataset=cifar10 --cfg.data_dir=cifar-10-python.tar.gz --cfg.split=train \\
        --cfg.write_path=/data/cifar10_train.beton

Recommended (the defaults): train sets at longest side 256 with half the images JPEG q90 and half raw
(``max_resolution=-1`` picks 256 for train), which decodes ~4x faster than full-size JPEGs. Val sets
(``--cfg.split=val``) keep the original pixels: raw, full size, so that ``rat.eval`` applies RobustBench's
preprocessing (bicubic resize + center crop) to exactly the images a folder would give (docs/eval.md; ImageNet val
takes ~25 GB this way). CIFAR is stored raw at 32 px. At the end the
tool prints one JSON line: samples, classes, the converted files, and every unreadable file by name.
Exit status: 0 written, 1 written with unreadable files left out, 2 bad arguments or failed write.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fastargs import Config, Param, Section, set_current_config
from fastargs.decorators import param, section
from fastargs.validation import And, InRange, OneOf

from rat.config import FiniteFloat, Progress
from rat.logging import PROGRESS_HELP, logging_scope, setup_logging

_logger = logging.getLogger("rat.tools.write_ffcv")

AUTO_MAX_RESOLUTION = {"train": 256, "val": None, "": 256}  # val: full size (original pixels)

def declare(config: Config) -> None:
    """Declare the ``cfg`` Section on ``config``."""
    Section("cfg", "dataset conversion to a .beton", config_descriptor=config).params(
        dataset=Param(OneOf(["imagefolder", "cifar10", "cifar100"]), "imagefolder: <dir>/<class>/<images> "
                      "(ImageNet style); cifar10/cifar100: the python-pickle archive (.tar.gz or extracted)",
                      default="imagefolder"),
        data_dir=Param(str, "input: the folder (its <split> sub-folder when --cfg.split is set) or the CIFAR archive",
                       required=True),
        split=Param(OneOf(["train", "val", ""]), "train or val; for imagefolder, the sub-folder of data_dir to read "
                    "('' = data_dir itself)", default=""),
        write_path=Param(str, "output .beton (its directory must exist); the classes file is written beside it",
                         required=True),
        classes_from=Param(str, "a beton whose classes file fixes the label order (write val with the train classes)",
                           default=""),
        write_mode=Param(OneOf(["auto", "raw", "jpg", "smart", "proportion"]), "ffcv RGBImageField write mode; auto = "
                         "raw for val splits and CIFAR, proportion for other folders", default="auto"),
        max_resolution=Param(And(int, InRange(min=-1, max=65535)), "longest side after resizing; -1 = auto (256 train, "
                             "full size for val, CIFAR unchanged), 0 = keep full size", default=-1),
        jpeg_quality=Param(And(int, InRange(min=1, max=100)), "JPEG quality of compressed images", default=90),
        compress_probability=Param(FiniteFloat(0, 1), "share stored as JPEG with write_mode "
                                   "proportion (the rest raw)", default=0.5),
        num_workers=Param(And(int, InRange(min=1)), "writer processes", default=os.cpu_count() or 1),
        strict=Param(And(int, OneOf([0, 1])), "1: fail on any unreadable image instead of leaving it out",
                     default=0),
        seed=Param(int, "seed of the proportion mode's JPEG/raw choice (reproducible files)", default=0),
        progress=Param(Progress(), PROGRESS_HELP, default="auto"),
    )


def make_config(argv: Sequence[str] | None = None) -> Config:
    """Parse ``--cfg.*`` flags (and ``-C`` YAML/JSON files) into a fresh, validated fastargs Config.

    Raises:
        SystemExit: bad arguments (status 2, each problem named).
    """
    config = Config()  # a fresh Config, so tests and callers stay isolated
    declare(config)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", "-C", action="append", default=[], help="YAML/JSON file(s) of cfg values")
    # fastargs' own augment_argparse also reads sys.argv and every environment variable; declare the flags here.
    for path, entry in config.entries.items():
        default = "required" if entry.required else f"default: {entry.default}"
        parser.add_argument(f"--{'.'.join(path)}", help=f"{entry.desc} ({entry.checker.help()}; {default})")
    args = parser.parse_args(list(argv) if argv is not None else None)
    from rat.config import ConfigError, load_config_file

    for fname in args.config_file:
        try:
            config.collect(load_config_file(config, fname))  # strict: an unknown key is an error, not ignored
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
    values = vars(args)
    del values["config_file"]
    config.collect(values)
    errors = config.validate(mode="errordict")
    if errors:
        problems = []
        for path, error in errors.items():
            entry = config.entries[path]
            issue = "required" if type(error).__name__ == "MissingValueError" else f"must be {entry.checker.help()}"
            problems.append(f"--{'.'.join(path)}: {issue} ({entry.desc})")
        print(f"write_ffcv.py: error: {'; '.join(problems)}", file=sys.stderr)
        raise SystemExit(2)
    return config


@section("cfg")
@param("dataset")
@param("data_dir")
@param("split")
@param("write_path")
@param("classes_from")
@param("write_mode")
@param("max_resolution")
@param("jpeg_quality")
@param("compress_probability")
@param("num_workers")
@param("strict")
@param("seed")
@param("progress")
def write(dataset: str, data_dir: str, split: str, write_path: str, classes_from: str, write_mode: str,
          max_resolution: int, jpeg_quality: int, compress_probability: float, num_workers: int, strict: int,
          seed: int, progress: str):
    """Run the conversion the config describes; returns the :class:`rat.data.WriteReport`."""
    from rat.data import read_classes, write_cifar_beton, write_folder_beton

    is_cifar = dataset.startswith("cifar")
    if write_mode == "auto":
        write_mode = "raw" if is_cifar or split == "val" else "proportion"
    if max_resolution == -1:
        resolution = None if is_cifar else AUTO_MAX_RESOLUTION[split]
    else:
        resolution = max_resolution or None
    options = dict(max_resolution=resolution, jpeg_quality=jpeg_quality, compress_probability=compress_probability,
                   write_mode=write_mode, num_workers=num_workers, seed=seed, progress=progress)
    _logger.info("writing %s (%s%s) to %s with %s", data_dir, dataset, f", {split}" if split else "", write_path,
                 options)
    if is_cifar:
        if not split:
            raise ValueError("CIFAR needs --cfg.split=train or --cfg.split=val (the test batch)")
        if classes_from:
            raise ValueError("--cfg.classes_from applies to image folders; CIFAR archives carry their class names")
        return write_cifar_beton(data_dir, write_path, split=split, **options)
    folder = Path(data_dir) / split if split else Path(data_dir)
    classes = read_classes(classes_from) if classes_from else None
    return write_folder_beton(folder, write_path, classes=classes, on_error="raise" if strict else "skip",
                              **options)


@logging_scope()
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    config = make_config(argv)
    set_current_config(config)
    from rat.data import BetonWriteError

    try:
        report = write()
    except (BetonWriteError, OSError, ValueError) as exc:
        print(f"write_ffcv.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    summary = {
        "beton": str(report.path), "classes_file": str(report.path) + ".classes.json",
        "num_samples": report.num_samples, "num_classes": len(report.classes), "seconds": round(report.seconds, 1),
        "converted": report.converted, "unreadable_count": len(report.skipped),
        "unreadable": [{"file": f, "error": e} for f, e in report.skipped],
    }
    print(json.dumps(summary))
    if report.skipped:
        print(f"warning: {len(report.skipped)} unreadable files were left out (listed above and in the classes file)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
