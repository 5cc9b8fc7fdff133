"""The inputs of a beton write: ImageFolder listing, CIFAR archives, and indexable (image, label) sources.

* :func:`list_image_folder`: ``(file, label)`` in ``torchvision.datasets.ImageFolder(folder)`` order (classes sorted by
  name; files found by a sorted walk of each class directory; torchvision's image extensions);
* :func:`load_cifar`: CIFAR-10/100 from the python-pickle archive, through an unpickler that refuses every global but
  numpy's arrays (the archives are pickles: never run their code);
* :class:`ArraySource` / :class:`FileSource`: what the ffcv writer processes index. A file that cannot be decoded does
  not kill the writer: it is noted (``notes-<pid>.tsv`` in ``notes_dir``, read back by :func:`read_notes`), as is
  every conversion to RGB. Each sample seeds numpy from ``(seed, index)``, which makes ffcv's JPEG/raw choice
  reproducible.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "IMG_EXTENSIONS", "ArraySource", "FileSource", "find_classes", "list_image_folder", "load_cifar", "load_rgb",
    "read_notes",
]

_logger = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively), so the file list equals ImageFolder's.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(folder: str | Path) -> list[str]:
    """Class directory names of ``folder``, sorted: label ``k`` is ``find_classes(folder)[k]`` (as in ImageFolder).

    Raises:
        FileNotFoundError: ``folder`` is missing, not a directory, or has no class sub-directories.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input directory {folder} does not exist or is not a directory: pass a folder "
                                "with one sub-directory per class (e.g. imagenet/train)")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class sub-directories: expected <folder>/<class>/<image files> "
                                "(an ImageNet-style train/ or val/ folder)")
    return classes


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_image_folder(folder: str | Path,
                      classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """List ``(file, label)`` in torchvision ``ImageFolder`` order, and the class names.

    Args:
        folder: directory with one sub-directory per class.
        classes: label order to use (e.g. the train set's classes when listing val); every class directory must be in
            it. Default: the sorted class directories.

    Every directory and file is identified by its real path (symbolic links resolved): a link back into the folder
    (``a/up -> ..``, a loop, another class's directory) or a file listed twice would otherwise be walked again, its
    images counted twice or under the wrong class. Links to places outside the folder are followed.

    Raises:
        FileNotFoundError: missing folder, no class directories, or class directories without image files.
        ValueError: a class directory that ``classes`` does not name; a link back into the folder, or one file
            reached by two paths (both named).
    """
    folder = Path(folder)
    found = find_classes(folder)
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{folder} has class directories that the given class list lacks: {unknown[:10]}"
                             f"{' ...' if len(unknown) > 10 else ''}; write the classes' train set first, or pass "
                             "the matching classes")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    ignored = 0
    first_path: dict[str, str] = {}  # real path of every image -> the path it was listed under
    for name in found:
        count = 0
        for root, real_root, fnames in _walk_class(folder, name):
            for fname in sorted(fnames):
                if _is_image_file(fname):
                    path = os.path.join(root, fname)
                    real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_root, fname)
                    if real in first_path:
                        raise ValueError(f"{path} and {first_path[real]} are the same file ({real}): one image would "
                                         "be listed twice; remove one of them")
                    first_path[real] = path
                    samples.append((path, class_to_idx[name]))
                    count += 1
                else:
                    ignored += 1
        if count == 0:
            empty.append(name)
    if empty:
        raise FileNotFoundError(f"{len(empty)} class directories of {folder} hold no image files "
                                f"({', '.join(IMG_EXTENSIONS)}): {empty[:10]}{' ...' if len(empty) > 10 else ''}; "
                                "remove them or add their images")
    if ignored:
        _logger.warning("%s: ignored %d files without an image extension (as ImageFolder does)", folder, ignored)
    return samples, list(classes)


