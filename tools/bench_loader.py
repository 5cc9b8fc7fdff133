"""Images/s of the rat FFCV train pipeline vs torchvision ImageFolder + DataLoader on the same JPEG files.

Four pipelines, same files, batch size, worker count and crop size, each timed after one warm-up epoch (rat's warm-up
includes numba compilation, torchvision's the worker start-up):

* ``rat``: beton (written here with the recommended settings: longest side 256, half JPEG q90 / half raw) ->
  RandomResizedCrop + flip -> [0, 1] float channels_last batches;
* ``rat_heavy``: the same + per-image RandAugment ``rand-m9-mstd0.5-inc1`` and random erasing (p=0.25, pixel) on
  the batch (on ``--device``), then timm Mixup/CutMix (0.8 / 1.0, switch 0.5, smoothing 0.1);
* ``torchvision``: ``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` in
  ``DataLoader`` workers;
* ``torchvision_heavy``: timm ``create_transform`` with the same RandAugment string, random erasing and bicubic
  interpolation (the reference recipe), then timm Mixup in the loop.

``--repeats N`` measures the four pipelines N times, interleaved (rat, rat heavy, torchvision, torchvision heavy,
then again), so that the noise of a shared machine hits all of them alike; each loader is built once and reused.

Prints one JSON object: ``rat_img_s``, ``torchvision_img_s``, ``rat_heavy_img_s``, ``torchvision_heavy_img_s``, the
speed-ups and the heavy augmentation's per-image cost as medians over the repeats, ``ranges`` with
``{min, median, max, runs}`` of each (ratios and costs are taken per repeat, from runs measured side by side), the
load average before and after, and the exact settings. ``--make-data DIR`` first builds an ImageFolder of ~400 px
JPEGs from scikit-learn's two sample photos (random crops, sizes and flips), which ``--data`` then defaults to.

Example::

    python tools/bench_loader.py --make-data /tmp/bench_jpegs --batch-size 64 --workers 2 --resolution 160 --repeats 5
"""
from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: torch's OpenMP pool otherwise steals the cores that ffcv's decoding
# threads (TBB) need, which halves rat's throughput on a small machine. Set before torch loads OpenMP; it applies to
# every pipeline measured here (DataLoader workers inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _timing import images_per_second  # noqa: E402

from rat.logging import logging_scope, setup_logging  # noqa: E402

_logger = logging.getLogger("rat.tools.bench_loader")

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def make_jpeg_folder(root: Path, num_images: int, num_classes: int, seed: int = 0, side: int = 400) -> Path:
    """An ImageFolder of ``num_images`` JPEGs (q90) about ``side`` px on the long edge, cut from sklearn's photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        crop_h = int(rng.integers(height // 2, height + 1))
        crop_w = int(min(width, crop_h * rng.uniform(0.75, 1.5)))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        crop = photo[top:top + crop_h, left:left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        long_side = int(rng.integers(int(side * 0.9), int(side * 1.1) + 1))
        scale = long_side / max(crop.shape[:2])
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        image = Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BICUBIC)
        class_dir = root / f"class_{i % num_classes:02d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        image.save(class_dir / f"img_{i:05d}.JPEG", quality=90)
    return root


def _safe_posterize_ops() -> None:
    """timm's Posterize ops call ``ImageOps.posterize(img, 0)`` at magnitude 10, which Pillow >= 13 refuses (older
    Pillow returned a black image). Restore the old result so the reference pipeline does not crash mid-benchmark."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size, 0)
        return ImageOps.posterize(img, bits_to_keep)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize


