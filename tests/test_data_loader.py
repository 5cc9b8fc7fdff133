"""FFCV train/val loaders on CPU: batch format, resolution changes, order contract, val geometry, the hang guard.

Every loader here runs under pytest-timeout: a pipeline that made ffcv hang would fail, not stall CI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv")

from rat.data import build_train_loader, build_val_loader, write_arrays_beton, write_folder_beton  # noqa: E402
from rat.data._ffcv_compat import FFCV_VERSION, PipelineError, check_ffcv_version, check_pipeline  # noqa: E402
from rat.data.demo import DEMO_CLASSES, load_demo_arrays  # noqa: E402

pytestmark = [pytest.mark.ffcv, pytest.mark.timeout(300)]

N_INDEXED = 60


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """48 demo val images stored raw, with their real labels."""
    images, labels = load_demo_arrays("val")
    images, labels = images[:48], labels[:48]
    path = write_arrays_beton(images, labels, tmp_path_factory.mktemp("val") / "val.beton", classes=DEMO_CLASSES,
                              write_mode="raw", num_workers=2)
    return path, images, labels


@pytest.fixture(scope="module")
def indexed_beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 demo train images whose label is their sample index, so batches reveal the order."""
    images, _ = load_demo_arrays("train")
    return write_arrays_beton(images[:N_INDEXED], np.arange(N_INDEXED), tmp_path_factory.mktemp("idx") / "i.beton",
                              classes=[str(i) for i in range(N_INDEXED)], num_workers=2)


@pytest.fixture(scope="module")
def train_loader(indexed_beton: Path):
    return build_train_loader(indexed_beton, batch_size=16, resolution=32, device="cpu", num_workers=2, seed=7,
                              drop_last=False)


