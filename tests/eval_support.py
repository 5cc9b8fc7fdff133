"""Helpers shared by the eval and runner tests (no tests here): tiny rat checkpoints trained on the demo data."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

TINY_CLASSES = 10


def train_tiny_checkpoint(path: Path, arch: str, *, resolution: int = 32, steps: int = 80, seed: int = 0,
                          batch_size: int = 32, lr: float = 3e-3) -> Path:
    """Fit ``arch`` (a micro model, 10 classes) for a few steps to the demo *val* images and save a rat checkpoint.

    The model is fit to the very images it is evaluated on (the central 0.875 square of the 64-px images resized to
    ``resolution``, as the val loader crops them), so clean accuracy is well above chance after ~80 steps; a few
    steps on the train split do not generalize on 2 CPU cores. These tests check the evaluation pipeline, not
    generalization.
    """
    from rat.data.demo import load_demo_arrays
    from rat.models import create_model

    torch.manual_seed(seed)
    images, labels = load_demo_arrays("val")
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    side = int(0.875 * x_all.shape[-1])
    off = (x_all.shape[-1] - side) // 2
    x_all = F.interpolate(x_all[:, :, off:off + side, off:off + side], size=(resolution, resolution),
                          mode="bilinear", antialias=True, align_corners=False)
    y_all = torch.from_numpy(labels)
    model_kwargs = {"num_classes": TINY_CLASSES, "img_size": resolution, "normalize": True}
    model = create_model(arch, img_size=resolution, num_classes=TINY_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y_all), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    torch.save({"model": model.state_dict(), "model_ema": None, "arch": arch, "model_kwargs": model_kwargs,
                "epoch": 0, "config": {}}, path)
    return path


# Fit settings per micro architecture: enough steps for clean accuracy well above chance on the demo val images.
TINY_FIT = {
    "convnext_micro_cvst": {"steps": 80, "lr": 1e-3},
    "vit_micro_patch16_cvst": {"steps": 60, "lr": 1e-3},
}


def tiny_checkpoint(base: Path, arch: str) -> Path:
    """A tiny checkpoint of ``arch`` at 32 px under ``base`` (the session's pytest base temp), trained once."""
    root = base / "tiny_checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{arch}.pth"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        train_tiny_checkpoint(tmp, arch, resolution=32, **TINY_FIT[arch])
        tmp.rename(path)
    return path
