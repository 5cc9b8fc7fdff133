"""Write image-classification datasets to FFCV ``.beton`` files, atomically, with a classes file beside them.

Sample ``i`` of the beton is sample ``i`` of the source (:mod:`rat.data.sources`):

* arrays: ``images[i]`` with ``labels[i]``;
* a folder of class sub-directories: the ``i``-th sample of ``torchvision.datasets.ImageFolder(folder)``, minus the
  unreadable files, which are listed by name in the report and in the classes file;
* CIFAR-10/100 python archives: the archive's order and labels (``torchvision.datasets.CIFAR10/100`` order).

The beton's fields and its classes file are :mod:`rat.data.meta`'s. Writing goes to a hidden temporary file in the
output directory that is renamed into place only when complete: an interrupted, failed or out-of-space write leaves
no ``.beton`` behind that looks good. When some input files are unreadable, the beton is written again without them
(ffcv's writer takes the sample list up front).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rat.data._ffcv_compat import WriterProcessError, make_writer_class
from rat.data.meta import CLASSES_FORMAT, IMAGE_FIELD, LABEL_FIELD, check_beton, classes_path
from rat.data.sources import ArraySource, FileSource, list_image_folder, load_cifar, read_notes
from rat.logging import progress_setting

__all__ = [
    "WRITE_MODES", "BetonWriteError", "WriteReport", "write_arrays_beton", "write_cifar_beton", "write_folder_beton",
]

_logger = logging.getLogger(__name__)

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
_MIN_PAGE_SIZE = 1 << 23  # ffcv's default page (4 x 2 MiB)
_SMALL_PAGE_SIZE = 1 << 21  # ffcv's smallest page, for small datasets
_SMALL_DATASET_BYTES = 1 << 26
_NO_RESIZE_PAGE_SIZE = 1 << 26  # room for a raw ~4000 x 5000 photo when nothing is resized


class BetonWriteError(RuntimeError):
    """A beton could not be written (a writer process failed, or unreadable inputs under ``on_error='raise'``)."""


@dataclass
class WriteReport:
    """What a write produced.

    Attributes:
        path: the beton.
        num_samples: samples written.
        classes: class names in label order.
        skipped: ``(file, error)`` for every input that could not be read and was left out.
        converted: ``{kind: count}`` of inputs converted to RGB on the way (e.g. ``'CMYK'``, ``'PNG-as-.JPEG'``).
        seconds: wall time of the write.
    """

    path: Path
    num_samples: int
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# The write itself.


def _page_size(max_sample_bytes: int | None, num_samples: int) -> int:
    """ffcv's 8 MiB page, 2 MiB for small sets (pages are padded), larger when a sample needs it."""
    if max_sample_bytes is None:
        return _NO_RESIZE_PAGE_SIZE
    size = _SMALL_PAGE_SIZE if num_samples * max_sample_bytes < _SMALL_DATASET_BYTES else _MIN_PAGE_SIZE
    while size < 2 * max_sample_bytes:
        size *= 2
    return size


def _check_options(write_mode: str, max_resolution: int | None, jpeg_quality: int,
                   compress_probability: float) -> None:
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode={write_mode!r} is not one of {WRITE_MODES}")
    if max_resolution is not None and not 1 <= max_resolution <= 65535:
        raise ValueError(f"max_resolution={max_resolution} must be in 1..65535, or None to keep full size")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality} must be in 1..100")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability={compress_probability} must be in [0, 1]")


def _check_output(out_path: Path) -> None:
    parent = out_path.parent
    if not parent.exists():
        raise FileNotFoundError(f"output directory {parent} does not exist: create it first (mkdir -p {parent})")
    if not parent.is_dir():
        raise NotADirectoryError(f"output path {out_path}: {parent} is not a directory")
    if out_path.is_dir():
        raise IsADirectoryError(f"output path {out_path} is a directory: pass a file name such as train.beton")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {parent} is not writable: choose a writable --cfg.write_path")
    if out_path.is_file() and out_path.suffix != ".beton":  # an earlier (even damaged) beton is rewritten; any other
        try:  # file (a checkpoint, a result) is never replaced
            check_beton(out_path)
        except (ValueError, FileNotFoundError):
            raise FileExistsError(f"output path {out_path} exists and is not a beton; refusing to replace it: pass "
                                  "another --cfg.write_path, or move it away") from None


