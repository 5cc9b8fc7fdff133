"""rat.quant: number formats against torch's float8 casts and hand-computed grids, the quantized forward against a
hand-computed reference, JS similarity, the fit, the generator, and the CLI (happy path and bad input)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rat.quant import (
    AttackSpec,
    FormatError,
    QuantFormat,
    QuantizationError,
    adjust_generator,
    calibrate,
    fake_quantize,
    fit_curve,
    fit_sweeps,
    js_histogram,
    label_accuracy,
    load_quantized_model,
    parse_format,
    plot_fits,
    quantize_model,
    record_norm_stats,
    robust_accuracy,
    run_sweep,
    sample,
    stat_targets,
    sweep_grid,
    train_generator,
)
from rat.quant.__main__ import main as quant_main
from rat.quant.generator import GeneratorError, solve_mix

RES = 32


# ---- formats ---------------------------------------------------------------------------------------------------
def test_parse_format_names_and_grid():
    assert parse_format("int8") == QuantFormat("INT", 8)
    assert parse_format("POT4") == QuantFormat("POT", 4)
    assert parse_format("float8_e4m3") == parse_format("e4m3") == QuantFormat("FLOAT", 8, 4)
    assert parse_format("FLOAT6E3") == QuantFormat("FLOAT", 6, 3)
    assert parse_format(QuantFormat("FLOAT", 8, 5).name) == parse_format("e5m2")
    grid = sweep_grid()
    assert len([f for f in grid if f.kind == "INT"]) == 15 and len([f for f in grid if f.kind == "POT"]) == 7
    assert len([f for f in grid if f.kind == "FLOAT"]) == sum(b - 1 for b in range(3, 9))


@pytest.mark.parametrize("text, message", [
    ("uint8", "unknown format"), ("int1", "2 to 16 bits"), ("int17", "2 to 16 bits"), ("pot9", "2 to 8 bits"),
    ("float9_e4m4", "3 to 8 bits"), ("float8_e4m2", r"e \+ m must be 7"), ("float8", "needs its exponent"),
    ("float4_e4", "1 to 3 exponent bits"), ("int8_e4m3", "no exponent/mantissa split"),
])
def test_parse_format_rejects_bad_input(text, message):
    with pytest.raises(FormatError, match=message):
        parse_format(text)


@pytest.mark.parametrize("fmt, dtype", [("float8_e4m3", torch.float8_e4m3fn), ("float8_e5m2", torch.float8_e5m2)])
def test_float8_equals_torch_cast(fmt, dtype):
    """brevitas' minifloat rounding (scale 1) equals torch's float8 casts on normals, subnormals and ties."""
    gen = torch.Generator().manual_seed(0)
    finfo = torch.finfo(dtype)
    x = torch.cat([torch.randn(20000, generator=gen) * 40, torch.randn(2000, generator=gen) * finfo.tiny * 4,
                   torch.tensor([0.0, finfo.max, -finfo.max, finfo.tiny, finfo.smallest_normal])])
    x = x.clamp(-finfo.max, finfo.max)
    assert torch.equal(fake_quantize(x, 1.0, parse_format(fmt)), x.to(dtype).float())
    assert parse_format(fmt).max_value == finfo.max


def test_int_and_pot_grids_by_hand():
    x = torch.tensor([0.042, -0.053, 0.31, -0.44, 0.005, 0.015, 0.025])
    # INT4, scale 0.01: round half to even, narrow range +-7
    expected = torch.tensor([0.04, -0.05, 0.07, -0.07, 0.0, 0.02, 0.02])
    assert torch.allclose(fake_quantize(x, 0.01, parse_format("int4")), expected, atol=1e-7)
    # POT3, scale 1: grid {0, +-1, +-0.5, +-0.25}; midpoints 0.375, 0.75; below 0.125 -> 0
    y = torch.tensor([0.9, 0.74, 0.76, 0.37, 0.38, 0.13, 0.12, -2.0, -0.3])
    assert torch.equal(fake_quantize(y, 1.0, parse_format("pot3")),
                       torch.tensor([1.0, 0.5, 1.0, 0.25, 0.5, 0.25, 0.0, -1.0, -0.25]))


# ---- quantized forward -----------------------------------------------------------------------------------------
def test_quantized_linear_equals_hand_computed_reference():
    """INT4 on a 3->2 linear layer: scales max|W|/7 = 0.25 and max|x|/7 = 0.5, round half to even; the bias on the
    INT32 grid of the accumulator scale 0.25 * 0.5 = 0.125 (0.1 -> 0.125, -0.2 -> -0.25)."""
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.75, -0.375, 0.125], [0.5, 1.0, -0.625]]))
        layer.bias.copy_(torch.tensor([0.1, -0.2]))
    model = nn.Sequential(layer)
    calib = torch.zeros(16, 3)
    calib[0, 2] = 3.5
    quantized = quantize_model(model, parse_format("int4"), calibrate(model, [calib]))
    assert quantized.weight_scales["0"] == 0.25 and quantized.act_scales["0"] == 0.5
    # W / 0.25 = [[7, -1.5, 0.5], [2, 4, -2.5]] -> [[7, -2, 0], [2, 4, -2]]; x / 0.5 = [2.5, -1.5, 7] -> [2, -2, 7]
    w_q = torch.tensor([[1.75, -0.5, 0.0], [0.5, 1.0, -0.5]])
    x_q = torch.tensor([1.0, -1.0, 3.5])
    assert torch.equal(layer.weight.detach(), w_q)
    out = model(torch.tensor([[1.25, -0.75, 3.5]]))
    assert torch.equal(layer.bias.detach(), torch.tensor([0.125, -0.25]))
    assert torch.equal(out[0], torch.tensor([2.25, -2.25]) + torch.tensor([0.125, -0.25]))
    assert torch.equal(out[0], w_q @ x_q + layer.bias.detach())
    assert quantized.record()["bias"] == "INT32"


def test_quantization_errors():
    with pytest.raises(QuantizationError, match="no Conv/Linear layer"):
        calibrate(nn.Sequential(nn.ReLU()), [torch.zeros(32, 3)])
    with pytest.raises(QuantizationError, match="calibration set too small"):
        calibrate(nn.Sequential(nn.Linear(3, 2)), [torch.zeros(4, 3)])


# ---- similarity ------------------------------------------------------------------------------------------------
def test_js_zero_for_identical_and_grows_as_bits_fall():
    w = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0))
    assert js_histogram(w, w.clone()) == 0.0
    for kind, bits in (("INT", range(2, 17)), ("POT", range(2, 9))):
        js = [js_histogram(w, fake_quantize(w, w.abs().max() / QuantFormat(kind, b).max_value, QuantFormat(kind, b)))
              for b in bits]
        assert all(a >= b for a, b in zip(js, js[1:])), (kind, js)
    js_int = [js_histogram(w, fake_quantize(w, w.abs().max() / (2 ** (b - 1) - 1), QuantFormat("INT", b)))
              for b in range(2, 9)]
    assert all(a > b for a, b in zip(js_int, js_int[1:])) and js_int[0] > 0.5 and js_int[-1] < 0.05


# ---- fit -------------------------------------------------------------------------------------------------------
def test_fit_recovers_logistic_and_plots(tmp_path):
    gen = torch.Generator().manual_seed(0)
    records = []
    for i, model in enumerate(("a", "b", "c")):
        for js in torch.logspace(-4, 0, 20).tolist():
            loss = (0.8 + 0.05 * i) / (1 + math.exp(-3 * (math.log10(js) + 1.5)))
            noise = 0.01 * float(torch.randn(2, generator=gen)[0])
            records.append({"model": model, "js_flops": js, "js_param": js, "acc_loss": loss + noise,
                            "robust_loss": loss - noise, "format": "INT8"})
    summary = fit_sweeps(records)
    assert summary["clean"]["overall"]["r2"] > 0.98
    assert all(f["r2"] > 0.98 for f in summary["robust"]["models"].values())
    assert plot_fits(records, summary, tmp_path / "fit.png").stat().st_size > 10000
    assert fit_curve([0.1, 0.2], [0.3, 0.4])["r2"] is None


# ---- a small trained model, shared by the tests below ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """A tiny Conv-BN CNN trained for a few seconds on scikit-learn's 8x8 digits (upsampled to 16 px, RGB)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.from_numpy(digits.target).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, 1497, (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x[:256], x, y  # evaluated on all 1,797 images: 1 point = 18 images


