"""Tests of rat.models: registry, paper parameter counts, forward/backward, checkpoint layouts, safety, resolution.

Big models are built on the meta device (no memory, no compute); real CPU passes use the micro variants at 32-64 px.
"""
from __future__ import annotations

import importlib.util
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.utils import ModelEmaV3
from torch import nn

import rat.models as rm
from rat.data import VAL_CROP_RATIO
from rat.models import CheckpointError, create_model

REPO = Path(__file__).resolve().parents[1]
CVST_MODELS = timm.list_models("*_cvst")
# Parameter counts of the paper's models (ImageNet-1k head), the acceptance criterion of the rebuild.
PAPER_PARAMS = {
    "convnext_tiny_cvst": 28_627_432,
    "convnext_small_cvst": 50_261_992,
    "convnext_base_cvst": 88_753_416,
    "convnext_large_cvst": 198_134_680,
    "vit_small_patch16_cvst": 22_777_576,
    "vit_medium_patch16_cvst": 39_527_272,
    "vit_base_patch16_cvst": 87_147_112,
    "convnext_iso_small_cvst": 23_035_624,
}
MICRO = ["convnext_micro_cvst", "vit_micro_patch16_cvst"]
MAX_CPU_PARAMS = 25_000_000  # larger models run on the meta device only (2 shared CPU cores)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Small builds of each family for checkpoint tests: (name, kwargs for create_model, resolution).
SMALL_BUILDS = {
    "convnext": ("convnext_micro_cvst", {}, 32),
    "vit": ("vit_micro_patch16_cvst", {"img_size": 32}, 32),
    "vit_ls": ("vit_micro_patch16_cvst", {"img_size": 32, "init_values": 1e-6, "no_embed_class": True}, 32),
    "iso": ("convnext_iso_small_cvst", {"dim": 32, "depth": 2, "stem_channels": (8, 16, 32, 32)}, 32),
}


def _build(family: str, **extra) -> tuple[nn.Module, str, dict, int]:
    name, kwargs, res = SMALL_BUILDS[family]
    kwargs = dict(kwargs, **extra)
    img_size = kwargs.pop("img_size", None)
    torch.manual_seed(0)
    model = create_model(name, img_size=img_size, **kwargs).eval()
    _randomize(model)
    return model, name, kwargs, res


def _raw_twin(model: nn.Module, name: str, kwargs: dict) -> nn.Module:
    """The same weights in a model without input normalization (the function of a model trained on raw inputs)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    twin = create_model(name, normalize=False, **({"img_size": img_size[0]} if img_size else {}), **kwargs)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def _randomize(model: nn.Module) -> None:
    """Make every parameter non-trivial (LayerScale, norms, pos_embed) so that a dropped or swapped key shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))


