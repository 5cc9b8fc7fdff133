"""Batched per-image RandAugment and random erasing: timm/PIL semantics, per-sample randomness, seeding, devices."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from rat.augment import build_augment, build_mixup, erasing, ops, randaugment

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 48 x 64 RGB crop of a real photo (sklearn's sample image), uint8."""
    from sklearn.datasets import load_sample_images

    return np.ascontiguousarray(load_sample_images().images[1][100:292:4, 200:456:4])


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return _to_tensor(np.asarray(image))


def test_parse_rand_augment() -> None:
    spec = randaugment.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_std, spec.increasing) == (9, 2, 0.5, 0.5, True)
    assert spec.ops == randaugment.RAND_INCREASING_OPS
    assert randaugment.parse_rand_augment("rand-n3-m5-p0.8-mmax12").ops == randaugment.RAND_OPS
    assert randaugment.parse_rand_augment("rand-mstd101").magnitude_std == float("inf")
    for bad in ("augmix-m3", "rand-x3", "rand-tweights"):
        with pytest.raises(ValueError):
            randaugment.parse_rand_augment(bad)


def test_op_lists_match_timm() -> None:
    from timm.data.auto_augment import rand_augment_choices

    assert randaugment.RAND_INCREASING_OPS == tuple(rand_augment_choices("", increasing=True))
    assert randaugment.RAND_OPS == tuple(rand_augment_choices("", increasing=False))


@pytest.mark.parametrize("name", [n for n in randaugment.RAND_INCREASING_OPS + randaugment.RAND_OPS
                                  + ("PosterizeOriginal",) if n not in ("AutoContrast", "Equalize", "Invert")])
def test_level_to_arg_matches_timm(name: str) -> None:
    from timm.data.auto_augment import LEVEL_TO_ARG

    hparams = {"translate_const": 250, "img_mean": (128, 128, 128)}

    for magnitude in (0.0, 3.3, 9.0, 9.74, 10.0):
        timm_values = set()
        for seed in range(40):  # timm negates at random; collect both signs
            random.seed(seed)
            timm_values.add(round(float(LEVEL_TO_ARG[name](magnitude, hparams)[0]), 9))
        ours = {round(float(ops.level_to_arg(name, torch.tensor([magnitude], dtype=torch.float64),
                                             torch.tensor([s], dtype=torch.float64))[0]), 9) for s in (1.0, -1.0)}
        assert ours == timm_values, f"{name} at magnitude {magnitude}"


COLOR_CASES = [
    ("AutoContrast", ops.auto_contrast, None), ("Equalize", ops.equalize, None), ("Invert", ops.invert, None),
    ("Posterize", ops.posterize, 2), ("Posterize", ops.posterize, 0), ("Solarize", ops.solarize, 100),
    ("SolarizeAdd", ops.solarize_add, 60), ("Color", ops.color, 1.7), ("Color", ops.color, 0.2),
    ("Contrast", ops.contrast, 0.4), ("Contrast", ops.contrast, 1.8), ("Brightness", ops.brightness, 1.6),
    ("Sharpness", ops.sharpness, 1.9), ("Sharpness", ops.sharpness, 0.1),
]


@pytest.mark.parametrize(("name", "fn", "arg"), COLOR_CASES)
def test_color_ops_match_timm_pil_ops(photo: np.ndarray, name: str, fn, arg) -> None:  # noqa: ANN001
    from timm.data.auto_augment import NAME_TO_OP

    image = Image.fromarray(photo)
    if name == "Posterize" and arg == 0:  # timm's level 10; Pillow >= 13 refuses bits=0, older Pillow made it black
        reference = torch.zeros_like(_to_tensor(photo))
    else:
        reference = _pil_to_tensor(NAME_TO_OP[name](image) if arg is None else NAME_TO_OP[name](image, arg))
    ours = fn(_to_tensor(photo), torch.tensor([0.0 if arg is None else float(arg)]))
    # PIL rounds to 8 bits; we stay in float: at most a rounding step apart.
    assert (ours - reference).abs().max() <= 1.5 / 255, name
    assert not torch.equal(ours, _to_tensor(photo)) or name == "Posterize"


@pytest.mark.parametrize(("name", "arg"), [("Rotate", 20.0), ("Rotate", -25.0), ("ShearX", 0.25), ("ShearY", -0.2),
                                           ("TranslateXRel", 0.3), ("TranslateYRel", -0.3)])
