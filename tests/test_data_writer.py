"""Beton writer: exact round trips, ImageFolder order, bad inputs, bad outputs, CIFAR archives (CPU, tiny tmp data)."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv")

from rat.data import (  # noqa: E402
    BetonWriteError,
    list_image_folder,
    read_beton_info,
    read_beton_item,
    read_classes,
    write_arrays_beton,
    write_cifar_beton,
    write_folder_beton,
)
from rat.data.demo import DEMO_CLASSES, load_demo_arrays  # noqa: E402
from rat.data.meta import classes_path  # noqa: E402
from rat.data.sources import load_cifar  # noqa: E402

pytestmark = [pytest.mark.ffcv, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def demo_subset() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_demo_arrays("val")
    return images[:40], labels[:40]


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[seed % 2]
    rng = np.random.default_rng(seed)
    top = int(rng.integers(0, photo.shape[0] - height))
    left = int(rng.integers(0, photo.shape[1] - width))
    return np.ascontiguousarray(photo[top:top + height, left:left + width])


def test_arrays_raw_round_trip_is_exact(tmp_path: Path, demo_subset: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = demo_subset
    path = write_arrays_beton(images, labels, tmp_path / "raw.beton", classes=DEMO_CLASSES, write_mode="raw",
                              num_workers=2)
    assert path == tmp_path / "raw.beton"
    assert read_classes(path) == DEMO_CLASSES
    assert read_beton_info(path)["num_samples"] == len(labels)
    for i in range(len(labels)):
        image, label = read_beton_item(path, i)
        assert label == labels[i]
        np.testing.assert_array_equal(image, images[i])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.beton", "raw.beton.classes.json"]


def test_arrays_proportion_mode_keeps_order_and_is_reproducible(tmp_path: Path,
                                                                demo_subset: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = demo_subset
    first = write_arrays_beton(images, labels, tmp_path / "a.beton", classes=DEMO_CLASSES, num_workers=2, seed=3)
    second = write_arrays_beton(images, labels, tmp_path / "b.beton", classes=DEMO_CLASSES, num_workers=1, seed=3)
    exact = 0
    for i in range(len(labels)):
        image, label = read_beton_item(first, i)
        # Same seed: the same JPEG/raw choice and bytes per sample, whatever the worker count.
        np.testing.assert_array_equal(image, read_beton_item(second, i)[0])
        assert label == labels[i]
        errors = np.abs(image.astype(np.int16)[None] - images).mean(axis=(1, 2, 3))
        assert errors.argmin() == i and errors[i] < 10.0, f"sample {i} is not source image {i}: {errors[i]:.1f}"
        exact += bool(errors[i] == 0)
    assert 0 < exact < len(labels)  # some stored raw, some as JPEG


def test_max_resolution_resizes_longest_side(tmp_path: Path) -> None:
    images = np.stack([_photo(60, 90, s) for s in range(4)])
    path = write_arrays_beton(images, np.arange(4), tmp_path / "r.beton", classes=list("abcd"), write_mode="raw",
                              max_resolution=45, num_workers=1)
    image, _ = read_beton_item(path, 2)
    assert image.shape == (30, 45, 3)


def test_arrays_input_validation(tmp_path: Path) -> None:
    good = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        write_arrays_beton(good.astype(np.float32), np.zeros(2, int), tmp_path / "x.beton", classes=["a"])
    with pytest.raises(ValueError, match="labels span"):
        write_arrays_beton(good, np.array([0, 2]), tmp_path / "x.beton", classes=["a", "b"])
    with pytest.raises(ValueError, match="write_mode"):
        write_arrays_beton(good, np.zeros(2, int), tmp_path / "x.beton", classes=["a"], write_mode="png")
    assert list(tmp_path.iterdir()) == []


def _make_folder(root: Path) -> dict[str, int]:
    """A tiny ImageNet-style tree with the real-world oddities; returns {relative file: expected label}."""
    expected = {}
    for label, name in enumerate(["n01_cat", "n02_dog", "n03_eel"]):
        (root / name / "sub").mkdir(parents=True)
        for i in range(3):
            rel = f"{name}/img{i}.JPEG" if i < 2 else f"{name}/sub/img{i}.jpeg"
            Image.fromarray(_photo(40 + 8 * i, 56, 10 * label + i)).save(root / rel, quality=92)
            expected[rel] = label
    Image.fromarray(_photo(48, 48, 7)).convert("CMYK").save(root / "n01_cat" / "cmyk.JPEG")
    expected["n01_cat/cmyk.JPEG"] = 0
    Image.fromarray(_photo(48, 40, 8)).save(root / "n02_dog" / "png_inside.JPEG", format="PNG")
    expected["n02_dog/png_inside.JPEG"] = 1
    Image.fromarray(_photo(36, 44, 9)).convert("L").save(root / "n03_eel" / "grey.JPEG")
    expected["n03_eel/grey.JPEG"] = 2
    (root / "n02_dog" / "readme.txt").write_text("not an image")
    return expected


def test_folder_order_matches_torchvision_imagefolder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    _make_folder(tmp_path / "train")
    samples, classes = list_image_folder(tmp_path / "train")
    reference = datasets.ImageFolder(str(tmp_path / "train"))
    assert classes == reference.classes
    assert samples == [(path, label) for path, label in reference.samples]


def test_folder_converts_odd_files_and_reports_unreadable_ones(tmp_path: Path) -> None:
    root = tmp_path / "train"
    expected = _make_folder(root)
    (root / "n02_dog" / "garbage.JPEG").write_bytes(os.urandom(700))
    good = (root / "n01_cat" / "img0.JPEG").read_bytes()
    (root / "n01_cat" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out" / "train.beton"
    out.parent.mkdir()

    report = write_folder_beton(root, out, write_mode="raw", max_resolution=None, num_workers=2, progress=False)

    assert sorted(Path(f).name for f, _ in report.skipped) == ["garbage.JPEG", "truncated.JPEG"]
    assert all(err for _, err in report.skipped)
    assert report.converted == {"CMYK": 1, "PNG-as-.JPEG": 1, "L": 1}
    info = read_beton_info(out)
    assert sorted(Path(s["file"]).name for s in info["skipped"]) == ["garbage.JPEG", "truncated.JPEG"]
    assert info["classes"] == ["n01_cat", "n02_dog", "n03_eel"]
    # Sample i is the i-th readable file in ImageFolder order, with its label and (raw) pixels.
    samples, _ = list_image_folder(root)
    readable = [(p, lab) for p, lab in samples if Path(p).name not in ("garbage.JPEG", "truncated.JPEG")]
    assert report.num_samples == len(readable) == len(expected)
    for i, (file, label) in enumerate(readable):
        image, stored_label = read_beton_item(out, i)
        assert stored_label == label == expected[str(Path(file).relative_to(root))]
        with Image.open(file) as img:
            np.testing.assert_array_equal(image, np.asarray(img.convert("RGB")))


def test_folder_on_error_raise_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _make_folder(root)
    (root / "n03_eel" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(BetonWriteError, match="broken.JPEG"):
        write_folder_beton(root, tmp_path / "x.beton", on_error="raise", num_workers=2, progress=False)
    assert not any(p.name.startswith((".x.beton", "x.beton")) for p in tmp_path.iterdir())


def test_folder_input_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_folder_beton(tmp_path / "missing", tmp_path / "x.beton", progress=False)
    (tmp_path / "flat").mkdir()
    Image.fromarray(_photo(20, 20, 1)).save(tmp_path / "flat" / "a.JPEG")
    with pytest.raises(FileNotFoundError, match="no class sub-directories"):
        write_folder_beton(tmp_path / "flat", tmp_path / "x.beton", progress=False)
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(_photo(20, 20, 1)).save(root / "a" / "1.JPEG")
    (root / "b" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"hold no image files.*\['b'\]"):
        write_folder_beton(root, tmp_path / "x.beton", progress=False)
    with pytest.raises(ValueError, match="class list lacks"):
        list_image_folder(root, classes=["a"])
    assert not (tmp_path / "x.beton").exists()


def test_val_classes_follow_the_given_train_classes(tmp_path: Path) -> None:
    root = tmp_path / "val"
    (root / "b").mkdir(parents=True)
    Image.fromarray(_photo(20, 24, 2)).save(root / "b" / "1.JPEG")
    report = write_folder_beton(root, tmp_path / "val.beton", classes=["a", "b", "c"], num_workers=1, progress=False)
    assert report.classes == ["a", "b", "c"]
    assert read_beton_item(tmp_path / "val.beton", 0)[1] == 1


def test_output_errors_are_clear_and_leave_nothing(tmp_path: Path) -> None:
    images, labels = np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, int)
    with pytest.raises(FileNotFoundError, match="create it first"):
        write_arrays_beton(images, labels, tmp_path / "nodir" / "x.beton", classes=["a"])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        write_arrays_beton(images, labels, tmp_path / "afile" / "x.beton", classes=["a"])
    with pytest.raises(IsADirectoryError):
        write_arrays_beton(images, labels, tmp_path, classes=["a"])
    if Path("/proc/self").is_dir():  # a directory where no file can be created, even by root
        with pytest.raises((BetonWriteError, PermissionError), match="writable"):
            write_arrays_beton(images, labels, "/proc/rat-test.beton", classes=["a"], num_workers=1)


def test_full_disk_gives_one_clear_error_and_no_file(tmp_path: Path) -> None:
    """The writer processes hit the file-size limit (as on a full disk): one error, no beton, no temp file."""
    script = textwrap.dedent(f"""
        import resource, signal, numpy as np
        from rat.data import write_arrays_beton, BetonWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, resource.RLIM_INFINITY))
        images = np.random.default_rng(0).integers(0, 255, (300, 64, 64, 3), dtype=np.uint8)
        try:
            write_arrays_beton(images, np.zeros(300, int), {str(tmp_path / 'big.beton')!r}, classes=['a'],
                               write_mode='raw', num_workers=2)
        except BetonWriteError as exc:
            print('ERROR', exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert "ERROR" in done.stdout, done.stdout + done.stderr
    assert "big.beton failed" in done.stdout and "disk is full" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_classes_file_must_match_the_beton(tmp_path: Path) -> None:
    images, labels = np.zeros((3, 8, 8, 3), np.uint8), np.zeros(3, int)
    path = write_arrays_beton(images, labels, tmp_path / "x.beton", classes=["a"], num_workers=1)
    side = classes_path(path)
    side.write_text(side.read_text().replace('"num_samples": 3', '"num_samples": 4'))
    with pytest.raises(ValueError, match="different writes"):
        read_classes(path)
    side.unlink()
    with pytest.raises(FileNotFoundError, match="classes file"):
        read_classes(path)


def _cifar_archive(path: Path, hundred: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A small archive in the real CIFAR python layout (dicts of numpy arrays, latin1 str keys, pickled)."""
    n_classes = 100 if hundred else 10
    names = [f"class_{i:03d}" for i in range(n_classes)]
    parts = {"train": 12, "test": 6} if hundred else {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 6}
    train_images, train_labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, obj: dict) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{'cifar-100-python' if hundred else 'cifar-10-batches-py'}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("meta" if hundred else "batches.meta", {"fine_label_names" if hundred else "label_names": names})
        for name, count in parts.items():
            data = rng.integers(0, 255, (count, 3072), dtype=np.uint8)
            labels = rng.integers(0, n_classes, count).tolist()
            add(name, {"data": data, "fine_labels" if hundred else "labels": labels})
            if name != "test" and name != "test_batch":
                train_images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                train_labels += labels
    return np.concatenate(train_images), np.array(train_labels), names


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_archive_round_trip(tmp_path: Path, hundred: bool) -> None:
    images, labels, names = _cifar_archive(tmp_path / "cifar.tar.gz", hundred, np.random.default_rng(int(hundred)))
    got_images, got_labels, got_names = load_cifar(tmp_path / "cifar.tar.gz", "train")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_names == names
    report = write_cifar_beton(tmp_path / "cifar.tar.gz", tmp_path / "train.beton", split="train", num_workers=2,
                               progress=False)
    assert report.num_samples == len(labels) and read_classes(report.path) == names
    for i in (0, len(labels) - 1):
        image, label = read_beton_item(report.path, i)
        np.testing.assert_array_equal(image, images[i])
        assert label == labels[i]
    assert len(load_cifar(tmp_path / "cifar.tar.gz", "val")[1]) == 6


def test_cifar_loader_refuses_foreign_pickles(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned",))

    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        data = pickle.dumps({"label_names": Evil()})
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar(tmp_path / "evil.tar.gz", "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar(tmp_path / "none.tar.gz", "train")