def _inputs(res: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def _to_reference(inner_sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Rename rat/timm keys to the revisiting-at names: ConvStem as nn.Sequential(conv, LN, GELU, ...)."""
    stem_rat, stem_ref = ("patch_embed.proj.", "patch_embed.proj.stem.") if family.startswith("vit") else (
        "stem.", "stem.stem.")
    out = {}
    for k, v in inner_sd.items():
        m = re.match(re.escape(stem_rat) + r"(\d+)\.(conv|bn)\.(weight|bias)$", k)
        if m:
            k = f"{stem_ref}{3 * int(m.group(1)) + (0 if m.group(2) == 'conv' else 1)}.{m.group(3)}"
        if family == "iso":
            k = re.sub(r"\.conv_dw\.", ".dwconv.", k)
            k = re.sub(r"\.mlp\.fc([12])\.", r".pwconv\1.", k)
            k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v.clone()
    return out


def _reference_layouts(inner_sd: dict[str, torch.Tensor], family: str) -> dict[str, tuple[dict, bool]]:
    """Checkpoints in the layouts the paper's code wrote: name -> (checkpoint, trained with normalization)."""
    ref = _to_reference(inner_sd, family)
    norm = {"normalize.mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
            "normalize.std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)}
    normalized = {**norm, **{f"model.{k}": v for k, v in ref.items()}}  # normalize_model(model)
    ddp = {f"module.base_model.{k}": v for k, v in normalized.items()}  # DDP(WrappedModel(.)) weights_N.pt
    ema = {f"base_model.{k}": v for k, v in normalized.items()}  # weights_ema_N.pt
    return {
        "ddp_wrapped_normalized": (ddp, True),
        "ema_wrapped_normalized": (ema, True),
        "robustbench_normalized": (normalized, True),
        "ddp_no_normalization": ({f"module.{k}": v for k, v in ref.items()}, False),
        "bare_reference": (ref, False),
        "full_training_checkpoint": ({"model_state_dict": ddp, "optimizer_state_dict": {"state": {}},
                                      "epoch": 3, "state_dict_ema": ema}, True),
    }


def _assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# --- registry and parameter counts -----------------------------------------------------------------------------------

def test_registry_lists_all_cvst_models() -> None:
    expected = set(PAPER_PARAMS) | set(MICRO)
    assert expected == set(CVST_MODELS)
    for name in PAPER_PARAMS:
        cfg = timm.models.get_pretrained_cfg(name)  # the default tag
        assert cfg.tag == "rat_in1k_linf4" and not cfg.has_weights  # local files only, nothing to download
        assert cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD


def test_timm_data_config_is_the_evaluation_protocol() -> None:
    """A timm user who evaluates a rat model with timm's own transform (``resolve_data_config`` ->
    ``create_transform``) gets the paper's preprocessing: the same tensors as rat.eval's RobustBench transform."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from rat.eval.data import _eval_transform

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 370, 3), dtype=np.uint8))
    for name in sorted(CVST_MODELS):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.crop_pct == VAL_CROP_RATIO and cfg.interpolation == "bicubic", name
        for resolution in (224, 160):
            timm_cfg = resolve_data_config({"input_size": (3, resolution, resolution)}, pretrained_cfg=cfg.to_dict())
            timm_cfg.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the normalization is inside rat's models
            expected = _eval_transform(resolution)(image)
            torch.testing.assert_close(create_transform(**timm_cfg)(image), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        timm_model = timm.create_model(name)
        rat_model = create_model(name)
    assert rm.count_params(timm_model) == PAPER_PARAMS[name]
    assert rm.count_params(rat_model) == PAPER_PARAMS[name]  # input normalization adds no parameters


@pytest.mark.parametrize("name", MICRO)
def test_micro_models_are_small(name: str) -> None:
    assert rm.count_params(create_model(name)) < 1_500_000


def test_stem_layouts() -> None:
    with torch.device("meta"):
        convnext_b = timm.create_model("convnext_base_cvst")
        vit_m = timm.create_model("vit_medium_patch16_cvst")
    assert convnext_b.stem.channels == (64, 96, 128) and convnext_b.stem.strides == (2, 2, 1)
    assert not convnext_b.stem.has_proj
    stem = vit_m.patch_embed.proj
    assert stem.channels == (48, 96, 192, 384) and stem.stride == 16 and stem.out_chs == 512 and stem.has_proj
    assert vit_m.no_embed_class and vit_m.blocks[0].ls1.gamma.shape == (512,)


# --- forward / backward ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CVST_MODELS)
def test_forward_backward_meta(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name, img_size=64, num_classes=7)
        out = model(torch.rand(2, 3, 64, 64))
        out.sum().backward()
    assert out.shape == (2, 7)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", CVST_MODELS)
@pytest.mark.timeout(120)
def test_forward_backward_cpu(name: str) -> None:
    with torch.device("meta"):
        size = rm.count_params(timm.create_model(name))
    if size > MAX_CPU_PARAMS:
        pytest.skip(f"{name} has {size / 1e6:.0f}M parameters; covered on the meta device")
    torch.manual_seed(0)
    res = 32
    model = create_model(name, img_size=res, num_classes=5)
    x = _inputs(res)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient (DDP would need find_unused_parameters): {unused[:5]}"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(x), model(x.contiguous()))


@pytest.mark.parametrize("name", MICRO)
@pytest.mark.parametrize("res", [32, 48, 64])
def test_micro_models_run_at_small_resolutions(name: str, res: int) -> None:
    model = create_model(name, img_size=res, num_classes=10).eval()
    with torch.no_grad():
        out = model(_inputs(res))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "vit_small_patch16_224"])
def test_generic_timm_models_through_the_same_entry_point(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name, num_classes=3)
        out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 3)
    cfg = timm.models.get_pretrained_cfg(name)
    assert model.normalize.mean_values == tuple(cfg.mean) and model.normalize.std_values == tuple(cfg.std)


def test_generic_timm_vit_checkpoint_and_resolution(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4).eval()
    _randomize(model)
    path = tmp_path / "vit_tiny.pt"
    torch.save({"model": model.state_dict(), "arch": "vit_tiny_patch16_224",
                "model_kwargs": {"depth": 2, "num_classes": 4, "img_size": 32, "normalize": True}}, path)
    _assert_same_outputs(model, rm.create_model_from_checkpoint(path), _inputs(32))
    big = rm.create_model_from_checkpoint(path, img_size=64)
    assert big.pos_embed.shape == (1, 17, 192) and big.patch_embed.img_size == (64, 64)
    assert big.normalize.mean_values == (0.5, 0.5, 0.5)  # normalization from this model's own pretrained cfg


@pytest.mark.parametrize("name", CVST_MODELS)
def test_features_only(name: str) -> None:
    res = timm.models.get_pretrained_cfg(name).input_size[-1]
    with torch.device("meta"):
        model = timm.create_model(name, features_only=True)
        feats = model(torch.rand(1, 3, res, res))
    assert len(feats) >= 3 and all(f.ndim == 4 for f in feats)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'convnext_tiny_cvts'"):
        create_model("convnext_tiny_cvts")


# --- input normalization ---------------------------------------------------------------------------------------------

def test_normalization_is_inside_the_model() -> None:
    model = create_model("convnext_micro_cvst").eval()
    raw = create_model("convnext_micro_cvst", normalize=False).eval()
    raw.load_state_dict(model.state_dict())
    x = _inputs(64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw((x - mean) / std))
        torch.testing.assert_close(model.forward_features(x), raw.forward_features((x - mean) / std))
    assert model.pretrained_cfg["mean"] == (0.0, 0.0, 0.0) and model.pretrained_cfg["std"] == (1.0, 1.0, 1.0)
    assert model.default_cfg == model.pretrained_cfg
    assert model.normalize.mean_values == IMAGENET_MEAN and model.normalize.std_values == IMAGENET_STD
    assert not any(k.startswith("normalize") for k in model.state_dict())  # mean/std come from the cfg
    assert raw.normalize is None and raw.pretrained_cfg["mean"] == IMAGENET_MEAN


@pytest.mark.parametrize("name", MICRO)
def test_the_model_is_the_timm_model(name: str) -> None:
    """create_model returns timm's model itself: its hooks name its own parameters, and every way into the network
    (forward, forward_features, forward_intermediates, an EMA copy) normalizes the input."""
    torch.manual_seed(0)
    timm_model = timm.create_model(name, num_classes=10).eval()
    model = create_model(name, num_classes=10).eval()
    assert type(model) is type(timm_model)
    model.load_state_dict(timm_model.state_dict())
    assert list(model.state_dict()) == list(timm_model.state_dict())  # exactly timm's keys
    names = {n for n, _ in model.named_parameters()}
    if name.startswith("vit"):  # timm's ConvNeXt has no no_weight_decay()
        assert model.no_weight_decay() == timm_model.no_weight_decay() and {"pos_embed", "cls_token"} <= names
    assert model.group_matcher() == timm_model.group_matcher()
    x = _inputs(64)
    x_norm = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ema = ModelEmaV3(model, decay=0.5).module
    with torch.no_grad():
        _assert_same_outputs(model, ema, x)
        torch.testing.assert_close(model(x), timm_model(x_norm), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), timm_model(x_norm), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_intermediates(x)[0], timm_model.forward_intermediates(x_norm)[0],
                                   rtol=0, atol=0)
        for p in ema.parameters():
            p.zero_()
        assert not torch.equal(ema(x), model(x))  # the copy's normalizer and weights are its own
    model.set_grad_checkpointing(True)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)


# --- checkpoints: rat layouts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(SMALL_BUILDS))
def test_rat_state_dict_round_trip(family: str, tmp_path: Path) -> None:
    model, name, kwargs, res = _build(family)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    _assert_same_outputs(model, create_model(name, checkpoint=path, normalize=True, **kwargs), _inputs(res))


def test_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, name, kwargs, res = _build("vit")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _assert_same_outputs(model, create_model(name, checkpoint=path, normalize=True, **kwargs), _inputs(res))


def test_trainer_checkpoint_model_ema_and_kwargs(tmp_path: Path) -> None:
    model, name, kwargs, res = _build("vit", num_classes=10)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    ema.update(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(_inputs(res)).sum().backward()
    optimizer.step()
    model_kwargs = {"num_classes": 10, "normalize": True, "drop_path_rate": 0.1, "img_size": 32}
    ckpt = {"model": model.state_dict(), "model_ema": ema.module.state_dict(), "arch": name,
            "model_kwargs": model_kwargs, "optimizer": optimizer.state_dict(), "epoch": 3,
            "config": {"adv.eps": 4 / 255, "model.arch": name}, "metrics": {"top1": 0.5}}
    path = tmp_path / "checkpoint.pt"
    torch.save(ckpt, path)
    x = _inputs(res)
    _assert_same_outputs(model, create_model(name, checkpoint=path, num_classes=10), x)
    _assert_same_outputs(ema.module, create_model(name, checkpoint=path, use_ema=True, num_classes=10), x)
    rebuilt = rm.create_model_from_checkpoint(path)
    assert rebuilt.num_classes == 10 and rebuilt.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    _assert_same_outputs(model, rebuilt, x)
    # the one reader: what the file records, read once; its recipe resolves the model once (normalization and source)
    info = rm.read_checkpoint(path, use_ema=True)
    assert (info.source, info.arch, info.resolution, info.use_ema, info.classes, dict(info.records)) == \
        (str(path), name, 32, True, None, {})
    assert info.model_kwargs == model_kwargs and info.config == ckpt["config"] and info.entries["epoch"] == 3
    recipe = info.recipe(drop_path_rate=0.0)
    assert recipe.arch == name and recipe.resolution == 32 and recipe.checkpoint is info
    assert recipe.model_kwargs == {"num_classes": 10, "drop_path_rate": 0.0, "normalize": True}
    assert recipe.normalization == "recorded in the checkpoint (model_kwargs)"
    _assert_same_outputs(ema.module, rm.build_model(recipe, recipe.resolution), x)
    # the EMA wrapper's own state_dict (module.-prefixed) loads too
    _assert_same_outputs(ema.module, create_model(name, checkpoint=ema.state_dict(), normalize=True,
                                                  num_classes=10), x)


@pytest.mark.parametrize("family", ["convnext", "vit", "iso"])
def test_checkpoints_of_the_wrapper_layout_still_load(family: str, tmp_path: Path) -> None:
    """Before the model was the timm model itself, rat wrapped it: trainer checkpoints hold ``model.<timm keys>``
    (EMA too), and older ones also the ``normalize.mean/std`` buffers. They load with identical outputs through
    create_model, create_model_from_checkpoint, and the trainer's resume (``module.load_state_dict``, EMA copy too)."""
    model, name, kwargs, res = _build(family, num_classes=10)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    x = _inputs(res)
    wrapped = {f"model.{k}": v for k, v in model.state_dict().items()}
    wrapped_ema = {f"model.{k}": v for k, v in ema.module.state_dict().items()}
    buffers = {"normalize.mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
               "normalize.std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)}
    model_kwargs = {"normalize": True, "img_size": res, **kwargs}  # kwargs: num_classes and the family's
    path = tmp_path / "trainer.pt"
    torch.save({"model": wrapped, "model_ema": wrapped_ema, "arch": name, "model_kwargs": model_kwargs}, path)
    _assert_same_outputs(model, rm.create_model_from_checkpoint(path), x)
    _assert_same_outputs(ema.module, rm.create_model_from_checkpoint(path, use_ema=True), x)
    resumed = create_model(name, img_size=res, **kwargs)  # the trainer's resume
    resumed_ema = ModelEmaV3(resumed, decay=0.5)
    resumed.load_state_dict(wrapped)
    resumed_ema.module.load_state_dict({**buffers, **wrapped_ema})
    _assert_same_outputs(model, resumed, x)
    _assert_same_outputs(ema.module, resumed_ema.module, x)
    _assert_same_outputs(model, create_model(name, checkpoint={**buffers, **wrapped}, img_size=res, **kwargs), x)
    wrong = {**wrapped, "normalize.mean": torch.full((1, 3, 1, 1), 0.5), "normalize.std": buffers["normalize.std"]}
    with pytest.raises(CheckpointError, match=r"normalizes inputs with mean=\[0.5, 0.5, 0.5\]"):
        resumed.load_state_dict(wrong)


@pytest.mark.filterwarnings("ignore:Grad strides do not match bucket view strides")
def test_ddp_and_ema_wrap_the_model(tmp_path: Path) -> None:
    import torch.distributed as dist

    model, name, kwargs, res = _build("convnext", num_classes=10)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ema = ModelEmaV3(model, decay=0.9)
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.train()
        loss = F.cross_entropy(ddp(_inputs(res)), torch.tensor([1, 2]))
        loss.backward()
        ema.update(model)
        path = tmp_path / "ddp.pt"
        torch.save(ddp.state_dict(), path)  # module.* keys
    finally:
        dist.destroy_process_group()
    _assert_same_outputs(model, create_model(name, checkpoint=path, normalize=True, num_classes=10), _inputs(res))


# --- checkpoints: revisiting-at layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["convnext", "iso", "vit"])
@pytest.mark.parametrize("layout", ["ddp_wrapped_normalized", "ema_wrapped_normalized", "robustbench_normalized",
                                    "ddp_no_normalization", "bare_reference", "full_training_checkpoint"])
def test_reference_layouts_load(family: str, layout: str, tmp_path: Path) -> None:
    model, name, kwargs, res = _build(family)
    ckpt, normalized = _reference_layouts(model.state_dict(), family)[layout]
    path = tmp_path / "released.pt"
    torch.save(ckpt, path)
    loaded = create_model(name, checkpoint=path, normalize=normalized, **kwargs)
    x = _inputs(res)
    if normalized:
        _assert_same_outputs(model, loaded, x)
    else:
        _assert_same_outputs(_raw_twin(model, name, kwargs), loaded, x)  # a model trained on raw [0, 1] inputs
    if layout == "full_training_checkpoint":
        _assert_same_outputs(model, create_model(name, checkpoint=path, use_ema=True, **kwargs), x)


@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_reference_layout_through_timm_pretrained_file(family: str, tmp_path: Path) -> None:
    model, name, kwargs, res = _build(family)
    ckpt, _ = _reference_layouts(model.state_dict(), family)["ddp_wrapped_normalized"]
    path = tmp_path / "released.pt"
    torch.save(ckpt, path)
    if family == "vit":
        kwargs = dict(kwargs, img_size=res)
    timm_model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    x = _inputs(res)
    _assert_same_outputs(model, nn.Sequential(model.normalize, timm_model), x)


def test_reference_stem_is_functionally_equivalent() -> None:
    """A stem laid out like the paper's (conv, channels-first LN eps 1e-6, GELU, ..., 1x1) computes the same."""
    torch.manual_seed(0)
    channels, strides, out_chs = (8, 16, 32), (2, 2, 1), 24
    ref_layers: list[nn.Module] = []
    in_chs = 3
    for chs, stride in zip(channels, strides):
        ref_layers += [nn.Conv2d(in_chs, chs, 3, stride, 1), nn.GroupNorm(1, chs), nn.GELU()]
        in_chs = chs
    ref_layers.append(nn.Conv2d(in_chs, out_chs, 1))
    ref = nn.Sequential(*ref_layers)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)

    def forward_ref(x: torch.Tensor) -> torch.Tensor:
        for layer in ref:
            if isinstance(layer, nn.GroupNorm):  # LayerNorm over the channel dimension only, eps 1e-6
                u = x.mean(1, keepdim=True)
                s = (x - u).pow(2).mean(1, keepdim=True)
                x = (x - u) / torch.sqrt(s + 1e-6) * layer.weight[:, None, None] + layer.bias[:, None, None]
            else:
                x = layer(x)
        return x

    stem = rm.ConvStem(3, channels, strides, out_chs=out_chs)
    ref_sd = {f"stem.stem.{k}": v for k, v in ref.state_dict().items()}
    mapped = rm.weights.remap_reference_stem(ref_sd, "stem.stem.", "stem.")
    rm.weights.load_state_dict_strict(stem, {k[len("stem."):]: v for k, v in mapped.items()})
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(stem(x), forward_ref(x), rtol=1e-5, atol=1e-5)


# --- checkpoints: strict errors and safety ---------------------------------------------------------------------------

def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    vit, _, _, _ = _build("vit")
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        create_model("convnext_micro_cvst", checkpoint=path, normalize=True)
    message = str(info.value)
    assert str(path) in message and "missing keys: " in message and "unexpected keys: " in message
    assert "missing keys: head.fc.bias, head.fc.weight" in message and "unexpected keys: blocks.0.attn" in message
    assert "(72 in all)" in message  # every convnext key is listed as missing, the list shortened in the message


def test_shape_mismatch_and_stray_key_are_reported(tmp_path: Path) -> None:
    model, name, _, _ = _build("convnext", num_classes=10)
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight.*shape mismatches: head\.fc\.bias: "
                                              r"checkpoint \(10,\) vs model \(1000,\)"):
        create_model(name, checkpoint=path, normalize=True)


def test_trainer_checkpoint_errors(tmp_path: Path) -> None:
    model, name, _, _ = _build("convnext", num_classes=10)
    ckpt = {"model": model.state_dict(), "model_ema": None, "arch": name,
            "model_kwargs": {"num_classes": 10, "normalize": True}}
    with pytest.raises(CheckpointError, match="holds a 'convnext_micro_cvst' model, not 'vit_micro_patch16_cvst'"):
        create_model("vit_micro_patch16_cvst", checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        create_model(name, checkpoint=ckpt, use_ema=True, num_classes=10)
    with pytest.raises(CheckpointError, match="create_model_from_checkpoint"):
        create_model(name, checkpoint=ckpt)  # num_classes forgotten: the hint names the recorded kwargs
    with pytest.raises(CheckpointError, match="not a rat trainer checkpoint"):
        rm.create_model_from_checkpoint(model.state_dict())


def test_reference_normalization_is_checked() -> None:
    model, name, _, _ = _build("convnext")
    ckpt, _ = _reference_layouts(model.state_dict(), "convnext")["robustbench_normalized"]
    with pytest.raises(CheckpointError, match="create it with normalize=True"):
        create_model(name, checkpoint=ckpt, normalize=False)
    ckpt["normalize.mean"] = torch.full((1, 3, 1, 1), 0.5)
    with pytest.raises(CheckpointError, match=r"normalizes inputs with mean=\[0.5, 0.5, 0.5\]"):
        create_model(name, checkpoint=ckpt)


class _Payload:
    """Pickles to a call of exec: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("fmt", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_malicious_pickle_is_refused_not_executed(fmt: str, tmp_path: Path) -> None:
    model, name, _, _ = _build("convnext")
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    payload = {"model": model.state_dict(), "arch": name, "extra": _Payload(marker)}
    if fmt == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "torch_zip")
    with pytest.raises(CheckpointError, match=r"refusing to load .*Unsupported global"):
        rm.load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        create_model(name, checkpoint=path)
    assert not marker.exists()
    # the payload does run when unpickled unsafely (so the test above can fail)
    if fmt == "raw_pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rm.load_checkpoint_file(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        rm.load_checkpoint_file(bad)


# --- resolution ------------------------------------------------------------------------------------------------------

def test_vit_resolution_round_trip_and_change(tmp_path: Path) -> None:
    model, name, kwargs, res = _build("vit")
    with torch.no_grad():
        model.pos_embed.normal_(0, 1.0)  # strong position signal: zeros or a wrong grid would show
    path = tmp_path / "vit32.pt"
    torch.save(model.state_dict(), path)
    x = _inputs(res)

    # same resolution (given, or read from the checkpoint): unchanged
    _assert_same_outputs(model, create_model(name, checkpoint=path, img_size=32, normalize=True), x)
    _assert_same_outputs(model, create_model(name, checkpoint=path, normalize=True), x)

    # new resolution: pos_embed resampled (not zeroed), outputs finite and input-dependent
    big = create_model(name, checkpoint=path, img_size=64, normalize=True).eval()
    expected = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[4, 4], old_size=[2, 2],
                                      num_prefix_tokens=1)
    torch.testing.assert_close(big.pos_embed.detach(), expected)
    assert big.pos_embed[:, 1:].abs().sum() > 0
    with torch.no_grad():
        y1, y2 = big(_inputs(64, seed=1)), big(_inputs(64, seed=2))
    assert torch.isfinite(y1).all() and not torch.allclose(y1, y2)

    # timm's own set_input_size, as the evaluator does between resolutions
    model.set_input_size(48)
    with torch.no_grad():
        assert torch.isfinite(model(_inputs(48))).all()


def test_vit_no_embed_class_resolution(tmp_path: Path) -> None:
    model, name, kwargs, _ = _build("vit_ls")
    path = tmp_path / "vitm.pt"
    torch.save(model.state_dict(), path)
    big = create_model(name, checkpoint=path, img_size=64, normalize=True, **kwargs).eval()
    assert big.pos_embed.shape == (1, 16, 64)
    with torch.no_grad():
        assert torch.isfinite(big(_inputs(64))).all()


@pytest.mark.parametrize("res", [224, 256, 288, 320, 384])
def test_eval_resolutions_of_paper_models(res: int) -> None:
    with torch.device("meta"):
        vit = create_model("vit_small_patch16_cvst", img_size=res)
        convnext = create_model("convnext_tiny_cvst", img_size=res)
        x = torch.rand(1, 3, res, res)
        assert vit(x).shape == convnext(x).shape == (1, 1000)
    assert vit.pos_embed.shape[1] == 1 + (res // 16) ** 2


# --- FLOPs -----------------------------------------------------------------------------------------------------------

def test_count_flops() -> None:
    model = create_model("convnext_micro_cvst")
    one = rm.count_flops(model, 64)
    assert one > 0 and rm.count_flops(model, 64, batch_size=3) == 3 * one
    assert model.training  # mode restored
    with torch.device("meta"):
        tiny = create_model("convnext_tiny_cvst")
    flops = rm.count_flops(tiny, 224)
    assert 8.5e9 < flops < 9.5e9  # ~4.6 GMACs, the paper reports 4.5 GFLOPs (fvcore counts MACs)


def test_model_info_tool(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("model_info", REPO / "tools" / "model_info.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["convnext_tiny_cvst", "vit_small_patch16_cvst", "--res", "224", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == ["convnext_tiny_cvst", "vit_small_patch16_cvst"]
    assert rows[0]["params"] == PAPER_PARAMS["convnext_tiny_cvst"] and rows[0]["res"] == 224
    assert rows[1]["params"] == PAPER_PARAMS["vit_small_patch16_cvst"] and rows[1]["gflops"] > 0
    assert tool.main(["vit_micro_patch16_cvst", "--res", "32", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "res   32" in lines[0] and "GFLOPs" in lines[1]


# --- the paper's releases: which function a released file computes -------------------------------------------------

class _ReferenceConvStem(nn.Module):
    """The reference code's ConvStem as its checkpoints name it: ``<parent>.stem.{3i: conv, 3i+1: LN, 3i+2: GELU}``
    (3x3 convs with bias, channels-first LayerNorm eps 1e-6, GELU), plus an optional 1x1 projection at ``3n``."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...], out_chs: int | None = None) -> None:
        super().__init__()
        from timm.layers import LayerNorm2d

        layers: list[nn.Module] = []
        in_chs = 3
        for chs, stride in zip(channels, strides):
            layers += [nn.Conv2d(in_chs, chs, 3, stride, 1), LayerNorm2d(chs, eps=1e-6), nn.GELU()]
            in_chs = chs
        if out_chs is not None:
            layers.append(nn.Conv2d(in_chs, out_chs, 1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


_VIT_STEM = ((48, 96, 192, 384), (2, 2, 2, 2))
# Paper architecture -> the reference model: a timm model with the reference ConvStem swapped in, shallow (one block
# per stage; ConvNeXt stages after the first 64 wide) to stay cheap on CPU; stems and embedding widths are the
# paper's. None: ConvNeXt-iso (no timm model; its reference layout is written from rat's own model with the
# reference's original ConvNeXt names).
PAPER_REFERENCES = {
    "convnext_tiny_cvst": ("convnext_tiny", {"depths": (1, 1, 1, 1), "dims": (96, 64, 64, 64)}, "stem",
                           ((48, 96), (2, 2), None)),
    "convnext_small_cvst": ("convnext_small", {"depths": (1, 1, 1, 1), "dims": (96, 64, 64, 64)}, "stem",
                            ((48, 96), (2, 2), None)),
    "convnext_base_cvst": ("convnext_base", {"depths": (1, 1, 1, 1), "dims": (128, 64, 64, 64)}, "stem",
                           ((64, 96, 128), (2, 2, 1), None)),
    "convnext_large_cvst": ("convnext_large", {"depths": (1, 1, 1, 1), "dims": (192, 64, 64, 64)}, "stem",
                            ((96, 144, 192), (2, 2, 1), None)),
    "vit_small_patch16_cvst": ("deit_small_patch16_224", {"depth": 1, "img_size": 32}, "patch_embed.proj",
                               (*_VIT_STEM, 384)),
    "vit_medium_patch16_cvst": ("deit3_medium_patch16_224", {"depth": 1, "img_size": 32}, "patch_embed.proj",
                                (*_VIT_STEM, 512)),
    "vit_base_patch16_cvst": ("vit_base_patch16_224", {"depth": 1, "img_size": 32}, "patch_embed.proj",
                              (*_VIT_STEM, 768)),
    "convnext_iso_small_cvst": None,
}


def _reference_model(name: str) -> tuple[nn.Module, dict]:
    """(reference model with random weights, the rat create_model kwargs of the same shallow architecture)."""
    torch.manual_seed(0)
    spec = PAPER_REFERENCES[name]
    if spec is None:
        kwargs = {"depth": 1}
        model = timm.create_model(name, **kwargs)
    else:
        timm_name, kwargs, where, (channels, strides, out_chs) = spec
        model = timm.create_model(timm_name, **kwargs)
        parent = model.patch_embed if where == "patch_embed.proj" else model
        setattr(parent, where.rsplit(".", 1)[-1], _ReferenceConvStem(channels, strides, out_chs))
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    _randomize(model)
    return model.eval(), kwargs


def _release_file(model: nn.Module, name: str, normalized: bool) -> dict[str, torch.Tensor]:
    """The model's weights as the reference saved them: DDP(WrappedModel([normalize_model](model)))."""
    sd = model.state_dict() if PAPER_REFERENCES[name] is not None else _to_reference(model.state_dict(), "iso")
    if normalized:
        sd = {"normalize.mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
              "normalize.std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), **{f"model.{k}": v for k, v in sd.items()}}
        return {f"module.base_model.{k}": v for k, v in sd.items()}
    return {f"module.{k}": v for k, v in sd.items()}


@pytest.mark.parametrize("name", sorted(PAPER_REFERENCES))
def test_paper_releases_compute_the_reference_function(name: str, tmp_path: Path) -> None:
    """A reference-layout file loads as the function the reference computes, with no normalization argument: with
    normalize.* buffers the model normalizes; without, the release table decides (RobustBench: ViT-S-CvSt normalizes,
    the others take raw [0, 1] inputs). An explicit normalize= overrides the table (not the file's buffers)."""
    reference, kwargs = _reference_model(name)
    x = _inputs(32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        raw_logits, normalized_logits = reference(x), reference((x - mean) / std)
    for normalized in (True, False):
        path = tmp_path / f"release_{int(normalized)}.pt"
        torch.save(_release_file(reference, name, normalized), path)
        loaded = create_model(name, checkpoint=path, **kwargs).eval()
        expected_normalize = normalized or rm.RELEASE_NORMALIZATION[name]
        assert (loaded.normalize is not None) == expected_normalize
        with torch.no_grad():
            logits = loaded(x)
        expected = normalized_logits if expected_normalize else raw_logits
        assert (logits - expected).abs().max().item() <= 1e-5
    override = create_model(name, checkpoint=path, normalize=not rm.RELEASE_NORMALIZATION[name], **kwargs).eval()
    with torch.no_grad():
        expected = raw_logits if rm.RELEASE_NORMALIZATION[name] else normalized_logits
        assert (override(x) - expected).abs().max().item() <= 1e-5


def test_file_that_does_not_say_is_refused(tmp_path: Path) -> None:
    """A bare rat state dict (normalization buffers are not saved) or a reference-layout file of an architecture
    without a release does not say whether the model normalizes: refused, naming normalize= and --normalize."""
    model, name, kwargs, res = _build("convnext")
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not record whether its model normalizes its input: pass "
                                              r"normalize=True .* --normalize 1 or --normalize 0"):
        create_model(name, checkpoint=path)
    reference_layout, _ = _reference_layouts(model.state_dict(), "convnext")["ddp_no_normalization"]
    with pytest.raises(CheckpointError, match="normalize="):
        create_model(name, checkpoint=reference_layout)
    # a trainer checkpoint records it, and a contradicting argument is an error
    ckpt = {"model": model.state_dict(), "arch": name, "model_kwargs": {"normalize": False}}
    assert create_model(name, checkpoint=ckpt).normalize is None
    with pytest.raises(CheckpointError, match="create it with normalize=False"):
        create_model(name, checkpoint=ckpt, normalize=True)


# --- resolution during training ------------------------------------------------------------------------------------

def test_vit_dynamic_size_equals_set_input_size() -> None:
    """The trainer builds ViTs with dynamic_img_size (dynamic_size_kwargs); a forward pass at another resolution then
    equals the model resized with set_input_size, as rat.eval builds it. Without it the ViT refuses other sizes."""
    assert rm.dynamic_size_kwargs("convnext_micro_cvst") == {}
    kwargs = rm.dynamic_size_kwargs("vit_micro_patch16_cvst")
    assert kwargs == {"dynamic_img_size": True}
    torch.manual_seed(0)
    model = create_model("vit_micro_patch16_cvst", img_size=64, num_classes=10, **kwargs).eval()
    _randomize(model)
    with torch.no_grad():
        model.pos_embed.normal_(0, 1.0)
    for res in (32, 48, 64):
        resized = create_model("vit_micro_patch16_cvst", checkpoint=model.state_dict(), img_size=res, num_classes=10,
                               normalize=True).eval()
        _assert_same_outputs(model, resized, _inputs(res))
    fixed = create_model("vit_micro_patch16_cvst", img_size=64, num_classes=10).eval()
    with pytest.raises(AssertionError, match="doesn't match model"):
        fixed(_inputs(32))