def _epoch_labels(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_train_batches_have_the_contract_format(train_loader) -> None:
    train_loader.set_epoch(0)
    batches = list(train_loader)
    assert len(batches) == len(train_loader) == 4  # 60 / 16, last one partial (drop_last=False)
    first_x, first_y = batches[0]
    for x, y in batches:
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert x.shape[1:] == (3, 32, 32) and x.shape[0] == y.shape[0]
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
        assert y.dtype == torch.int64 and y.ndim == 1
    assert [x.shape[0] for x, _ in batches] == [16, 16, 16, 12]
    # Batches belong to the caller: later batches did not overwrite the first one's memory.
    assert not torch.equal(first_x, batches[-1][0][: first_x.shape[0]])
    assert sorted(int(v) for _, y in batches for v in y) == list(range(N_INDEXED))


def test_resolution_changes_between_epochs(train_loader) -> None:
    train_loader.set_resolution(48)
    assert {tuple(x.shape[2:]) for x, _ in train_loader} == {(48, 48)}
    train_loader.set_resolution(24)
    assert {tuple(x.shape[2:]) for x, _ in train_loader} == {(24, 24)}
    train_loader.set_resolution(32)
    with pytest.raises(ValueError, match="resolution"):
        train_loader.set_resolution(2)


def test_order_is_a_function_of_seed_and_epoch(train_loader) -> None:
    train_loader.set_epoch(0)
    epoch0 = _epoch_labels(train_loader)
    epoch1 = _epoch_labels(train_loader)  # iterating advances the epoch by itself
    assert train_loader.epoch == 2
    assert sorted(epoch0) == sorted(epoch1) == list(range(N_INDEXED))
    assert epoch0 != epoch1
    train_loader.set_epoch(1)  # e.g. after resuming at epoch 1
    assert _epoch_labels(train_loader) == epoch1
    # The documented order: numpy's default_rng(seed + epoch) permutation of the samples.
    assert epoch1 == np.random.default_rng(7 + 1).permutation(N_INDEXED).tolist()


def _epoch_pixels(loader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat([x for x, _ in loader])


def test_crops_and_flips_are_a_function_of_seed_and_epoch(indexed_beton: Path) -> None:
    """Bit-exact resume needs reproducible augmentation: same (seed, epoch) -> same pixels, whatever the threads."""
    def loader(seed: int, workers: int):
        return build_train_loader(indexed_beton, batch_size=16, resolution=32, device="cpu", num_workers=workers,
                                  seed=seed, drop_last=False)

    two_threads, one_thread = loader(7, 2), loader(7, 1)
    epoch3 = _epoch_pixels(two_threads, 3)
    assert torch.equal(epoch3, _epoch_pixels(one_thread, 3))
    assert torch.equal(epoch3, _epoch_pixels(two_threads, 3))  # re-reading an epoch (a resume) gives it again
    assert not torch.equal(epoch3, _epoch_pixels(two_threads, 4))
    assert not torch.equal(epoch3, _epoch_pixels(loader(8, 2), 3))
    order = two_threads.epoch_order(3)
    assert order.tolist() == [int(v) for _, y in (two_threads.set_epoch(3) or two_threads) for v in y]
    # Not the same crop for every image: the crops vary within the epoch too.
    assert len({tuple(x.shape) for x in epoch3}) == 1 and epoch3.std(dim=0).mean() > 0.05


def test_process_cache_quasi_random_order_covers_the_data(indexed_beton: Path) -> None:
    loader = build_train_loader(indexed_beton, batch_size=20, resolution=16, device="cpu", num_workers=1, seed=1,
                                in_memory=False, flip=False)
    labels = _epoch_labels(loader)
    assert sorted(labels) == list(range(N_INDEXED))
    loader.set_epoch(0)
    assert _epoch_labels(loader) == labels


def test_val_loader_round_trips_images_and_labels_exactly(demo_val) -> None:
    path, images, labels = demo_val
    loader = build_val_loader(path, batch_size=20, resolution=64, device="cpu", num_workers=2, crop_ratio=1.0)
    xs, ys = zip(*loader)
    assert [x.shape[0] for x in xs] == [20, 20, 8] and len(loader) == 3
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.is_contiguous(memory_format=torch.channels_last) or x.shape[0] == 1
    np.testing.assert_array_equal((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)
    # A chosen subset comes back in the given order; repeated passes are identical.
    subset = [40, 3, 17]
    sub = build_val_loader(path, batch_size=2, resolution=64, device="cpu", num_workers=1, crop_ratio=1.0,
                           indices=subset)
    for _ in range(2):
        got = torch.cat([x for x, _ in sub])
        np.testing.assert_array_equal((got * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
                                      images[subset])
        assert [int(v) for _, y in sub for v in y] == labels[subset].tolist()


def _reference_center_crop(image: np.ndarray, resolution: int, ratio: float, shift: int = 0) -> np.ndarray:
    """Reference: PIL crops the central int(ratio * short side) square (offsets floor((side - crop) / 2)); the crop is
    area-resized (cv2 INTER_AREA, what ffcv's resize uses)."""
    import cv2

    height, width = image.shape[:2]
    crop = int(ratio * min(height, width))
    top, left = (height - crop) // 2 + shift, (width - crop) // 2 + shift
    region = np.asarray(Image.fromarray(image).crop((left, top, left + crop, top + crop)))
    return cv2.resize(region, (resolution, resolution), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def test_val_center_crop_geometry_matches_a_pil_reference(tmp_path: Path) -> None:
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]
    landscape = np.ascontiguousarray(photo[100:196, 200:328])  # 96 x 128
    portrait = np.ascontiguousarray(photo[150:270, 300:390])  # 120 x 90
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(landscape).save(tmp_path / "src" / "a" / "0.png")
    Image.fromarray(portrait).save(tmp_path / "src" / "a" / "1.png")
    report = write_folder_beton(tmp_path / "src", tmp_path / "geo.beton", write_mode="raw", max_resolution=None,
                                num_workers=1, progress=False)
    for resolution in (56, 72, 112):
        loader = build_val_loader(report.path, batch_size=2, resolution=resolution, device="cpu", num_workers=1)
        x = torch.cat([b for b, _ in loader]).permute(0, 2, 3, 1).numpy()
        for got, source in zip(x, (landscape, portrait)):
            assert got.shape == (resolution, resolution, 3)
            error = np.abs(got - _reference_center_crop(source, resolution, 224 / 256)).max()
            assert error <= 1 / 255 + 1e-6, f"center crop at {resolution} differs from the reference by {error:.4f}"
            for shift in (-1, 1):  # the comparison sees a one-pixel misplacement
                shifted = np.abs(got - _reference_center_crop(source, resolution, 224 / 256, shift)).max()
                assert shifted > 10 / 255



def test_one_val_crop_ratio_for_loader_eval_and_model_cfgs() -> None:
    """The beton val loader's default crop, rat.eval's folder resize and the paper models' timm cfgs agree (the micro
    demo models declare no crop)."""
    import timm

    import rat.models  # noqa: F401  (registers the ConvStem models)
    from rat.data import VAL_CROP_RATIO
    from rat.eval.data import resize_size

    assert VAL_CROP_RATIO == 0.875 and resize_size(224) == 256
    paper_models = [name for name in timm.list_models("*_cvst") if "micro" not in name]
    assert len(paper_models) == 8
    for name in paper_models:
        assert timm.models.get_pretrained_cfg(name).crop_pct == VAL_CROP_RATIO, name

def test_pipeline_guard() -> None:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import Cutout, NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    decoder = RandomResizedCropRGBImageDecoder((32, 32))
    cpu = torch.device("cpu")
    check_pipeline("image", [decoder, RandomHorizontalFlip(), ToTensor(), ToDevice(cpu), ToTorchImage()])
    check_pipeline("image", [decoder, Cutout(4), ToTensor(), ToTorchImage()])
    check_pipeline("label", [IntDecoder(), ToTensor(), ToDevice(cpu)])
    normalize = NormalizeImage(np.zeros(3), np.ones(3), np.float32)
    with pytest.raises(PipelineError, match=r"NormalizeImage runs jitted after the non-jitted ToTensor.*#396"):
        check_pipeline("image", [decoder, ToTensor(), ToTorchImage(), normalize])
    with pytest.raises(PipelineError, match="RandomHorizontalFlip cannot follow"):
        check_pipeline("image", [decoder, ToTensor(), RandomHorizontalFlip()])
    with pytest.raises(PipelineError, match="neither an ffcv Operation"):
        check_pipeline("image", [decoder, "ToTensor"])
    with pytest.raises(PipelineError, match="empty"):
        check_pipeline("image", [])


def test_loader_argument_errors(demo_val) -> None:
    path = demo_val[0]
    with pytest.raises(FileNotFoundError, match="write_ffcv"):
        build_val_loader(path.with_name("missing.beton"), batch_size=4, resolution=32, device="cpu", num_workers=1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_train_loader(path, batch_size=4, resolution=32, device="cpu", num_workers=1, seed=0, distributed=True)
    with pytest.raises(ValueError, match="indices"):
        build_val_loader(path, batch_size=4, resolution=32, device="cpu", num_workers=1, indices=[0, 48])
    with pytest.raises(ValueError, match="num_workers"):
        build_val_loader(path, batch_size=4, resolution=32, device="cpu", num_workers=0)
    empty = build_val_loader(path, batch_size=4, resolution=32, device="cpu", num_workers=1, indices=[])
    assert len(empty) == 0 and list(empty) == []


def test_the_ffcv_workarounds_check_the_version_they_were_written_for() -> None:
    import importlib.metadata

    assert check_ffcv_version(FFCV_VERSION) is True
    with pytest.warns(RuntimeWarning, match=rf"ffcv 9\.9\.9 is installed.*written for ffcv {FFCV_VERSION}"):
        assert check_ffcv_version("9.9.9") is False
    assert check_ffcv_version() is (importlib.metadata.version("ffcv") == FFCV_VERSION)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_land_on_the_gpu(demo_val) -> None:
    path, images, labels = demo_val
    loader = build_val_loader(path, batch_size=16, resolution=64, device="cuda", num_workers=2, crop_ratio=1.0)
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal((x * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy(), images[:16])
    train = build_train_loader(path, batch_size=16, resolution=48, device="cuda", num_workers=2, seed=0)
    x, y = next(iter(train))
    assert x.is_cuda and x.shape == (16, 3, 48, 48) and y.is_cuda