@pytest.fixture(scope="module")
def rat_checkpoint(tmp_path_factory):
    """A rat checkpoint of a small timm ResNet (random weights: ptq needs no trained model)."""
    from rat.models import create_model

    kwargs = {"num_classes": 10, "normalize": True, "img_size": RES, "channels": (8, 16, 32, 64), "stem_width": 8}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quant") / "model.pt"
    torch.save({"model": create_model("resnet10t", **kwargs).state_dict(), "arch": "resnet10t",
                "model_kwargs": kwargs}, path)
    return path


def test_int8_keeps_accuracy_int2_and_pot2_do_not(trained, tmp_path):
    model, calib, x_val, y_val = trained
    records = run_sweep(model, name="cnn", formats=[parse_format(f) for f in ("int8", "int2", "pot2")], calib=calib,
                        x=x_val, y=y_val, spec=AttackSpec(n_iter=1), img_size=16, batch_size=600,
                        jsonl=tmp_path / "sweep.jsonl", progress=False)
    fp, int8, int2, pot2 = (r["clean_acc"] for r in records)
    assert fp > 80, "the fixture model did not learn"
    assert abs(fp - int8) < 2.0  # BN folded first, per-tensor scales: 1.1 points here (unfolded: 0.1)
    assert fp - int2 > 30 and fp - pot2 > 30
    lines = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [r["format"] for r in lines] == ["FP32", "INT8", "INT2", "POT2"]
    assert 0 < lines[1]["js_flops"] < lines[2]["js_flops"] and lines[1]["js_param"] < lines[2]["js_param"]


