"""Write image-classification datasets to FFCV ``.beton`` files, atomically, with a classes file beside them.

Every beton written here has two fields, ``image`` (``RGBImageField``) and ``label`` (``IntField``), and sample ``i``
of the beton is sample ``i`` of the source:

* arrays: ``images[i]`` with ``labels[i]``;
* a folder of class sub-directories: the ``i``-th sample of ``torchvision.datasets.ImageFolder(folder)`` (classes
  sorted by name; files found by a sorted walk of each class directory; torchvision's image extensions), minus the
  unreadable files, which are listed by name in the report and in the classes file;
* CIFAR-10/100 python archives: the archive's order and labels (``torchvision.datasets.CIFAR10/100`` order).

Beside ``x.beton`` lies ``x.beton.classes.json``: class names in label order, the number of samples, the writer options,
the skipped files and, for folders, every sample's file name relative to the folder (``files``; e.g.
``n01440764/ILSVRC2012_val_00000293.JPEG``, which identifies fixed evaluation subsets). :func:`read_classes` reads it
back, :class:`BetonImages` reads the stored images.

Writing goes to a hidden temporary file in the output directory that is renamed into place only when complete: an
interrupted, failed or out-of-space write leaves no ``.beton`` behind that looks good.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import Process
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_FIELD", "LABEL_FIELD", "check_beton", "IMG_EXTENSIONS", "WRITE_MODES", "BetonImages", "BetonWriteError",
    "WriteReport",
    "classes_path", "find_classes", "list_image_folder", "load_cifar", "read_beton_info", "read_beton_item",
    "read_classes", "write_arrays_beton", "write_cifar_beton", "write_folder_beton",
]

_logger = logging.getLogger(__name__)

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
WRITE_MODES = ("raw", "jpg", "smart", "proportion")
# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively), so the file list equals ImageFolder's.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASSES_SUFFIX = ".classes.json"
CLASSES_FORMAT = "rat-beton-classes/1"

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
# Reading back: classes file, header info, single samples.


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
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
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
    except (IndexError, ValueError, KeyError, OSError, TypeError) as exc:  # what ffcv's header parsing raises
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


# ---------------------------------------------------------------------------------------------------------------------
# Sources.


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

    Raises:
        FileNotFoundError: missing folder, no class directories, or class directories without image files.
        ValueError: a class directory that ``classes`` does not name.
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
    for name in found:
        count = 0
        for root, _, fnames in sorted(os.walk(folder / name, followlinks=True)):
            for fname in sorted(fnames):
                if _is_image_file(fname):
                    samples.append((os.path.join(root, fname), class_to_idx[name]))
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
    import io

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


class _ArraySource:
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


class _FileSource:
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


def load_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode an image file to uint8 HWC RGB the way torchvision's ``pil_loader`` does (``convert('RGB')``).

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
        if img.mode != "RGB":
            notes.append(img.mode)
            img = img.convert("RGB")
        array = np.array(img, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"decoded to shape {array.shape}")
    return array, "+".join(notes)


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


def _guarded_worker(notes_dir: str, work_fn: Callable[..., None], *args: Any) -> None:
    """Run one ffcv writer worker; leave any failure's message for the parent instead of a traceback."""
    try:
        work_fn(*args)
    except BaseException as exc:  # reported to the parent, which raises one clear error
        try:
            with open(os.path.join(notes_dir, f"worker-{os.getpid()}.err"), "w") as fp:
                fp.write(f"{type(exc).__name__}: {exc}")
        except OSError:
            pass  # the disk may be the full one; the parent still sees the exit code
        os._exit(1)


