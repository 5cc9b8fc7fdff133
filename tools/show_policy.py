"""Print the top sub-policies of an adversarial-augmentation checkpoint and draw example images under them.

    python tools/show_policy.py CHECKPOINT [--out policy.png] [--top 10] [--images 6] [--beton VAL.beton]

Samples 512 policies from the checkpoint's controller, prints the ``--top`` most frequent sub-policies (share of all
sampled sub-policies, ops with their magnitude levels), and writes a PNG grid: one row per sub-policy, the original
images first, then the same images under that sub-policy. Images come from ``--beton`` (default: the checkpoint's
``data.val_dataset``, or the embedded demo val set for demo runs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rat.augment import AdversarialAugment, policy_from_state  # noqa: E402


def _images(beton: Path | None, count: int, size: int) -> torch.Tensor:
    if beton is None:
        from rat.data.demo import load_demo_arrays

        arrays = list(load_demo_arrays("val")[0][:count])
    else:
        from rat.data import read_beton_item

        arrays = [read_beton_item(beton, i)[0] for i in range(count)]
    tiles = []
    for array in arrays:
        image = Image.fromarray(array)
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        tiles.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(tiles)


def load_policy(checkpoint: Path) -> tuple[AdversarialAugment, dict]:
    """The checkpoint's controller as an :class:`AdversarialAugment`, and the checkpoint's config.

    Raises:
        ValueError: the checkpoint was not trained with ``--augment.policy adversarial``.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not state.get("augment_policy"):
        raise ValueError(f"{checkpoint} holds no adversarial policy: train with --augment.policy adversarial")
    return policy_from_state(state["augment_policy"]), state.get("config", {})


def show_policy(checkpoint: Path, out: Path, top: int = 10, num_images: int = 6, beton: Path | None = None,
                size: int = 96, seed: int = 0) -> list[str]:
    """Write the grid to ``out``; returns one line per top sub-policy (``'12.5%  (Rotate, 7) (Invert, 3)'``)."""
    policy, config = load_policy(checkpoint)
    beton = beton or (Path(config["data"]["val_dataset"]) if config.get("data", {}).get("val_dataset") else None)
    ranked = policy.top_sub_policies(top, seed=seed)
    space = policy.space
    lines = [f"{share:6.1%}  {space.describe(tokens)}" for tokens, share in ranked]
    x = _images(beton, num_images, size)
    fig, axes = plt.subplots(len(ranked), 2 * num_images, figsize=(1.2 * 2 * num_images, 1.35 * len(ranked)),
                             squeeze=False)
    for row, (tokens, share) in enumerate(ranked):
        policy.augment.tokens = tokens.expand(num_images, -1, -1)
        augmented = policy.augment(x, torch.Generator().manual_seed(seed + row))
        for col, tile in enumerate(torch.cat([x, augmented])):
            axis = axes[row, col]
            axis.imshow(tile.permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(f"{share:.1%}", fontsize=7)
        axes[row, num_images].set_title(space.describe(tokens), fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: CHECKPOINT's stem + _policy.png)")
    parser.add_argument("--top", type=int, default=10, help="sub-policies to show")
    parser.add_argument("--images", type=int, default=6, help="example images per sub-policy")
    parser.add_argument("--beton", type=Path, default=None, help="images from this beton (default: see above)")
    parser.add_argument("--size", type=int, default=96, help="tile size in pixels")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"show_policy: error: {args.checkpoint} not found: give a checkpoint of a run with --augment.policy "
              "adversarial", file=sys.stderr)
        return 2
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "_policy.png")
    try:
        lines = show_policy(args.checkpoint, out, args.top, args.images, args.beton, args.size)
    except (ValueError, FileNotFoundError) as err:
        print(f"show_policy: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(["top sub-policies (share of sampled sub-policies):", *lines, str(out)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