def test_generator_images_are_classified_as_their_labels(trained):
    model, *_ = trained
    targets = stat_targets(model, None)
    generator = train_generator(model, targets, num_classes=10, img_size=16, steps=60, batch_size=32, width=32,
                                seed=0, progress=False)
    assert label_accuracy(model, generator, n=200) >= 90


def test_solve_mix_by_hand():
    # pure set: robust 80 %, all-inter-class set: robust 20 % -> a 40 % robust set needs (80 - 40) / (80 - 20) = 2/3
    assert solve_mix((100.0, 80.0), (70.0, 20.0), 40.0) == pytest.approx(2 / 3)
    assert solve_mix((100.0, 80.0), (70.0, 20.0), 90.0) == 0.0  # unreachable above: all pure
    assert solve_mix((100.0, 80.0), (70.0, 20.0), 10.0) == 1.0  # unreachable below: all inter-class
    # inter-class samples no less robust: the closer of the two sets
    assert solve_mix((100.0, 30.0), (70.0, 35.0), 10.0) == 0.0 and solve_mix((100.0, 30.0), (70.0, 35.0), 40.0) == 1.0


def test_adjusted_generator_tracks_the_target_robust_accuracy(trained):
    model, *_ = trained
    targets = stat_targets(model, None)
    generator = train_generator(model, targets, num_classes=10, img_size=16, steps=60, batch_size=32, width=32,
                                seed=0, progress=False)
    spec = AttackSpec(norm="Linf", eps=2 / 255, n_iter=3)
    kwargs = {"spec": spec, "steps_per_round": 5, "batch_size": 32, "train_n_iter": 1, "probe_n": 200,
              "progress": False}
    probe = adjust_generator(model, generator, targets, target_clean=90.0, target_robust=0.0, rounds=0, **kwargs)
    pure, mixed = probe.history[0]["pure_robust"], probe.history[0]["mixed_robust"]
    assert pure - mixed > 10, "inter-class samples should be markedly less robust"
    target = (pure + mixed) / 2
    result = adjust_generator(model, generator, targets, target_clean=90.0, target_robust=target, rounds=1, **kwargs)
    x, y = sample(result.generator, 400, result.mix, 1000, torch.device("cpu"))
    assert abs(robust_accuracy(model, x, y, spec, 400) - target) < 5


def test_layernorm_model_needs_recorded_statistics():
    from rat.models import create_model

    model = create_model("convnext_micro_cvst", num_classes=10).eval()
    with pytest.raises(GeneratorError, match="no BatchNorm running statistics"):
        stat_targets(model, None)
    stats = record_norm_stats(model, [torch.rand(4, 3, RES, RES)])
    assert stats and stat_targets(model, stats) is not None
    assert all(mean.shape == var.shape and (var >= 0).all() for mean, var in stats.values())