def _make_writer_class() -> type:
    """A ffcv ``DatasetWriter`` whose orchestration notices dead workers instead of waiting on them forever."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class _Writer(DatasetWriter):
        notes_dir: str = ""
        progress: bool = False
        target: str = ""

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            import ctypes
            from multiprocessing import Queue, Value

            self.num_samples = num_samples
            self.prepare()
            try:
                work_queue: Queue = Queue()
                for todo in queue_content:
                    work_queue.put(todo)
                for _ in range(self.num_workers):
                    work_queue.put(None)
                allocations_queue: Queue = Queue()
                done = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                worker_args = (work_queue, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                               allocations_queue, *extra_worker_args)
                procs = [Process(target=_guarded_worker, args=(self.notes_dir, work_fn, *worker_args))
                         for _ in range(self.num_workers)]
                for proc in procs:
                    proc.start()
                try:
                    allocations = self._wait(procs, done, allocations_queue)
                finally:
                    for proc in procs:
                        if proc.is_alive():
                            proc.terminate()
                        proc.join()
                self.finalize(allocations)
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _check_workers(self, procs: list[Process]) -> None:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if not dead:
                return
            messages = []
            for err in sorted(Path(self.notes_dir).glob("worker-*.err")):
                messages.append(err.read_text())
            detail = "; ".join(sorted(set(messages))) or f"exit codes {[p.exitcode for p in dead]}"
            hint = ""
            if "No space left" in detail or "File too large" in detail or "Errno 28" in detail:
                hint = " (the output disk is full: free space or write elsewhere)"
            elif "page size" in detail or "Not enough memory to fit" in detail:
                hint = " (an image is larger than a beton page: set max_resolution)"
            raise BetonWriteError(f"writing {self.target} failed in a writer process: {detail}{hint}")

        def _wait(self, procs: list[Process], done: Any, allocations_queue: Any) -> list:
            bar = tqdm(total=self.num_samples, disable=not self.progress, desc=Path(self.target).name, unit="img",
                       mininterval=0.5)
            shown = 0
            try:
                while True:
                    value = int(done.value)
                    bar.update(value - shown)
                    shown = value
                    self._check_workers(procs)
                    if value >= self.num_samples:
                        break
                    time.sleep(0.05)
            finally:
                bar.close()
            allocations: list = []
            for _ in procs:
                while True:
                    try:
                        allocations.extend(allocations_queue.get(timeout=0.5))
                        break
                    except queue.Empty:
                        self._check_workers(procs)
            return allocations

    return _Writer


def _run_writer(tmp_path: Path, source: Any, indices: list[int] | None, *, fields: dict, num_workers: int,
                page_size: int, notes_dir: str, progress: bool, target: Path) -> None:
    writer_cls = _make_writer_class()
    writer = writer_cls(str(tmp_path), fields, page_size=page_size, num_workers=num_workers)
    writer.notes_dir = notes_dir
    writer.progress = progress
    writer.target = str(target)
    chunksize = max(1, min(100, len(source) // (4 * num_workers) or 1))
    writer.from_indexed_dataset(source, indices=indices, chunksize=chunksize)


def _read_notes(notes_dir: str) -> tuple[dict[int, str], dict[int, str]]:
    errors: dict[int, str] = {}
    converted: dict[int, str] = {}
    for path in Path(notes_dir).glob("notes-*.tsv"):
        for line in path.read_text().splitlines():
            index, kind, message = line.split("\t", 2)
            (errors if kind == "error" else converted)[int(index)] = message
    return errors, converted


def _write(source: Any, out_path: str | Path, *, classes: Sequence[str], describe: Callable[[int], str],
           source_name: str, max_resolution: int | None, max_sample_bytes: int | None, jpeg_quality: int,
           compress_probability: float, write_mode: str, num_workers: int | None, seed: int, on_error: str,
           progress: bool, names: Sequence[str] | None = None) -> WriteReport:
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
        errors, conversions = _read_notes(notes_dir)
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
            new_errors, _ = _read_notes(notes_dir)
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
        progress: bool = False,
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
        progress: show a progress bar.

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
    source = _ArraySource(np.ascontiguousarray(images), labels.astype(np.int64), seed)
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
        progress: bool = True,
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
    source = _FileSource(samples, "", seed)
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
        progress: bool = True,
) -> WriteReport:
    """Write a CIFAR-10/100 split from its python-pickle archive (see :func:`load_cifar`); raw pixels by default."""
    images, labels, classes = load_cifar(archive, split)
    source = _ArraySource(images, labels, seed)
    return _write(source, out_path, classes=classes, describe=lambda i: f"{archive}[{split}][{i}]",
                  source_name=f"{archive}:{split}", max_resolution=max_resolution,
                  max_sample_bytes=int(np.prod(images.shape[1:])), jpeg_quality=jpeg_quality,
                  compress_probability=compress_probability, write_mode=write_mode, num_workers=num_workers,
                  seed=seed, on_error="raise", progress=progress)
