"""What a beton written by rat holds, and reading it back without a loader.

Every beton has two fields, ``image`` (``RGBImageField``) and ``label`` (``IntField``). Beside ``x.beton`` lies
``x.beton.classes.json``: class names in label order, the number of samples, the writer options, the skipped files
and, for folders, every sample's file name relative to the folder (``files``; e.g.
``n01440764/ILSVRC2012_val_00000293.JPEG``, which identifies fixed evaluation subsets). :func:`read_classes` and
:func:`read_beton_info` read it back (checking it against the beton), :class:`BetonImages` reads the stored images.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rat.io import DuplicateKeyError, read_json

__all__ = [
    "CLASSES_FORMAT", "IMAGE_FIELD", "LABEL_FIELD", "BetonImages", "ClassMismatchError", "check_beton",
    "check_checkpoint_classes", "check_classes", "classes_path", "read_beton_info", "read_beton_item", "read_classes",
]

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
CLASSES_SUFFIX = ".classes.json"
CLASSES_FORMAT = "rat-beton-classes/1"


def classes_path(beton_path: str | Path) -> Path:
    """The classes file of a beton: ``<beton>.classes.json`` in the same directory."""
    beton_path = Path(beton_path)
    return beton_path.with_name(beton_path.name + CLASSES_SUFFIX)


def read_beton_info(beton_path: str | Path) -> dict[str, Any]:
    """The classes file of a beton as a dict (``classes``, ``num_samples``, ``options``, ``skipped``, ...).

    Raises:
        FileNotFoundError: the beton or its classes file is missing.
        ValueError: the classes file is not one of ours, or does not match the beton's sample count.
    """
    beton_path = Path(beton_path)
    if not beton_path.is_file():
        raise FileNotFoundError(f"beton {beton_path} does not exist: write it with tools/write_ffcv.py")
    side = classes_path(beton_path)
    if not side.is_file():
        raise FileNotFoundError(f"classes file {side} is missing next to {beton_path}: rewrite the beton with "
                                "tools/write_ffcv.py (it writes both)")
    try:
        info = read_json(side)
    except (OSError, json.JSONDecodeError, DuplicateKeyError) as exc:
        raise ValueError(f"classes file {side} is unreadable ({exc}): rewrite the beton with tools/write_ffcv.py") \
            from exc
    if not isinstance(info, dict) or info.get("format") != CLASSES_FORMAT or not isinstance(info.get("classes"), list):
        raise ValueError(f"{side} is not a rat classes file (format {CLASSES_FORMAT!r}): rewrite the beton")
    num_samples = check_beton(beton_path)
    if num_samples != info.get("num_samples"):
        raise ValueError(f"{side} describes {info.get('num_samples')} samples but {beton_path} holds {num_samples}: "
                         "the two come from different writes; rewrite the beton with tools/write_ffcv.py")
    return info


def check_beton(beton_path: str | Path) -> int:
    """Check that a file is a complete beton with rat's fields (``image``, ``label``); returns its sample count.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: empty, truncated, or a beton with other fields; the message names the file and the fix.
    """
    from ffcv.reader import Reader

    beton_path = Path(beton_path)
    if not beton_path.is_file():
        raise FileNotFoundError(f"beton {beton_path} does not exist: write it with tools/write_ffcv.py")
    fix = "rewrite it with tools/write_ffcv.py"
    try:
        reader = Reader(str(beton_path))
        ends = reader.alloc_table["ptr"].astype(np.int64) + reader.alloc_table["size"].astype(np.int64)
    # What ffcv's header parsing raises; its format check (Reader.read_header) raises AssertionError on any other file.
    except (AssertionError, IndexError, ValueError, KeyError, OSError, TypeError) as exc:
        raise ValueError(f"beton {beton_path} is empty, truncated or not a beton ({type(exc).__name__}: {exc}): "
                         f"{fix}") from exc
    if list(reader.field_names) != [IMAGE_FIELD, LABEL_FIELD]:
        raise ValueError(f"beton {beton_path} holds the fields {', '.join(reader.field_names)}, not "
                         f"{IMAGE_FIELD}, {LABEL_FIELD}: it was not written by rat; {fix}")
    if len(ends) and int(ends.max()) > beton_path.stat().st_size:
        raise ValueError(f"beton {beton_path} is truncated ({beton_path.stat().st_size} bytes, its table points up to "
                         f"byte {int(ends.max())}): {fix}")
    return int(reader.num_samples)


def read_classes(beton_path: str | Path) -> list[str]:
    """Class names of a beton in label order (label ``k`` is ``read_classes(p)[k]``)."""
    return [str(c) for c in read_beton_info(beton_path)["classes"]]


class ClassMismatchError(ValueError):
    """Two class lists (or counts) that must agree do not; the message names both sources and the first difference."""


def check_classes(expected: Sequence[str] | int, actual: Sequence[str] | int, *, expected_from: str,
                  actual_from: str, fix: str) -> None:
    """Check that ``actual`` has the classes ``expected`` has: the same names in the same order (label ``k`` means the
    same class on both sides) when both are lists, the same number when either side only knows a count. The one check
    of class lists in rat (train vs val beton, a model's head vs the data, a checkpoint vs the data it is evaluated on).

    Raises:
        ClassMismatchError: they differ; the message names both sources, the first difference and ``fix``.
    """
    count = expected if isinstance(expected, int) else len(expected)
    other = actual if isinstance(actual, int) else len(actual)
    if count != other:
        raise ClassMismatchError(f"{expected_from} has {count} classes but {actual_from} has {other}: {fix}")
    if isinstance(expected, int) or isinstance(actual, int):
        return
    for label, (a, b) in enumerate(zip(expected, actual)):
        if str(a) != str(b):
            raise ClassMismatchError(f"{expected_from} and {actual_from} list different classes (label {label} is "
                                     f"{a!r} in one and {b!r} in the other): {fix}")


def check_checkpoint_classes(recorded: list[str] | None, count: int | None, checkpoint_from: str, data: str | Path,
                             fix: str) -> None:
    """:func:`check_classes` of a model checkpoint (the class names it ``recorded``, else its head's class ``count``)
    against the classes of ``data``, a beton (its classes file) or an image folder (its sorted class directories):
    a label the model cannot predict, or one that means another class, would count silently as an error or a hit.
    Nothing to check when the checkpoint records neither.

    Raises:
        ClassMismatchError: they differ.
    """
    if not isinstance(recorded, list) and not isinstance(count, int):
        return
    data = Path(data)
    if data.is_dir():
        from rat.data.sources import find_classes

        names, where = find_classes(data), f"data folder {data}"
    else:
        names, where = read_classes(data), f"data {data}"
    check_classes(recorded if isinstance(recorded, list) else count, names, expected_from=checkpoint_from,
                  actual_from=where, fix=fix)


class BetonImages:
    """The samples of a beton exactly as stored, at their stored size, without an FFCV loader (random access).

    ``images[i]`` is ``(image uint8 HWC RGB, label)``: raw samples are the stored pixels; JPEG samples are decoded
    with OpenCV. The file is memory-mapped; the object can be handed to DataLoader worker processes.

    Args:
        beton_path: a beton written by this module.
    """

    def __init__(self, beton_path: str | Path):
        from ffcv.reader import Reader

        self.path = Path(beton_path)
        reader = Reader(str(self.path))
        self._images = reader.metadata[f"f{reader.field_names.index(IMAGE_FIELD)}"]
        self._labels = reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"]
        order = np.argsort(reader.alloc_table["ptr"])
        self._ptrs = reader.alloc_table["ptr"][order]
        self._sizes = reader.alloc_table["size"][order]
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._labels)

    def is_raw(self, index: int) -> bool:
        """Whether sample ``index`` is stored as raw pixels (else JPEG)."""
        return int(self._images[index]["mode"]) != 0  # ffcv IMAGE_MODES['jpg'] == 0

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range: {self.path} holds {len(self)} samples")
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        meta = self._images[index]
        ptr = int(meta["data_ptr"])
        slot = int(np.searchsorted(self._ptrs, ptr))
        if slot >= len(self._ptrs) or int(self._ptrs[slot]) != ptr:
            raise ValueError(f"{self.path}: no allocation for sample {index}; the file is damaged")
        data = self._data[ptr:ptr + int(self._sizes[slot])]
        height, width = int(meta["height"]), int(meta["width"])
        if self.is_raw(index):
            image = np.array(data[: height * width * 3]).reshape(height, width, 3)
        else:
            import cv2

            image = cv2.cvtColor(cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return image, int(self._labels[index])


def read_beton_item(beton_path: str | Path, index: int) -> tuple[np.ndarray, int]:
    """Sample ``index`` of a beton exactly as stored: ``(image uint8 HWC RGB, label)``, without an FFCV loader.

    For inspection and tests (one sample at a time; use the loaders for training, :class:`BetonImages` for many).

    Raises:
        IndexError: ``index`` is out of range.
    """
    return BetonImages(beton_path)[index]
