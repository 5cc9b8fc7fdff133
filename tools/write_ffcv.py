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

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastargs.validation import OneOf

from rat.cli import EXIT_BAD_INPUT
from rat.config import (
    ConfigError,
    FiniteFloat,
    Flag,
    Progress,
    declare_spec,
    int_in,
    make_config,
    param,
    section,
    spec_from_config,
)
from rat.logging import PROGRESS_HELP, logging_scope, setup_logging

_logger = logging.getLogger("rat.tools.write_ffcv")

AUTO_MAX_RESOLUTION = {"train": 256, "val": None, "": 256}  # val: full size (original pixels)


@dataclass(frozen=True)
class WriteSpec:
    """The conversion (the ``cfg`` Section, ``--cfg.*`` as ffcv-imagenet's write_imagenet.py names them)."""

    dataset: str = param(OneOf(["imagefolder", "cifar10", "cifar100"]), "imagefolder: <dir>/<class>/<images> "
                         "(ImageNet style); cifar10/cifar100: the python-pickle archive (.tar.gz or extracted)",
                         default="imagefolder")
    data_dir: str = param(str, "input: the folder (its <split> sub-folder when --cfg.split is set) or the CIFAR "
                          "archive (required)", default="")
    split: str = param(OneOf(["train", "val", ""]), "train or val; for imagefolder, the sub-folder of data_dir to "
                       "read ('' = data_dir itself)", default="")
    write_path: str = param(str, "output .beton (its directory must exist); the classes file is written beside it "
                            "(required)", default="")
    classes_from: str = param(str, "a beton whose classes file fixes the label order (write val with the train "
                              "classes)", default="")
    write_mode: str = param(OneOf(["auto", "raw", "jpg", "smart", "proportion"]), "ffcv RGBImageField write mode; "
                            "auto = raw for val splits and CIFAR, proportion for other folders", default="auto")
    max_resolution: int = param(int_in(-1, 65535), "longest side after resizing; -1 = auto (256 train, full size for "
                                "val, CIFAR unchanged), 0 = keep full size", default=-1)
    jpeg_quality: int = param(int_in(1, 100), "JPEG quality of compressed images", default=90)
    compress_probability: float = param(FiniteFloat(0, 1), "share stored as JPEG with write_mode proportion (the rest "
                                        "raw)", default=0.5)
    num_workers: int = param(int_in(1), "writer processes", default=os.cpu_count() or 1)
    strict: int = param(Flag(), "1: fail on any unreadable image instead of leaving it out", default=0)
    seed: int = param(int_in(), "seed of the proportion mode's JPEG/raw choice (reproducible files)", default=0)
    progress: str = param(Progress(), PROGRESS_HELP, default="auto")


@dataclass(frozen=True)
class WriteConfig:
    cfg: WriteSpec = section("dataset conversion to a .beton")


def make_spec(argv: Sequence[str] | None = None) -> WriteSpec:
    """The conversion that ``--cfg.*`` flags and ``-C`` YAML/JSON files describe, through rat's strict front end
    (:func:`rat.config.make_config`: unknown keys and bad values refused, each named).

    Raises:
        ConfigError: a bad value, an unknown key, or a required setting left out.
    """
    config = make_config(argv, declare=lambda: declare_spec(WriteConfig), prog="tools/write_ffcv.py",
                         description=__doc__)
    spec = spec_from_config(WriteConfig, config).cfg
    missing = [f"--cfg.{name}" for name in ("data_dir", "write_path") if not getattr(spec, name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required: name the input and the output .beton (see --help)")
    return spec


def write(spec: WriteSpec):
    """Run the conversion ``spec`` describes; returns the :class:`rat.data.WriteReport`."""
    from rat.data import read_classes, write_cifar_beton, write_folder_beton

    dataset, split, write_mode, classes_from = spec.dataset, spec.split, spec.write_mode, spec.classes_from
    is_cifar = dataset.startswith("cifar")
    if write_mode == "auto":
        write_mode = "raw" if is_cifar or split == "val" else "proportion"
    if spec.max_resolution == -1:
        resolution = None if is_cifar else AUTO_MAX_RESOLUTION[split]
    else:
        resolution = spec.max_resolution or None
    options = dict(max_resolution=resolution, jpeg_quality=spec.jpeg_quality,
                   compress_probability=spec.compress_probability, write_mode=write_mode,
                   num_workers=spec.num_workers, seed=spec.seed, progress=spec.progress)
    _logger.info("writing %s (%s%s) to %s with %s", spec.data_dir, dataset, f", {split}" if split else "",
                 spec.write_path, options)
    if is_cifar:
        if not split:
            raise ValueError("CIFAR needs --cfg.split=train or --cfg.split=val (the test batch)")
        if classes_from:
            raise ValueError("--cfg.classes_from applies to image folders; CIFAR archives carry their class names")
        return write_cifar_beton(spec.data_dir, spec.write_path, split=split, **options)
    folder = Path(spec.data_dir) / split if split else Path(spec.data_dir)
    classes = read_classes(classes_from) if classes_from else None
    return write_folder_beton(folder, spec.write_path, classes=classes, on_error="raise" if spec.strict else "skip",
                              **options)


@logging_scope()
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    try:
        spec = make_spec(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"write_ffcv.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from rat.data import BetonWriteError

    try:
        report = write(spec)
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