# ---- CLI -------------------------------------------------------------------------------------------------------
def test_cli_ptq_writes_a_checkpoint_rat_loads(rat_checkpoint, demo_betons, tmp_path, capsys, monkeypatch):
    import sys

    import rat.models.checkpoint as reader
    import rat.quant
    from rat.eval.model import build_eval_model
    from rat.models import build_model, create_model_from_checkpoint, read_checkpoint

    path = rat_checkpoint
    x_val = torch.rand(8, 3, RES, RES)
    out = tmp_path / "int8.pt"
    assert quant_main(["ptq", "--qmodel.checkpoint", str(path), "--qdata.calib_data", str(demo_betons[0]),
                       "--qdata.calib_n", "64", "--ptq.format", "int8", "--ptq.output", str(out),
                       "--qmodel.device", "cpu", "--qdata.num_workers", "1"]) == 0
    assert "INT8" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["quant"]["name"] == "INT8" and ckpt["quant"]["act_scales"]
    plain = create_model_from_checkpoint(out).eval()  # rat.models: quantized weights, float activations
    scale = ckpt["quant"]["weight_scales"]["conv1.0"]
    weights = plain.conv1[0].weight / scale
    assert torch.allclose(weights, weights.round(), atol=1e-4)  # integers times the recorded scale
    full = load_quantized_model(out).model.eval()  # rat.quant: activation quantizers too
    with torch.no_grad():
        assert not torch.equal(full(x_val), plain(x_val))
    evaluated = build_eval_model(read_checkpoint(out).recipe(), resolution=RES, device=torch.device("cpu"))
    with torch.no_grad():  # rat.eval attacks the deployed model: activation quantizers on, like rat.quant's
        assert torch.equal(evaluated(x_val), full(x_val))
    # rat.eval imports no rat.quant: the reader imports the quant record's builder (rat.models.checkpoint.RECORD_MODULES
    # names rat.quant.ptq) when it meets the record, in a process where nothing has imported it yet
    monkeypatch.setattr(reader, "_RECORD_BUILDERS", {})
    monkeypatch.setattr(rat.quant, "ptq", sys.modules["rat.quant.ptq"])
    monkeypatch.delitem(sys.modules, "rat.quant.ptq")
    deployed = build_model(read_checkpoint(out).recipe(), RES, deploy=True).eval()
    assert set(reader._RECORD_BUILDERS) == {"quant"} and "rat.quant.ptq" in sys.modules
    with torch.no_grad():
        assert torch.equal(deployed(x_val), full(x_val))
    # Written while rat.models wrapped the timm network: weights and the record's layer names under ``model.``
    legacy = {**ckpt, "model": {f"model.{k}": v for k, v in ckpt["model"].items()},
              "quant": {**ckpt["quant"], **{key: {f"model.{k}": v for k, v in ckpt["quant"][key].items()}
                                            for key in ("act_scales", "weight_scales")}}}
    with torch.no_grad():
        assert torch.equal(load_quantized_model(legacy).model.eval()(x_val), full(x_val))