def _run_writer(tmp_path: Path, source: Any, indices: list[int] | None, *, fields: dict, num_workers: int,
                page_size: int, notes_dir: str, progress: str | bool, target: Path) -> None:
    writer_cls = make_writer_class()
    writer = writer_cls(str(tmp_path), fields, page_size=page_size, num_workers=num_workers)
    writer.notes_dir = notes_dir
    writer.progress = progress_setting(progress)
    writer.target = str(target)
    chunksize = max(1, min(100, len(source) // (4 * num_workers) or 1))
    try:
        writer.from_indexed_dataset(source, indices=indices, chunksize=chunksize)
    except WriterProcessError as exc:
        raise BetonWriteError(str(exc)) from exc


def _write(source: Any, out_path: str | Path, *, classes: Sequence[str], describe: Callable[[int], str],
           source_name: str, max_resolution: int | None, max_sample_bytes: int | None, jpeg_quality: int,
           compress_probability: float, write_mode: str, num_workers: int | None, seed: int, on_error: str,
           progress: str | bool, names: Sequence[str] | None = None) -> WriteReport:
    """Write ``source`` (indexable of (HWC uint8, label)) to ``out_path`` atomically, then its classes file."""
    from ffcv.fields import IntField, RGBImageField

    _check_options(write_mode, max_resolution, jpeg_quality, compress_probability)
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r} must be 'skip' or 'raise'")
    out_path = Path(out_path)
    _check_output(out_path)
    num_workers = max(1, num_workers if num_workers is not None else (os.cpu_count() or 1))
    num_workers = min(num_workers, max(1, len(source)))
    fields = {
        IMAGE_FIELD: RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                                   compress_probability=compress_probability),
        LABEL_FIELD: IntField(),
    }
    if max_resolution is not None:
        max_sample_bytes = 3 * max_resolution * max_resolution
    page_size = _page_size(max_sample_bytes, len(source))
    tmp_path = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    side_tmp = classes_path(tmp_path)
    notes_dir = tempfile.mkdtemp(prefix="rat-write-")
    start = time.perf_counter()
    try:
        if hasattr(source, "notes_dir"):
            source.notes_dir = notes_dir
        _run_writer(tmp_path, source, None, fields=fields, num_workers=num_workers, page_size=page_size,
                    notes_dir=notes_dir, progress=progress, target=out_path)
        errors, conversions = read_notes(notes_dir)
        skipped = [(describe(i), errors[i]) for i in sorted(errors)]
        if skipped:
            listing = "\n  ".join(f"{name}: {err}" for name, err in skipped[:50])
            more = f"\n  ... and {len(skipped) - 50} more" if len(skipped) > 50 else ""
            if on_error == "raise":
                raise BetonWriteError(f"{len(skipped)} input files are unreadable:\n  {listing}{more}")
            _logger.warning("%d unreadable input files are left out of %s (re-writing without them):\n  %s%s",
                            len(skipped), out_path, listing, more)
            keep = [i for i in range(len(source)) if i not in errors]
            if not keep:
                raise BetonWriteError(f"none of the {len(source)} input files could be read; first error: "
                                      f"{skipped[0][0]}: {skipped[0][1]}")
            tmp_path.unlink()
            for notes in Path(notes_dir).glob("notes-*.tsv"):
                notes.unlink()
            _run_writer(tmp_path, source, keep, fields=fields, num_workers=min(num_workers, len(keep)),
                        page_size=page_size, notes_dir=notes_dir, progress=progress, target=out_path)
            new_errors, _ = read_notes(notes_dir)
            if new_errors:
                first = min(new_errors)
                raise BetonWriteError(f"input files changed during the write ({describe(first)}: "
                                      f"{new_errors[first]}); run the conversion again")
        num_samples = len(source) - len(skipped)
        converted: dict[str, int] = {}
        for i, kind in conversions.items():
            if i not in errors:
                converted[kind] = converted.get(kind, 0) + 1
        if converted:
            _logger.info("%s: converted to RGB on the way: %s", out_path, converted)
        info = {
            "format": CLASSES_FORMAT,
            "classes": list(classes),
            "num_classes": len(classes),
            "num_samples": num_samples,
            "fields": {"image": IMAGE_FIELD, "label": LABEL_FIELD},
            "source": source_name,
            "options": {"write_mode": write_mode, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
                        "compress_probability": compress_probability, "seed": seed, "page_size": page_size},
            "converted": converted,
            "skipped": [{"file": name, "error": err} for name, err in skipped],
        }
        if names is not None:
            info["files"] = [name for i, name in enumerate(names) if i not in errors]
        side_tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp_path, out_path)
        os.replace(side_tmp, classes_path(out_path))
    except OSError as exc:
        for leftover in (tmp_path, side_tmp):
            leftover.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        raise BetonWriteError(f"cannot write {out_path}: {reason} ({exc.filename or tmp_path}); choose a writable "
                              "output directory with enough free space") from exc
    except BaseException:
        for leftover in (tmp_path, side_tmp):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(notes_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    _logger.info("wrote %s: %d samples, %d classes, %.1f MiB in %.1f s", out_path, num_samples, len(classes),
                 out_path.stat().st_size / 2**20, seconds)
    return WriteReport(path=out_path, num_samples=num_samples, classes=list(classes), skipped=skipped,
                       converted=converted, seconds=seconds)


def write_arrays_beton(
        images: np.ndarray,
        labels: np.ndarray,
        out_path: str | Path,
        *,
        classes: Sequence[str],
        max_resolution: int | None = None,
        jpeg_quality: int = 90,
        compress_probability: float = 0.5,
        write_mode: str = "proportion",
        num_workers: int | None = None,
        seed: int = 0,
        progress: str | bool = False,
) -> Path:
    """Write in-memory images to a beton: sample ``i`` is ``(images[i], labels[i])``.

    Args:
        images: uint8 ``(N, H, W, 3)`` RGB.
        labels: integer labels ``(N,)`` in ``[0, len(classes))``.
        out_path: the ``.beton`` to write (its directory must exist); replaced atomically if present.
        classes: class names in label order, stored in the classes file.
        max_resolution: longest side after resizing (area interpolation, downscale only); ``None`` keeps the size.
        jpeg_quality: JPEG quality of compressed images.
        compress_probability: share of images stored as JPEG with ``write_mode='proportion'`` (the rest raw).
        write_mode: ffcv's ``'raw'``, ``'jpg'``, ``'smart'`` or ``'proportion'``.
        num_workers: writer processes (default: all cores).
        seed: makes the ``'proportion'`` JPEG/raw choice (and so the file) reproducible.
        progress: ``auto``, ``1`` or ``0`` (or a bool): a tqdm bar or plain log lines, by the rule of
            :func:`rat.logging.progress`.

    Returns:
        The beton path.

    Raises:
        ValueError: bad arrays or options.
        FileNotFoundError / PermissionError: unusable output directory.
        BetonWriteError: the write failed (e.g. disk full); nothing is left at ``out_path``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3) RGB, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    if len(images) == 0:
        raise ValueError("no images to write")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    classes = list(classes)
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}] but there are {len(classes)} classes")
    source = ArraySource(np.ascontiguousarray(images), labels.astype(np.int64), seed)
    report = _write(source, out_path, classes=classes, describe=lambda i: f"array[{i}]", source_name="arrays",
                    max_resolution=max_resolution, max_sample_bytes=int(np.prod(images.shape[1:])),
                    jpeg_quality=jpeg_quality, compress_probability=compress_probability, write_mode=write_mode,
                    num_workers=num_workers, seed=seed, on_error="raise", progress=progress)
    return report.path


def write_folder_beton(
        folder: str | Path,
        out_path: str | Path,
        *,
        classes: Sequence[str] | None = None,
        max_resolution: int | None = 256,
        jpeg_quality: int = 90,
        compress_probability: float = 0.5,
        write_mode: str = "proportion",
        num_workers: int | None = None,
        seed: int = 0,
        on_error: str = "skip",
        progress: str | bool = "auto",
) -> WriteReport:
    """Write an ImageNet-style folder (``<folder>/<class>/<images>``) to a beton in ``ImageFolder`` order.

    CMYK, greyscale, palette and mislabelled (e.g. PNG data in a ``.JPEG`` file) images are converted to RGB and
    counted in the report. Unreadable files are left out and listed by name (``on_error='skip'``) or fail the write
    (``on_error='raise'``); they are never dropped silently.

    The defaults (longest side 256, half the images JPEG q90, half raw) are ffcv-imagenet's speed/quality trade-off
    for training sets. For a validation set that ``rat.eval`` evaluates exactly as RobustBench does, store the
    original pixels: ``max_resolution=None, write_mode='raw'`` (what ``tools/write_ffcv.py --cfg.split=val`` does;
    see docs/eval.md).

    Args:
        folder: directory with one sub-directory per class.
        out_path: the ``.beton`` to write.
        classes: label order (default: sorted class directories); pass the train set's classes for its val set.
        max_resolution, jpeg_quality, compress_probability, write_mode, num_workers, seed, progress: as in
            :func:`write_arrays_beton`.
        on_error: ``'skip'`` or ``'raise'`` for unreadable files.

    Returns:
        A :class:`WriteReport`.
    """
    samples, classes = list_image_folder(folder, classes)
    source = FileSource(samples, "", seed)
    names = [Path(path).relative_to(folder).as_posix() for path, _ in samples]
    return _write(source, out_path, classes=classes, describe=lambda i: samples[i][0], source_name=str(folder),
                  max_resolution=max_resolution, max_sample_bytes=None, jpeg_quality=jpeg_quality,
                  compress_probability=compress_probability, write_mode=write_mode, num_workers=num_workers,
                  seed=seed, on_error=on_error, progress=progress, names=names)


def write_cifar_beton(
        archive: str | Path,
        out_path: str | Path,
        *,
        split: str,
        max_resolution: int | None = None,
        jpeg_quality: int = 90,
        compress_probability: float = 0.0,
        write_mode: str = "raw",
        num_workers: int | None = None,
        seed: int = 0,
        progress: str | bool = "auto",
) -> WriteReport:
    """Write a CIFAR-10/100 split from its python-pickle archive (see :func:`load_cifar`); raw pixels by default."""
    images, labels, classes = load_cifar(archive, split)
    source = ArraySource(images, labels, seed)
    return _write(source, out_path, classes=classes, describe=lambda i: f"{archive}[{split}][{i}]",
                  source_name=f"{archive}:{split}", max_resolution=max_resolution,
                  max_sample_bytes=int(np.prod(images.shape[1:])), jpeg_quality=jpeg_quality,
                  compress_probability=compress_probability, write_mode=write_mode, num_workers=num_workers,
                  seed=seed, on_error="raise", progress=progress)

