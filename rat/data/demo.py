"""The embedded default dataset: "photo digits", a 10-class smoke-test set built from data shipped with scikit-learn.

No dataset can be downloaded at run time, and no PyPI package ships CIFAR, Imagenette or Tiny-ImageNet. scikit-learn
does ship two things that are real: ``load_digits`` (1,797 handwritten 8×8 greyscale digits, 10 balanced classes)
and two colour photographs (``load_sample_images``: a Chinese temple and a flower, 427×640). Each demo image is one
digit, upscaled with bicubic interpolation to 32–51 px, tinted in a random colour that contrasts with its surroundings
and alpha-blended at a random position over a random crop (random scale and horizontal flip) of one of the two
photos (blurred, contrast halved), at 64×64 RGB. The label is the digit's own label.

Split: a class-stratified, seeded split of the 1,797 digits into 1,497 train and 300 val digits; each train digit is
composited three times (4,491 train images, different photo crops, colours and positions), each val digit once (300
images), so val digits were never seen in training. The whole thing is deterministic: the same arrays on every machine.

It is a smoke-test dataset for the demo run and the tests, not a benchmark: numbers on it say the pipeline learns,
nothing about ImageNet.
"""
from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from rat.io import FileLock

_logger = logging.getLogger(__name__)

DEMO_CLASSES: list[str] = [str(d) for d in range(10)]
DEMO_RESOLUTION = 64
DEMO_VAL_PER_CLASS = 30
DEMO_TRAIN_COPIES = 3
# Bump when the generator changes so cached betons are rebuilt.
DEMO_VERSION = 2
_SEED = 20230301


def _background(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of ``photo`` (side 15–60 % of the short edge), flipped half the time, resized to size,
    softened (Gaussian blur, contrast halved) so that the digit, not the photo's texture, carries the label."""
    height, width = photo.shape[:2]
    side = int(rng.uniform(0.15, 0.6) * min(height, width))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = photo[top:top + side, left:left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
    soft = np.asarray(resized.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    return 0.5 * soft + 0.5 * soft.mean(axis=(0, 1), keepdims=True)


def _composite(digit: np.ndarray, photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Blend one 8×8 digit (values 0–16) in a contrasting colour over a photo crop; returns uint8 (size, size, 3)."""
    canvas = _background(photo, rng, size)
    digit_size = int(rng.integers(int(0.5 * size), int(0.8 * size) + 1))
    digit_img = Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8))
    alpha_img = digit_img.resize((digit_size, digit_size), Image.BICUBIC)
    alpha = np.asarray(alpha_img, dtype=np.float32)[..., None] / 255.0
    top = int(rng.integers(0, size - digit_size + 1))
    left = int(rng.integers(0, size - digit_size + 1))
    region = canvas[top:top + digit_size, left:left + digit_size]
    # A colour far from the region's mean colour keeps the digit visible on any background.
    base = 255.0 - region.reshape(-1, 3).mean(axis=0)
    colour = np.clip(base + rng.normal(0.0, 40.0, size=3), 0.0, 255.0)
    canvas[top:top + digit_size, left:left + digit_size] = (1.0 - alpha) * region + alpha * colour
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _build() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]
    rng = np.random.default_rng(_SEED)
    labels = digits.target.astype(np.int64)
    val_idx = np.concatenate([
        rng.choice(np.flatnonzero(labels == c), DEMO_VAL_PER_CLASS, replace=False) for c in range(len(DEMO_CLASSES))
    ])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val_idx] = True
    def composites(indices: np.ndarray) -> np.ndarray:
        return np.stack([_composite(digits.images[i], photos[int(rng.integers(len(photos)))], rng, DEMO_RESOLUTION)
                         for i in indices])

    train_idx = np.tile(np.flatnonzero(~is_val), DEMO_TRAIN_COPIES)
    val_idx = np.flatnonzero(is_val)
    return {"train": (composites(train_idx), labels[train_idx]), "val": (composites(val_idx), labels[val_idx])}


def load_demo_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the demo split as ``(images uint8 (N, 64, 64, 3) RGB, labels int64 (N,))``.

    Args:
        split: ``'train'`` (4,491 images) or ``'val'`` (300 images, 30 per class).
    """
    splits = _build()
    if split not in splits:
        raise ValueError(f"unknown demo split {split!r}: use 'train' or 'val'")
    images, labels = splits[split]
    return images.copy(), labels.copy()


def demo_root(configured: str | Path = "") -> Path:
    """Where the demo betons live: ``configured`` if given, else ``$XDG_CACHE_HOME/rat/demo`` (~/.cache/rat/demo)."""
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rat" / "demo"


def ensure_demo_betons(root: str | Path) -> tuple[Path, Path]:
    """Write ``root/train.beton`` and ``root/val.beton`` (plus their classes files) unless an up-to-date copy exists.

    The betons store every image raw (no JPEG) at 64 px, so the demo data is lossless.

    Returns:
        The train and val beton paths.
    """
    from rat.data import write_arrays_beton

    root = Path(root)
    stamp = root / "demo_version.json"
    paths = root / "train.beton", root / "val.beton"
    expected = {"version": DEMO_VERSION, "resolution": DEMO_RESOLUTION}
    # Several processes may want the same cache at once (two runs, parallel test workers): one writes, the others
    # wait for it and then find the stamp.
    with FileLock(root / ".writing.lock").acquire():
        if stamp.exists() and all(p.exists() for p in paths) and json.loads(stamp.read_text()) == expected:
            return paths
        for split, path in zip(("train", "val"), paths):
            images, labels = load_demo_arrays(split)
            _logger.info("writing demo %s set (%d images) to %s", split, len(labels), path)
            write_arrays_beton(images, labels, path, classes=DEMO_CLASSES, max_resolution=DEMO_RESOLUTION,
                               compress_probability=0.0, write_mode="raw")
        stamp.write_text(json.dumps(expected))
    return paths