def _walk_class(folder: Path, name: str) -> list[tuple[str, str, list[str]]]:
    """``(directory, its real path, file names)`` below ``folder/name``, sorted by directory (as ``sorted(os.walk)``),
    following links, but refusing a directory whose real path was walked already (a loop) or that lies in ``folder``
    outside ``folder/name`` (a link into another class, or back up).

    Raises:
        ValueError: such a link; the message names it and where it leads.
    """
    real_folder, real_class = os.path.realpath(folder), os.path.realpath(folder / name)
    visited: set[str] = set()
    walked = []
    for root, _, fnames in os.walk(folder / name, followlinks=True):
        real = os.path.realpath(root)
        inside = os.path.commonpath([real, real_folder]) == real_folder
        if real in visited or (inside and os.path.commonpath([real, real_class]) != real_class):
            raise ValueError(f"{root} leads back into {folder} ({real}) through a symbolic link: its images would be "
                             f"listed again, or as class {name!r}; remove the link")
        visited.add(real)
        walked.append((root, real, fnames))
    return sorted(walked)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR archives' dicts of numpy arrays and refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR archive")


def _unpickle(data: bytes) -> dict[str, Any]:
    obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError("not a CIFAR batch (expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar(archive: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read CIFAR-10 or CIFAR-100 from its python-pickle archive (``.tar.gz`` or the extracted directory).

    Args:
        archive: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, or the ``cifar-10-batches-py`` /
            ``cifar-100-python`` directory (or a directory containing it).
        split: ``'train'`` or ``'val'`` (``'test'`` is accepted as an alias of ``'val'``).

    Returns:
        ``(images uint8 (N, 32, 32, 3), labels int64 (N,), class names)``; CIFAR-100 uses the fine labels.

    Raises:
        FileNotFoundError: nothing CIFAR-like at ``archive``.
        ValueError: unknown split or a malformed archive.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown CIFAR split {split!r}: use 'train' or 'val'")
    archive = Path(archive)
    members: dict[str, bytes] = {}
    if archive.is_file():
        try:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        fp = tar.extractfile(member)
                        if fp is not None:
                            members[Path(member.name).name] = fp.read()
        except tarfile.TarError as exc:
            raise ValueError(f"{archive} is not a readable tar archive ({exc}): pass cifar-10-python.tar.gz, "
                             "cifar-100-python.tar.gz or the extracted directory") from exc
    elif archive.is_dir():
        for candidate in (archive, archive / "cifar-10-batches-py", archive / "cifar-100-python"):
            if candidate.is_dir():
                for path in candidate.iterdir():
                    if path.is_file():
                        members.setdefault(path.name, path.read_bytes())
    else:
        raise FileNotFoundError(f"CIFAR archive {archive} does not exist: pass cifar-10-python.tar.gz, "
                                "cifar-100-python.tar.gz or the extracted directory")
    if "batches.meta" in members:  # CIFAR-10
        names = [str(n) for n in _unpickle(members["batches.meta"])["label_names"]]
        parts = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    elif "meta" in members:  # CIFAR-100
        names = [str(n) for n in _unpickle(members["meta"])["fine_label_names"]]
        parts = ["train"] if split == "train" else ["test"]
        label_key = "fine_labels"
    else:
        raise FileNotFoundError(f"{archive} holds no CIFAR-10 'batches.meta' or CIFAR-100 'meta': pass the python "
                                "version of the archive (cifar-10-python.tar.gz / cifar-100-python.tar.gz)")
    missing = [p for p in parts if p not in members]
    if missing:
        raise FileNotFoundError(f"{archive} lacks {missing}: the archive is incomplete; download it again")
    images, labels = [], []
    for part in parts:
        batch = _unpickle(members[part])
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{archive}:{part} has data of shape {data.shape}, expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names


class ArraySource:
    """Indexable (image, label) view of arrays for the ffcv writer processes."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int):
        self.images = images
        self.labels = labels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        _seed_sample(self.seed, index)
        return self.images[index], int(self.labels[index])


class FileSource:
    """Indexable (image, label) view of image files; failures are logged to files instead of killing the writer."""

    def __init__(self, samples: list[tuple[str, int]], notes_dir: str, seed: int):
        self.samples = samples
        self.notes_dir = notes_dir
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def _note(self, index: int, kind: str, message: str) -> None:
        line = f"{index}\t{kind}\t{' '.join(message.split())}\n"
        with open(os.path.join(self.notes_dir, f"notes-{os.getpid()}.tsv"), "a") as fp:
            fp.write(line)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        _seed_sample(self.seed, index)
        try:
            image, conversion = load_rgb(path)
        # PIL raises many types for broken files (OSError, SyntaxError, ValueError, struct.error, ...); any of them
        # means "unreadable", which is recorded and reported, never raised inside the writer process.
        except Exception as exc:
            self._note(index, "error", f"{type(exc).__name__}: {exc}")
            return np.zeros((1, 1, 3), dtype=np.uint8), label
        if conversion:
            self._note(index, "converted", conversion)
        return image, label


def _seed_sample(seed: int, index: int) -> None:
    # RGBImageField(write_mode='proportion') draws np.random.rand() per sample inside the writer process; seeding per
    # sample makes the JPEG/raw choice, hence the beton's bytes, a function of (seed, index) only.
    np.random.seed((seed * 1_000_003 + index) % (1 << 32))


# Greyscale modes with more than 8 bits per value: 16-bit PNG/TIFF (Pillow opens them as I;16* or I) and float TIFF.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8_bits(values: np.ndarray, mode: str) -> np.ndarray:
    """A 16-bit greyscale image scaled to 8 bits (v -> round(v * 255 / 65535)), as RGB.

    Raises:
        ValueError: values outside [0, 65535] (a 32-bit or float image): nothing to scale them by.
    """
    wide = values.astype(np.float64)
    if mode == "F" or not np.isfinite(wide).all() or wide.min() < 0 or wide.max() > 65535:
        raise ValueError(f"{mode} image with values outside 16 bits: convert it to 8-bit RGB first")
    grey = np.floor(wide * 255 / 65535 + 0.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def load_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode an image file to uint8 HWC RGB the way torchvision's ``pil_loader`` does (``convert('RGB')``), except
    for 16-bit greyscale images, which ``convert`` clips to 0 and 255: they are scaled to 8 bits
    (``round(v * 255 / 65535)``).

    Returns:
        ``(image, conversion)`` where ``conversion`` names what was converted (``''`` for a plain RGB file of the
        format its extension says): e.g. ``'CMYK'``, ``'L'``, ``'PNG-as-.JPEG'``.
    """
    notes = []
    with Image.open(path) as img:
        img.load()
        ext = os.path.splitext(str(path))[1].lower()
        expected = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(ext)
        if expected is not None and img.format != expected:
            notes.append(f"{img.format}-as-{os.path.splitext(str(path))[1]}")
        if img.mode in _WIDE_MODES:  # convert("RGB") would clip 16-bit values to 0 and 255
            notes.append(f"{img.mode}->8-bit")
            array = _to_8_bits(np.asarray(img), img.mode)
        else:
            if img.mode != "RGB":
                notes.append(img.mode)
                img = img.convert("RGB")
            array = np.array(img, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"decoded to shape {array.shape}")
    return array, "+".join(notes)


def read_notes(notes_dir: str) -> tuple[dict[int, str], dict[int, str]]:
    """The notes :class:`FileSource` left in ``notes_dir``: ``({index: error}, {index: conversion})``."""
    errors: dict[int, str] = {}
    converted: dict[int, str] = {}
    for path in Path(notes_dir).glob("notes-*.tsv"):
        for line in path.read_text().splitlines():
            index, kind, message = line.split("\t", 2)
            (errors if kind == "error" else converted)[int(index)] = message
    return errors, converted