def test_estimate_names_a_missing_generated_set(rat_checkpoint, tmp_path, capsys):
    out = tmp_path / "e.json"
    code = quant_main(["estimate", "--qmodel.checkpoint", str(rat_checkpoint), "--qmodel.device", "cpu",
                       "--estimate.generated", str(tmp_path / "gen.pt"), "--estimate.formats", "int8",
                       "--estimate.output", str(out)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("rat.quant: error: estimate.generated: ") and "rat.quant generate" in last
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--ptq.format", "int1"], "2 to 16 bits"),
    (["--ptq.format", "float8_e3m3"], "e + m must be 7"),
    (["--ptq.format", "bf16"], "unknown format"),
    (["--ptq.format", "int8", "--qdata.calib_n", "4"], "calibration set too small"),
    (["--ptq.format", "int8", "--qdata.calib_data", "/nonexistent/calib.beton"],
     "qdata.calib_data=/nonexistent/calib.beton does not exist"),
    (["--ptq.format", "int8", "--qmodel.checkpoint", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt does not exist"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(rat_checkpoint, demo_betons, tmp_path, capsys, args, message):
    path = rat_checkpoint
    out = tmp_path / "q.pt"
    code = quant_main(["ptq", "--qmodel.checkpoint", str(path), "--qdata.calib_data", str(demo_betons[0]),
                       "--ptq.output", str(out), "--qmodel.device", "cpu", "--qdata.num_workers", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()  # INFO log lines may come first (model loaded, ...)
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert code == 2 and errors == [err[-1]] and message in err[-1] and err[-1].startswith("rat.quant: error:")
    assert not out.exists()


def test_cli_requires_a_subcommand(capsys):
    assert quant_main([]) == 2
    assert quant_main(["quantize"]) == 2
    assert "give a subcommand" in capsys.readouterr().err


def test_autoattack_is_at_least_as_strong_as_one_apgd_step():
    from rat.quant.sweep import autoattack_accuracy, robust_accuracy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval()
    x = torch.rand(8, 3, 4, 4)
    y = model(x).argmax(1)
    spec = AttackSpec(eps=0.03, n_iter=1, autoattack="fast")
    aa = autoattack_accuracy(model, x, y, spec, 8)
    assert aa <= robust_accuracy(model, x, y, spec, 8) and aa < 100


# ---- issue 22: the seed's similarity, BN folding, bias quantization, fit report, CLI, rat.eval ----------------------
def _seed_js(fp: torch.Tensor, quantized: torch.Tensor) -> float:
    """The seed's per-tensor JS, written from its definition: softmax as torch takes it without ``dim``, natural log,
    ``KLDivLoss(reduction='sum')`` of both against the mean distribution, halved."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the implicit softmax dimension is deprecated (the seed relies on it)
        p, q = F.softmax(fp.double()), F.softmax(quantized.double())
    log_mean = ((p + q) / 2).log()
    kl = nn.KLDivLoss(reduction="sum")
    return float((kl(log_mean, p) + kl(log_mean, q)) / 2)


@pytest.mark.parametrize("fmt", ["int4", "pot4", "float6_e3m2"])
def test_default_similarity_is_the_seeds_softmax_js(fmt):
    """Per layer: JS(softmax W, softmax W_q) + JS(softmax b, softmax b_q), W_q and b_q de-quantized, as the seed."""
    from rat.quant import layer_tensors, model_macs, model_similarity
    from rat.quant.similarity import implicit_softmax_dim, layer_params

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    calib = torch.rand(16, 3, 6, 6)
    fp = layer_tensors(model, {})
    quantized = quantize_model(model, parse_format(fmt), calibrate(model, [calib]))
    q = layer_tensors(model, {})
    flops = {"0": 2 * 6 * 27 * 16, "2": 2 * 96 * 5}
    macs = model_macs(model, 6)
    assert macs == sum(flops.values()) // 2
    sim = model_similarity(fp, q, layer_params(fp), flops, macs)
    for name in ("0", "2"):
        expected = _seed_js(fp[name]["weight"], q[name]["weight"]) + _seed_js(fp[name]["bias"], q[name]["bias"])
        assert sim["js_layers"][name] == pytest.approx(expected, rel=1e-6, abs=1e-12) and expected > 0
    js = sim["js_layers"]
    assert sim["js_flops"] == pytest.approx((js["0"] * flops["0"] + js["2"] * flops["2"]) / sum(flops.values()))
    assert sim["js_param"] == pytest.approx((js["0"] * (162 + 6) + js["2"] * (480 + 5)) / (168 + 485))
    assert sim["js_flops_wt_log"] == pytest.approx(sim["js_flops"] * math.log10(macs))
    assert sim["js_flops_wt_cbrt"] == pytest.approx(sim["js_flops"] * macs ** (1 / 3))
    assert [implicit_softmax_dim(n) for n in range(6)] == [0, 0, 1, 0, 1, 1]  # torch's _get_softmax_dim
    # the bias on its format's grid at the accumulator scale s_in * s_w
    scale = quantized.act_scales["0"] * quantized.weight_scales["0"]
    b, b_q = fp["0"]["bias"], q["0"]["bias"]
    if fmt == "int4":
        assert torch.equal(b_q, torch.round(b / scale) * scale)
    else:
        assert torch.equal(b_q, (b / scale).to(torch.bfloat16).float() * scale)


def test_batchnorm_folds_into_the_convolution(trained):
    """Folding keeps the model's function, leaves each BN as a bias carrier and the state-dict keys unchanged."""
    import copy

    from rat.quant import fold_batchnorm

    model, calib, *_ = trained
    folded_model = copy.deepcopy(model)
    pairs = fold_batchnorm(folded_model, calib[:32])
    assert pairs == {"0": "1", "4": "5"}
    with torch.no_grad():
        assert torch.allclose(folded_model(calib), model(calib), atol=1e-5)
    bn, conv = folded_model[1], folded_model[0]
    assert torch.equal(bn.running_mean, torch.zeros(16)) and torch.equal(bn.weight.detach(), torch.ones(16))
    scale = (model[1].weight / torch.sqrt(model[1].running_var + model[1].eps)).detach()
    assert torch.allclose(conv.weight, model[0].weight * scale[:, None, None, None])
    assert folded_model.state_dict().keys() == model.state_dict().keys()
    quantized = quantize_model(folded_model, parse_format("int8"), calibrate(model, [calib]), folded=pairs)
    assert quantized.record()["folded_bn"] == pairs and quantized.record()["bias"] == "INT32"
    assert torch.equal(conv.bias, torch.zeros(16))  # the conv's own bias moved into the BN carrier


def test_duplicate_grids_are_found_and_left_out_of_fits():
    """FLOAT<b>_E1 is INT<b>'s grid and FLOAT<b>_E<b-1>M0 POT<b>'s: the quantized tensors are identical."""
    from rat.quant import same_grid_as

    grid = sweep_grid()
    twins = {f.name: t.name for i, f in enumerate(grid) if (t := same_grid_as(f, grid[:i])) is not None}
    assert twins["FLOAT5_E1M3"] == "INT5" and twins["FLOAT6_E5M0"] == "POT6" and twins["POT2"] == "INT2"
    assert len(grid) - len(twins) == 36
    w = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    for a, b in (("float5_e1m3", "int5"), ("float6_e5m0", "pot6")):
        fa, fb = parse_format(a), parse_format(b)
        assert torch.equal(fake_quantize(w, w.abs().max() / fa.max_value, fa),
                           fake_quantize(w, w.abs().max() / fb.max_value, fb))


def _write_sweep(path, n_points: int, model: str = "m", extra_line: str = ""):
    lines = [json.dumps({"model": model, "format": "FP32", "acc_loss": 0.0, "robust_loss": 0.0, "js_flops": 0.0})]
    for i in range(n_points):
        js = 10 ** (-4 + 4 * i / max(n_points - 1, 1))
        loss = 0.9 / (1 + math.exp(-3 * (math.log10(js) + 2))) + 0.01 * (-1) ** i
        lines.append(json.dumps({"model": model, "format": f"INT{16 - i}", "acc_loss": loss, "robust_loss": loss,
                                 **{k: js for k in ("js_flops", "js_param", "js_flops_wt_log", "js_flops_wt_cbrt",
                                                    "hist_js_flops", "hist_js_param", "hist_js_flops_wt_log",
                                                    "hist_js_flops_wt_cbrt")}}))
    lines.append(json.dumps({"model": model, "format": "FLOAT8_E1M6", "same_grid_as": "INT8", "acc_loss": 5.0,
                             "robust_loss": 5.0, "js_flops": 0.5}))
    path.write_text("\n".join(lines) + "\n" + extra_line)
    return path


def test_cli_fit_prints_the_seeds_r2_table(tmp_path, capsys):
    a, b = _write_sweep(tmp_path / "a.jsonl", 10, "a"), _write_sweep(tmp_path / "b.jsonl", 8, "b")
    out = tmp_path / "fit.png"
    assert quant_main(["fit", "--fit.sweeps", f"{a},{b}", "--fit.output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| similarity | a | b | all |" in printed and "| hist_js_flops |" in printed
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["clean"]["models"]["a"]["n"] == 10  # the FLOAT8_E1M6 twin of INT8 is left out
    assert summary["all_similarities"]["js_flops_wt_cbrt"]["clean"]["overall"]["r2"] > 0.9


@pytest.mark.parametrize("case, message", [
    ("few-points", "needs at least 4"),
    ("csv", "is not a sweep JSONL"),
    ("truncated", "line 13 is not JSON"),
    ("json-output", "must be a .png"),
])
def test_cli_fit_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case, message):
    if case == "csv":
        sweep = tmp_path / "sweep.csv"
        sweep.write_text("model,format,acc_loss\nm,INT8,0.1\n")
    else:
        sweep = _write_sweep(tmp_path / "sweep.jsonl", 3 if case == "few-points" else 10,
                             extra_line='{"model": "m", "format": "INT2", "acc_lo' if case == "truncated" else "")
    out = tmp_path / ("fit.json" if case == "json-output" else "fit.png")
    code = quant_main(["fit", "--fit.sweeps", str(sweep), "--fit.output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rat.quant: error:") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [sweep.name]


def test_cli_help_lists_the_subcommands(capsys):
    for flag in ("--help", "-h"):
        assert quant_main([flag]) == 0
        printed = capsys.readouterr().out
        assert all(sub in printed for sub in ("ptq", "sweep", "fit", "generate", "estimate"))


def test_collapsed_model_loses_all_robustness(trained, tmp_path):
    """A model at chance has robust loss 1, even when its (trivial) robust accuracy is above the FP model's."""
    from rat.quant.sweep import collapse_threshold

    assert collapse_threshold(10, 300) == pytest.approx(10 + 3 * math.sqrt(10 * 90 / 300))
    model, calib, x_val, y_val = trained
    spec = AttackSpec(eps=32 / 255, n_iter=2)  # strong enough that the FP model keeps few points
    records = run_sweep(model, name="cnn", formats=[parse_format("int2")], calib=calib, x=x_val[:300],
                        y=y_val[:300], spec=spec, img_size=16, batch_size=300, jsonl=tmp_path / "s.jsonl",
                        progress=False)
    fp, int2 = records
    assert int2["collapsed"] == (int2["clean_acc"] <= collapse_threshold(10, 300))
    # the seeded model: FP 83.3 % clean / 0.0 % robust, INT2 9.3 % clean (chance) / 3.7 % robust
    assert int2["collapsed"] and int2["robust_acc"] > fp["robust_acc"]
    assert int2["robust_loss"] == 1.0


def test_rat_eval_records_the_quantization(rat_checkpoint, demo_betons, tmp_path):
    from rat.eval import EvalSpec, run_evaluation

    out = tmp_path / "int8.pt"
    assert quant_main(["ptq", "--qmodel.checkpoint", str(rat_checkpoint), "--qdata.calib_data", str(demo_betons[0]),
                       "--qdata.calib_n", "16", "--ptq.format", "int8", "--ptq.output", str(out),
                       "--qmodel.device", "cpu", "--qdata.num_workers", "1"]) == 0
    result = run_evaluation(EvalSpec(data=demo_betons[1], checkpoint=out, output=tmp_path / "r.json",
                                     version="custom", attacks=("apgd-ce",), n_ex=2, batch_size=2, num_workers=1,
                                     device="cpu", n_iter=1, resolution=RES))
    assert result["quantization"] == "INT8"
    assert json.loads((tmp_path / "r.json").read_text())["quantization"] == "INT8"


def test_estimate_reports_relative_accuracy_and_pca(rat_checkpoint, demo_betons, tmp_path, capsys):
    """estimate --estimate.real 1: relative accuracies (q / fp) on both sets, their R² (squared Pearson r), the two
    figures of the seed; collapsed variants are left out of the ranking."""
    import numpy as np

    from rat.eval.data import eval_subset

    gen = torch.Generator().manual_seed(0)
    generated = tmp_path / "gen.pt"
    guide = {"data": str(demo_betons[1].resolve()), "dataset_size": 300, "n": 20,
             "indices": eval_subset(300, 20).tolist()}  # as generate records it: estimate scores on other images
    torch.save({"images": torch.randint(0, 256, (40, 3, RES, RES), generator=gen, dtype=torch.uint8),
                "labels": torch.arange(40) % 10,
                "images_before": torch.randint(0, 256, (40, 3, RES, RES), generator=gen, dtype=torch.uint8),
                "labels_before": torch.arange(40) % 10, "meta": {"guide": guide}}, generated)
    out = tmp_path / "estimate.json"
    assert quant_main(["estimate", "--qmodel.checkpoint", str(rat_checkpoint), "--qmodel.device", "cpu",
                       "--qdata.data", str(demo_betons[1]), "--qdata.n_ex", "40", "--qdata.num_workers", "1",
                       "--qattack.n_iter", "1", "--estimate.generated", str(generated), "--estimate.formats",
                       "int8,int6,int4,pot3", "--estimate.real", "1", "--estimate.output", str(out)]) == 0
    assert "relative accuracy" in capsys.readouterr().out
    summary = json.loads(out.read_text())
    rows, rel = summary["rows"], summary["relative"]
    kept = [r for r in rows[1:] if r["real_clean_acc"] > summary["collapse_threshold"]]
    assert rel["collapsed"] == [r["format"] for r in rows[1:] if r not in kept]
    for name, key in (("clean", "clean_acc"), ("robust", "robust_acc")):
        assert rel[name]["real"] == pytest.approx([r[f"real_{key}"] / rows[0][f"real_{key}"] for r in kept])
        assert rel[name]["generated"] == pytest.approx([r[f"est_{key}"] / rows[0][f"est_{key}"] for r in kept])
        if rel[name]["r2"] is not None:
            assert rel[name]["r2"] == pytest.approx(np.corrcoef(rel[name]["generated"], rel[name]["real"])[0, 1] ** 2)
    assert (tmp_path / "estimate_relative.png").stat().st_size > 5000
    assert (tmp_path / "estimate_pca.png").stat().st_size > 5000


def test_generate_guide_images_are_apart_from_estimate_scoring_images(rat_checkpoint, demo_betons, tmp_path, capsys):
    """generate measures the adjustment's targets on the guide part (rat.eval's seeded subset of guide_n images) and
    records it; estimate --estimate.real 1 scores on the images after it, and refuses scoring images that overlap."""
    from rat.eval.data import dataset_size, eval_subset

    val, generated = demo_betons[1], tmp_path / "gen.pt"
    common = ["--qmodel.checkpoint", str(rat_checkpoint), "--qmodel.device", "cpu", "--qdata.data", str(val),
              "--qdata.num_workers", "1", "--qattack.n_iter", "1"]
    assert quant_main(["generate", *common, "--qdata.guide_n", "20", "--generate.steps", "2", "--generate.rounds",
                       "1", "--generate.steps_per_round", "1", "--generate.batch_size", "8", "--generate.width", "8",
                       "--generate.n_samples", "20", "--generate.progress", "0",
                       "--generate.output", str(generated)]) == 0
    assert "targets measured on the 20 guide images" in capsys.readouterr().out
    meta = torch.load(generated, weights_only=True)["meta"]
    guide = meta["guide"]
    assert guide["indices"] == eval_subset(dataset_size(val), 20).tolist() and guide["targets"] == "measured"
    assert 0 <= meta["target_clean"] <= 100 and 0 <= meta["target_robust"] <= meta["target_clean"]

    out = tmp_path / "estimate.json"
    estimate = ["estimate", *common, "--estimate.generated", str(generated), "--estimate.formats", "int8",
                "--estimate.real", "1", "--qdata.n_ex", "20", "--estimate.output", str(out)]
    assert quant_main([*estimate, "--qdata.guide_n", "10"]) == 2  # skips only 10 of the 20 guide images
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rat.quant: error: ") and "guided the generator" in err[0]  # first
    assert not out.exists() and not (tmp_path / "estimate_relative.png").exists()
    other = [*estimate, "--qdata.data", str(demo_betons[0])]  # another source: its images cannot be checked
    assert quant_main(other) == 2 and "not the source of the generated set's guide" in capsys.readouterr().err
    half = ["generate", *common, "--generate.target_clean", "50", "--generate.output", str(tmp_path / "g2.pt")]
    assert quant_main(half) == 2 and "give both generate.target_clean" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "g2.pt").exists()

    assert quant_main(estimate) == 0
    summary = json.loads(out.read_text())
    assert summary["guide"]["indices"] == guide["indices"] and len(summary["score"]["indices"]) == 20
    assert not set(summary["score"]["indices"]) & set(guide["indices"])
    assert summary["score"]["indices"] == sorted(set(eval_subset(dataset_size(val), 40)) - set(guide["indices"]))