def torchvision_epochs(folder: Path, *, batch_size: int, workers: int, resolution: int, heavy: bool,
                       num_classes: int) -> Callable[[], Iterable[int]]:
    """One epoch of the torchvision (+ timm, when ``heavy``) pipeline per call; yields the batch sizes."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from rat.augment import build_mixup

    if heavy:
        from timm.data import create_transform

        _safe_posterize_ops()
        transform = create_transform(resolution, is_training=True, auto_augment=RAND_AUGMENT, re_prob=0.25,
                                     re_mode="pixel", interpolation="bicubic", mean=(0.0, 0.0, 0.0),
                                     std=(1.0, 1.0, 1.0))
        mixup = build_mixup(num_classes=num_classes)
    else:
        transform = transforms.Compose([transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor()])
        mixup = None
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=True)

    def epoch() -> Iterable[int]:
        for x, y in loader:
            if mixup is not None:
                x, y = mixup(x, y)
            yield x.shape[0]

    return epoch


def rat_epochs(loader: Any, *, heavy: bool, device: torch.device, num_classes: int) -> Callable[[], Iterable[int]]:
    """One epoch of rat's pipeline (``loader`` + the heavy augmentation and Mixup when ``heavy``) per call."""
    from rat.augment import build_augment, build_mixup

    augment = build_augment(RAND_AUGMENT, re_prob=0.25) if heavy else None
    mixup = build_mixup(num_classes=num_classes) if heavy else None
    generator = torch.Generator().manual_seed(0)

    def epoch() -> Iterable[int]:
        for x, y in loader:
            if augment is not None:
                x = augment(x, generator)
                x, y = mixup(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            yield x.shape[0]

    return epoch


def _spread(values: Sequence[float], digits: int) -> dict[str, Any]:
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="ImageFolder of JPEGs (default: --make-data's folder)")
    parser.add_argument("--make-data", type=Path, help="first build an ImageFolder of ~400 px JPEGs here")
    parser.add_argument("--num-images", type=int, default=512, help="images --make-data builds")
    parser.add_argument("--num-classes", type=int, default=10, help="classes --make-data builds")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="ffcv threads = DataLoader worker processes")
    parser.add_argument("--resolution", type=int, default=160, help="RandomResizedCrop size")
    parser.add_argument("--device", default="cpu", help="where rat's batches (and its heavy augmentation) go")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=10.0, help="time whole epochs until at least this long")
    parser.add_argument("--beton-dir", type=Path, help="where the beton is written (default: a temp dir)")
    parser.add_argument("--max-resolution", type=int, default=256, help="beton: longest side (0 = full size)")
    parser.add_argument("--write-mode", default="proportion", help="beton: raw, jpg, smart or proportion")
    parser.add_argument("--compress-probability", type=float, default=0.5, help="beton: JPEG share (proportion)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="beton: JPEG quality")
    parser.add_argument("--skip-heavy", action="store_true", help="only the plain pipelines")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every pipeline (ranges in JSON)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be >= 1")
    if args.data is None and args.make_data is None:
        parser.error("pass --data IMAGEFOLDER_DIR, or --make-data DIR to build one")
    return args


@logging_scope()
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from rat.data import list_image_folder, write_folder_beton

    if args.make_data is not None:
        make_jpeg_folder(args.make_data, args.num_images, args.num_classes)
        _logger.info("built %d JPEGs in %s", args.num_images, args.make_data)
    folder = args.data or args.make_data
    samples, classes = list_image_folder(folder)
    with tempfile.TemporaryDirectory(prefix="rat-bench-") as tmp:
        beton_dir = args.beton_dir or Path(tmp)
        beton_dir.mkdir(parents=True, exist_ok=True)
        report = write_folder_beton(folder, beton_dir / "bench.beton", max_resolution=args.max_resolution or None,
                                    write_mode=args.write_mode, compress_probability=args.compress_probability,
                                    jpeg_quality=args.jpeg_quality, num_workers=args.workers, progress=False)
        device = torch.device(args.device)
        from rat.data import build_train_loader

        loader = build_train_loader(report.path, batch_size=args.batch_size, resolution=args.resolution,
                                    device=device, num_workers=args.workers, seed=0)
        names = ["rat", "rat_heavy", "torchvision", "torchvision_heavy"] if not args.skip_heavy else \
            ["rat", "torchvision"]
        tv = dict(batch_size=args.batch_size, workers=args.workers, resolution=args.resolution,
                  num_classes=len(classes))
        epochs = {
            "rat": rat_epochs(loader, heavy=False, device=device, num_classes=len(classes)),
            "rat_heavy": rat_epochs(loader, heavy=True, device=device, num_classes=len(classes)),
            "torchvision": torchvision_epochs(folder, heavy=False, **tv),
            "torchvision_heavy": torchvision_epochs(folder, heavy=True, **tv),
        }
        load_before = _load()
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names:
                # Warm-up before the first run of each pipeline only: numba compilation, worker start-up.
                warmup = args.warmup_epochs if repeat == 0 else 0
                runs[name].append(images_per_second(epochs[name], warmup, args.min_seconds))
                _logger.info("run %d/%d %s: %.0f img/s", repeat + 1, args.repeats, name, runs[name][-1]["img_s"])
        load_after = _load()
        del loader, epochs
        beton_mib = report.path.stat().st_size / 2**20

    sizes = []
    from PIL import Image

    for path, _ in samples[:: max(1, len(samples) // 50)]:
        with Image.open(path) as img:
            sizes.append(max(img.size))
    series: dict[str, list[float]] = {f"{name}_img_s": [r["img_s"] for r in runs[name]] for name in runs}
    series["speedup_plain"] = [r / t for r, t in zip(series["rat_img_s"], series["torchvision_img_s"])]
    if not args.skip_heavy:
        series["speedup_heavy"] = [r / t for r, t in zip(series["rat_heavy_img_s"],
                                                         series["torchvision_heavy_img_s"])]
        # Per-image cost of the heavy augmentation, in ms, and as a share of the plain pipeline's throughput.
        for name in ("rat", "torchvision"):
            pairs = list(zip(series[f"{name}_img_s"], series[f"{name}_heavy_img_s"]))
            series[f"heavy_cost_{name}_ms_per_img"] = [1000 * (1 / heavy - 1 / plain) for plain, heavy in pairs]
            series[f"heavy_slowdown_{name}"] = [1 - heavy / plain for plain, heavy in pairs]
    digits = {key: 1 if key.endswith("_img_s") else 2 if key.startswith("speedup") else 3 for key in series}
    out: dict[str, Any] = {key: round(statistics.median(values), digits[key]) for key, values in series.items()}
    out["ranges"] = {key: _spread(values, digits[key]) for key, values in series.items()}
    out["repeats"] = args.repeats
    out["load_average_1_5_15min"] = {"before": load_before, "after": load_after}
    out["settings"] = {
        "images": len(samples), "classes": len(classes), "median_long_side_px": int(np.median(sizes)),
        "batch_size": args.batch_size, "workers": args.workers, "resolution": args.resolution,
        "device": str(device), "warmup_epochs": args.warmup_epochs, "min_seconds": args.min_seconds,
        "timed": {k: {"images": sum(r["images"] for r in v), "epochs": sum(r["epochs"] for r in v),
                      "seconds": round(sum(r["seconds"] for r in v), 2)} for k, v in runs.items()},
        "beton": {"max_resolution": args.max_resolution or None, "write_mode": args.write_mode,
                  "compress_probability": args.compress_probability, "jpeg_quality": args.jpeg_quality,
                  "size_mib": round(beton_mib, 1), "write_s": round(report.seconds, 1)},
        "heavy": {"rand_augment": RAND_AUGMENT, "re_prob": 0.25, "re_mode": "pixel", "mixup": 0.8, "cutmix": 1.0,
                  "switch_prob": 0.5, "label_smoothing": 0.1},
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