def test_geometric_ops_match_timm_pil_ops(photo: np.ndarray, name: str, arg: float) -> None:
    from timm.data.auto_augment import NAME_TO_OP

    image = Image.fromarray(photo)
    height, width = photo.shape[:2]
    reference = _pil_to_tensor(NAME_TO_OP[name](image, arg, resample=Image.BILINEAR, fillcolor=(0, 0, 0)))
    fill = torch.zeros(3)

    def ours(value: float) -> torch.Tensor:
        theta = ops.affine_theta([name], torch.tensor([value]), height, width)
        return ops.geometric(_to_tensor(photo), theta, fill, "bilinear")

    error = (ours(arg) - reference).abs()[..., 1:-1, 1:-1].mean()
    mirrored = (ours(-arg) - reference).abs()[..., 1:-1, 1:-1].mean()
    assert error < 0.01, f"{name}({arg}) differs from PIL by {error:.4f} on average"
    assert mirrored > 5 * error  # the check sees a wrong direction


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_geometric_is_affine_grid_and_grid_sample(mode: str) -> None:
    """The resampling (translations as weighted slices, the rest through a closed-form grid) equals torch's
    ``affine_grid`` + ``grid_sample`` with zero padding around the fill, on NCHW and channels_last batches."""
    import torch.nn.functional as F

    x = torch.rand(6, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    names = ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateXRel"]
    theta = ops.affine_theta(names, torch.tensor([20.0, 0.2, -0.3, 0.137, -0.29, -0.6]), 24, 32)
    for fill in (torch.zeros(3), torch.tensor([0.2, 0.5, 0.9])):
        colour = fill.view(1, 3, 1, 1)
        grid = F.affine_grid(theta.float(), [6, 3, 24, 32], align_corners=False)
        reference = F.grid_sample(x - colour, grid, mode=mode, padding_mode="zeros", align_corners=False)
        reference = reference.add_(colour).clamp_(0.0, 1.0)
        for batch in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(ops.geometric(batch, theta, fill, mode), reference, atol=2e-5, rtol=0)


def test_batch_augment_is_per_sample_and_in_range(photo: np.ndarray) -> None:
    x = _to_tensor(photo).repeat(32, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    augment = build_augment()
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert torch.equal(x, _to_tensor(photo).repeat(32, 1, 1, 1))  # the input is untouched
    distinct = {tuple(v.flatten()[::97].tolist()) for v in out}
    assert len(distinct) >= 24, "identical images must get their own ops and magnitudes"
    changed = (out - x).abs().flatten(1).amax(1) > 0
    assert 24 <= int(changed.sum()) < 32  # P(no op and no erase) = 0.75**2 * 0.75 ~ 0.42 ... per image: some stay


def test_batch_augment_is_deterministic_under_a_seed(photo: np.ndarray) -> None:
    x = _to_tensor(photo).repeat(8, 1, 1, 1)
    augment = build_augment(interpolation="random")
    first = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(first, augment(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment(x, torch.Generator().manual_seed(6)))
    torch.manual_seed(1)
    a = augment(x)
    torch.manual_seed(1)
    assert torch.equal(a, augment(x))  # no generator: follows torch.manual_seed
    # channels_last input, same seed: same values.
    cl = augment(x.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(5))
    torch.testing.assert_close(cl, first, atol=1e-5, rtol=0)


def test_cpu_result_does_not_depend_on_the_thread_count(photo: np.ndarray) -> None:
    """On the CPU the batch ops run on one intra-op thread, whatever the caller's setting, which is restored."""
    x = _to_tensor(photo).repeat(16, 1, 1, 1)
    augment = build_augment(interpolation="random")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(augment(x, torch.Generator().manual_seed(5)))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_each_layer_applies_ops_with_probability_p(photo: np.ndarray) -> None:
    """Statistics of the op choice: with p=0.5 and 2 layers about 1/4 of the images get no op at all."""
    x = _to_tensor(photo).repeat(400, 1, 1, 1)[..., :16, :16]
    out = randaugment.BatchRandAugment("rand-m9-mstd0.5-inc1")(x, torch.Generator().manual_seed(0))
    untouched = float(((out - x).abs().flatten(1).amax(1) == 0).float().mean())
    # untouched = no op in both layers (0.25) + ops that are identities on this image (rare)
    assert 0.18 < untouched < 0.36


def test_random_erasing_matches_timm_statistics() -> None:
    from timm.data.random_erasing import RandomErasing

    random.seed(0)
    ones = torch.ones(2000, 3, 24, 32)
    timm_out = RandomErasing(1.0, mode="const", device="cpu")(ones.clone())
    ours = erasing.BatchRandomErasing(1.0, "const")(ones, torch.Generator().manual_seed(0))
    timm_area = (timm_out[:, 0] == 0).float().mean(dim=(1, 2))
    our_area = (ours[:, 0] == 0).float().mean(dim=(1, 2))
    assert abs(float(our_area.mean()) - float(timm_area.mean())) < 0.01
    assert abs(float(our_area.std()) - float(timm_area.std())) < 0.01
    assert abs(float((our_area == 0).float().mean()) - float((timm_area == 0).float().mean())) < 0.02
    # Boxes are rectangles: erased rows of an image all have the same erased columns.
    img = ours[0, 0] == 0
    rows = img.any(dim=1).nonzero().flatten()
    assert all(torch.equal(img[r], img[rows[0]]) for r in rows)


def test_random_erasing_probability_and_pixel_noise() -> None:
    x = torch.full((1000, 3, 16, 16), 0.5)
    out = erasing.BatchRandomErasing(0.25, "pixel")(x, torch.Generator().manual_seed(1))
    erased = (out != x).flatten(1).any(1).float().mean()
    assert 0.2 < float(erased) < 0.3
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    region = out[(out != x).flatten(1).any(1)]
    assert len(torch.unique(region[region != 0.5])) > 100  # per-pixel noise, not a constant colour


def test_mixup_is_timm_mixup_on_channels_last_batches() -> None:
    from timm.data import Mixup

    assert build_mixup(0.0, 0.0, num_classes=10) is None
    mixup = build_mixup(num_classes=10)
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.switch_prob, mixup.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    np.random.seed(0)
    x = torch.rand(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8)
    mixed, target = mixup(x.clone(), y)
    assert target.shape == (8, 10)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    assert float(target.max()) < 1.0  # label smoothing
    assert 0.0 <= float(mixed.min()) and float(mixed.max()) <= 1.0


def test_the_trainers_augmentation_is_the_recipe_then_timm_mixup_with_the_matching_loss(photo: np.ndarray) -> None:
    """The fixed :class:`Augmentation` the trainer holds: ``apply`` is RandAugment + erasing under its generator, then
    timm's Mixup (same draws); its loss is timm's SoftTargetCrossEntropy with mixup, else cross-entropy with the label
    smoothing; it learns nothing and has no state beyond its generator."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from rat.augment import Augmentation

    x = _to_tensor(photo).repeat(8, 1, 1, 1)
    y = torch.arange(8)
    recipe = Augmentation(build_augment(), build_mixup(num_classes=10), generator=torch.Generator().manual_seed(4))
    np.random.seed(0)
    mixed, soft = recipe.apply(x, y)
    np.random.seed(0)
    reference = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    ref_x, ref_soft = reference(build_augment()(x, torch.Generator().manual_seed(4)), y)
    torch.testing.assert_close(mixed, ref_x, rtol=0, atol=0)
    torch.testing.assert_close(soft, ref_soft, rtol=0, atol=0)
    assert isinstance(recipe.criterion, SoftTargetCrossEntropy)
    plain = Augmentation(label_smoothing=0.1)
    assert plain.apply(x, y)[0] is x and plain.criterion.label_smoothing == 0.1
    recipe.observe(torch.zeros(8, 10), soft)
    assert recipe.epoch_stats() == {} and recipe.state_dict() is None and recipe.replicated_modules() == ()


def test_bad_inputs() -> None:
    augment = build_augment()
    with pytest.raises(ValueError, match="float"):
        augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        augment(torch.zeros(2, 1, 8, 8))
    assert build_augment(None, 0.0) is None
    with pytest.raises(ValueError, match="interpolation"):
        build_augment(interpolation="nearest")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_parameters(photo: np.ndarray) -> None:
    x = _to_tensor(photo).repeat(16, 1, 1, 1)
    rand_augment = randaugment.BatchRandAugment()
    cpu = rand_augment(x, torch.Generator().manual_seed(3))
    gpu = rand_augment(x.cuda(), torch.Generator().manual_seed(3))
    assert gpu.is_cuda
    # Same parameters; float differences can flip an 8-bit rounding in a few pixels, so compare on average.
    assert float((gpu.cpu() - cpu).abs().mean()) < 1e-3
    erased = build_augment()(x.cuda().contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(3))
    assert erased.is_cuda and erased.is_contiguous(memory_format=torch.channels_last)
