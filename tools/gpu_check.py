"""One prepared check of rat on a lent GPU: CUDA-only tests, the real pipeline end to end, throughput side by side.

Run from the repository root, after the offline install of ``tools/gpu_wheels.sh`` (docs/benchmarks.md, "GPU check")::

    python tools/gpu_check.py --out gpu_check                   # on one H200: about 6 min (estimated)
    python tools/gpu_check.py --out /tmp/dry --device cpu --tiny  # the dry run of every code path, here on the CPU

Sections (``--sections``, all by default), each recorded in ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` as soon as
it ends, so a run cut short keeps what it measured:

* ``tests``: the tests marked ``gpu`` (``pytest -m gpu``; skipped on a machine without CUDA);
* ``e2e``: the demo betons -> ``python -m rat.train`` (APGD-2 Linf 4/255, bf16, channels_last, heavy augmentation on
  the device, ``--model.compile 1``, fused AdamW, cudnn benchmark) -> SIGTERM after its first step record -> resume
  (``--training.resume auto``) to the end -> ``python -m rat.eval`` (fast AutoAttack, bf16) of the last checkpoint;
* ``throughput``: per model (ConvNeXt-T-CvSt and ViT-B-CvSt at 224; micro models at 32 with ``--tiny``), on the same
  on-device batch in one process: rat's clean and APGD-2 AT step (``rat.train.engine.train_one_epoch``, the trainer's
  attack, loss and optimizer) against a plain reference loop written here without rat's code (the same timm model,
  ``torch.autocast`` bf16, channels_last, ``torch.optim.AdamW(fused=True)``, a hand-written 2-step APGD with the same
  passes: 2 forward+input-gradient backward, 1 scoring forward), each with ``torch.compile`` off and on; img/s, MFU,
  rat / reference, AT / clean, peak GPU memory. Plus two lever rows of rat's eager AT step: foreach AdamW (rat's
  default) and cudnn benchmark off. No augmentation in either loop, so the ratio is the step's own cost;
* ``loader``: rat's FFCV train loader at the throughput resolution with the paper's heavy augmentation (RandAugment
  ``rand-m9-mstd0.5-inc1``, random erasing, Mixup/CutMix) on the device, ``--workers`` workers, on JPEGs written
  here: img/s, against the fastest AT step's consumption (is the GPU starved?).

MFU counts matmul/conv FLOPs (``rat.models.flops.count_flops``, F per image forward): a clean step is 3F, an APGD-2 AT
step 3F + 2 x 2F + F = 8F; peak ``--peak-tflops`` (H100/H200 SXM dense bf16 datasheet: 989.4). Exit status: 0 when
every section passed, 1 when one failed (the report says which and why), 2 for bad input.
"""
from __future__ import annotations

import os

# As run_train.sh: idle OpenMP threads must sleep, not spin on the cores that ffcv's decoding needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _timing import OnDeviceBatches, images_per_second, seconds_per_train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "e2e", "throughput", "loader")
EPS = 4 / 255


def _sizes(tiny: bool) -> dict[str, Any]:
    """The sizes of a run: the real ones (one H200), or tiny ones that take every code path on a CPU in minutes."""
    if tiny:
        return {"models": ["convnext_micro_cvst", "vit_micro_patch16_cvst"], "res": 32, "batch": 8, "steps": 2,
                "warmup": 1, "e2e_arch": "convnext_micro_cvst", "e2e_res": 32, "e2e_batch": 16, "e2e_limit": 3,
                "e2e_workers": 1, "e2e_robust_n": 16, "eval_n": 16, "loader_images": 64, "loader_batch": 16,
                "loader_seconds": 1.0, "num_classes": 10}
    return {"models": ["convnext_tiny_cvst", "vit_base_patch16_cvst"], "res": 224, "batch": 128, "steps": 10,
            "warmup": 3, "e2e_arch": "convnext_micro_cvst", "e2e_res": 64, "e2e_batch": 64, "e2e_limit": 20,
            "e2e_workers": 8, "e2e_robust_n": 128, "eval_n": 256, "loader_images": 2048, "loader_batch": 128,
            "loader_seconds": 10.0, "num_classes": 1000}


# ---------------------------------------------------------------------------------------------------------- tests


def check_tests(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess (one process, no xdist); counts from its JUnit XML."""
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "tests"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    # On the GPU a skipped CUDA test is a failure of the check (it would say nothing); on the CPU they all skip.
    ok = proc.returncode == 0 and counts["tests"] > 0 and (args.device == "cpu" or counts["skipped"] == 0)
    return {"ok": ok, "command": " ".join(cmd[1:]), "returncode": proc.returncode, **counts,
            "tail": proc.stdout[-1500:] if not ok else proc.stdout.strip().splitlines()[-1]}


# ------------------------------------------------------------------------------------------------------------ e2e


def _run(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stderr + proc.stdout)
    return proc


def check_e2e(out: Path, args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    """Train (stopped by SIGTERM, resumed) and evaluate, as real processes, on the demo betons."""
    from rat.data.demo import ensure_demo_betons

    start = time.perf_counter()
    train_beton, val_beton = ensure_demo_betons(out / "demo")
    run = out / "e2e_run"
    res = sizes["e2e_res"]
    train = [sys.executable, "-m", "rat.train", "--data.train_dataset", str(train_beton), "--data.val_dataset",
             str(val_beton), "--logging.folder", str(run), "--logging.progress", "0", "--logging.log_every", "1",
             "--model.arch", sizes["e2e_arch"], "--resolution.min_res", str(res), "--resolution.max_res", str(res),
             "--training.batch_size", str(sizes["e2e_batch"]), "--training.limit_batches", str(sizes["e2e_limit"]),
             "--training.epochs", "2", "--training.precision", "bf16", "--training.device", args.device,
             "--training.fused", "1", "--training.cudnn_benchmark", "1", "--model.channels_last", "1",
             "--model.compile", "1", "--augment.heavy", "1", "--adv.attack", "apgd", "--adv.norm", "Linf",
             "--adv.eps", str(EPS), "--adv.n_iter", "2", "--validation.robust_n_ex", str(sizes["e2e_robust_n"]),
             "--validation.batch_size", "128", "--data.num_workers", str(sizes["e2e_workers"])]
    metrics = run / "metrics.jsonl"
    first = subprocess.Popen(train, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + args.timeout
    while time.time() < deadline and first.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=args.timeout)
    (out / "e2e_train1.log").write_text(stderr)
    stopped = next((r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") != "epoch"), {}) \
        if metrics.exists() else {}
    result: dict[str, Any] = {"train_command": " ".join(train[1:]), "sigterm_returncode": first.returncode,
                              "sigterm_said": stderr.strip().splitlines()[-1] if stderr.strip() else ""}
    if not (run / "checkpoints" / "last.pt").exists():
        return {**result, "ok": False, "why": "no checkpoint after SIGTERM (see e2e_train1.log)"}
    resumed = _run(train + ["--training.resume", "auto"], out / "e2e_train2.log", args.timeout)
    epochs = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "epoch"]
    result.update({"resume_returncode": resumed.returncode, "epochs": epochs[-1:] and epochs[-1],
                   "first_step_record": stopped})
    if resumed.returncode != 0:
        return {**result, "ok": False, "why": "the resumed run failed (see e2e_train2.log)"}
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    result["checkpoint"] = {"epoch": state["epoch"], "step": state["step"]}
    evaluation = out / "e2e_eval.json"
    cmd = [sys.executable, "-m", "rat.eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--data",
           str(val_beton), "--norm", "Linf", "--eps", "4/255", "--resolution", str(res), "--version", "fast",
           "--n-ex", str(sizes["eval_n"]), "--batch-size", "128", "--precision", "bf16", "--device", args.device,
           "--output", str(evaluation), "--progress", "0"]
    evaluated = _run(cmd, out / "e2e_eval.log", args.timeout)
    result.update({"eval_command": " ".join(cmd[1:]), "eval_returncode": evaluated.returncode,
                   "eval_summary": evaluated.stdout.strip().splitlines()[-1] if evaluated.stdout.strip() else ""})
    if evaluated.returncode != 0:
        return {**result, "ok": False, "why": "rat.eval failed (see e2e_eval.log)"}
    report = json.loads(evaluation.read_text())
    keys = ("clean_accuracy", "robust_accuracy", "n_ex", "version", "precision")
    result["eval"] = {k: report[k] for k in keys if k in report}
    steps = 2 * sizes["e2e_limit"]
    ok = first.returncode == 0 and "resume with --training.resume auto" in stderr and bool(stopped) \
        and state["epoch"] == 2 and state["step"] == steps
    return {**result, "ok": ok, "seconds": round(time.perf_counter() - start, 1),
            **({} if ok else {"why": f"expected epoch 2, step {steps} in the resumed checkpoint"})}


# ----------------------------------------------------------------------------------------------------- throughput


def reference_apgd2(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """APGD (Croce & Hein 2020) with 2 iterations from ``x`` (the training variant: no random start), written out:
    the gradient at the start, one step of size 2 eps, the gradient there, one momentum (0.75) step, a scoring
    forward; per sample the highest-loss iterate. 2 forward+input-gradient backward passes and 1 forward, as rat's."""

    def loss_and_grad(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_(True)
        loss = F.cross_entropy(model(z).float(), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), [z])
        return loss.detach(), grad

    def project(z: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(z, x - eps), x + eps).clamp_(0.0, 1.0)

    step = 2 * eps
    loss0, grad0 = loss_and_grad(x)
    x1 = project(x + step * grad0.sign())
    loss1, grad1 = loss_and_grad(x1)
    z = project(x1 + step * grad1.sign())
    x2 = project(x1 + 0.75 * (z - x1) + 0.25 * (x1 - x))
    with torch.no_grad():
        loss2 = F.cross_entropy(model(x2).float(), y, reduction="none")
    best = torch.where((loss1 > loss0)[:, None, None, None], x1, x)
    best_loss = torch.maximum(loss0, loss1)
    return torch.where((loss2 > best_loss)[:, None, None, None], x2, best).detach()


def reference_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                      adversarial: bool) -> Callable[[], None]:
    """One step of the plain loop: (attack in eval mode), forward in train mode under bf16 autocast, CE, AdamW."""
    device_type = x.device.type

    def step() -> None:
        inputs = x
        if adversarial:
            model.eval()
            with torch.autocast(device_type, dtype=torch.bfloat16):
                inputs = reference_apgd2(model, x, y, EPS)
            model.train()
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(inputs), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _measure_rat(*, net: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                 warmup: int, attack: str, fused: bool = True, benchmark: bool = True) -> float:
    """Seconds per step of rat's ``train_one_epoch`` on the batch: its attack (``none`` or APGD-2 Linf 4/255) on
    ``net`` (the module, or its compiled wrapper: the trainer's ``--model.compile 1``), its AdamW, bf16 autocast."""
    from rat.attacks import create_attack
    from rat.train.engine import StepOptions, train_one_epoch
    from rat.train.optim import build_optimizer
    from rat.train.state import TrainState
    from rat.train.task import AdversarialTask

    torch.backends.cudnn.benchmark = benchmark
    attacker = create_attack("none", net) if attack == "none" else \
        create_attack("apgd", net, norm="Linf", eps=EPS, n_iter=2)
    optimizer = build_optimizer(module, "adamw", 1e-4, 0.05, fused=fused)
    task = AdversarialTask(net, attacker, torch.nn.CrossEntropyLoss())
    options = StepOptions(lr=lambda step: 1e-4, precision="bf16")

    def epoch(n: int) -> None:
        result = train_one_epoch(task, OnDeviceBatches(x, y, n), TrainState(module, optimizer, attacker), options)
        if result.stop_reason is not None:  # a step not taken would make the timing a lie
            raise RuntimeError(f"rat's step stopped early ({result.stop_reason}) after {result.batches} of {n} steps")

    return seconds_per_train_step(epoch, x.device, steps, warmup)


def _measure_reference(*, net: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       steps: int, warmup: int, adversarial: bool) -> float:
    """Seconds per step of the plain loop (fused AdamW, cudnn benchmark on)."""
    torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    step = reference_step_fn(net, optimizer, x, y, adversarial)

    def epoch(n: int) -> None:
        for _ in range(n):
            step()

    return seconds_per_train_step(epoch, x.device, steps, warmup)


def check_throughput(args: argparse.Namespace, sizes: dict[str, Any], device: torch.device,
                     record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """rat's steps and the reference loop's, per model and compile setting, on one on-device batch."""
    import rat.models
    from rat.models.flops import count_flops

    res, batch, steps, warmup = sizes["res"], sizes["batch"], sizes["steps"], sizes["warmup"]
    peak = args.peak_tflops * 1e12
    rows: list[dict[str, Any]] = []
    gflops: dict[str, float] = {}
    for arch in sizes["models"]:
        module = rat.models.create_model(arch, normalize=False, num_classes=sizes["num_classes"], img_size=res)
        module = module.to(device).to(memory_format=torch.channels_last)
        flops = count_flops(module, res)
        gflops[arch] = round(flops / 1e9, 3)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.rand(batch, 3, res, res, device=device, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, sizes["num_classes"], (batch,), device=device, generator=gen)
        for compiled in (False, True):
            torch._dynamo.reset()
            graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            net = torch.compile(module) if compiled else module  # the trainer's --model.compile 1
            common = {"net": net, "module": module, "x": x, "y": y, "steps": steps, "warmup": warmup}
            configs = [("rat", "clean", partial(_measure_rat, attack="none", **common)),
                       ("reference", "clean", partial(_measure_reference, adversarial=False, **common)),
                       ("rat", "apgd2", partial(_measure_rat, attack="apgd", **common)),
                       ("reference", "apgd2", partial(_measure_reference, adversarial=True, **common))]
            if not compiled:
                configs += [("rat foreach AdamW", "apgd2", partial(_measure_rat, attack="apgd", fused=False, **common)),
                            ("rat cudnn.benchmark off", "apgd2",
                             partial(_measure_rat, attack="apgd", benchmark=False, **common))]
            for loop, kind, measure in configs:
                _peak_reset(device)
                t0 = time.perf_counter()
                seconds = measure()
                passes = 3 if kind == "clean" else 8
                row = {"model": arch, "res": res, "batch": batch, "compile": compiled, "loop": loop, "step": kind,
                       "img_s": round(batch / seconds, 1), "step_ms": round(1e3 * seconds, 2),
                       "mfu": round(batch * passes * flops / seconds / peak, 4), "peak_gib": _peak_gib(device),
                       "wall_s": round(time.perf_counter() - t0, 1)}
                if compiled:  # graphs dynamo compiled so far for this model (recompiles show up here)
                    row["dynamo_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
                rows.append(row)
                record({"rows": rows, "fwd_gflops": gflops})
                print(json.dumps(row), flush=True)
        del module, x, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = True
    return {"ok": True, "rows": rows, "fwd_gflops": gflops, "ratios": _ratios(rows)}


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and compile setting: rat / reference img/s (clean, AT), and each loop's AT step / clean step time."""
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["model"], r["compile"]), {})[f'{r["loop"]}/{r["step"]}'] = r["step_ms"]
    out = []
    for (model, compiled), t in table.items():
        entry = {"model": model, "compile": compiled}
        if "rat/clean" in t and "reference/clean" in t:
            entry["clean_rat_vs_ref"] = round(t["reference/clean"] / t["rat/clean"], 3)
        if "rat/apgd2" in t and "reference/apgd2" in t:
            entry["at_rat_vs_ref"] = round(t["reference/apgd2"] / t["rat/apgd2"], 3)
        for loop in ("rat", "reference"):
            if f"{loop}/apgd2" in t and f"{loop}/clean" in t:
                entry[f"at_over_clean_{loop}"] = round(t[f"{loop}/apgd2"] / t[f"{loop}/clean"], 3)
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------------- loader


def check_loader(out: Path, args: argparse.Namespace, sizes: dict[str, Any], device: torch.device,
                 at_img_s: float | None) -> dict[str, Any]:
    """rat's FFCV train loader + heavy augmentation on the device: img/s over whole epochs after a warm-up epoch."""
    from bench_loader import make_jpeg_folder, rat_epochs

    from rat.data import build_train_loader, write_folder_beton

    folder = out / "loader_jpegs"
    if not folder.exists():
        make_jpeg_folder(folder, sizes["loader_images"], 10)
    written = write_folder_beton(folder, out / "loader.beton", max_resolution=256, write_mode="proportion",
                                 compress_probability=0.5, jpeg_quality=90, num_workers=args.workers, progress=False)
    loader = build_train_loader(written.path, batch_size=sizes["loader_batch"], resolution=sizes["res"],
                                device=device, num_workers=args.workers, seed=0)
    speed = images_per_second(rat_epochs(loader, heavy=True, device=device, num_classes=10), 1, sizes["loader_seconds"])
    result = {"ok": True, "res": sizes["res"], "batch": sizes["loader_batch"], "workers": args.workers,
              "images": sizes["loader_images"], "img_s": round(speed["img_s"], 1), "epochs": speed["epochs"]}
    if at_img_s:
        result.update({"fastest_at_step_img_s": at_img_s, "loader_over_at": round(speed["img_s"] / at_img_s, 2)})
    return result


# --------------------------------------------------------------------------------------------------------- report


def _markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"# rat GPU check: {env['gpu']}", "", f"`{report['command']}`  ", f"torch {env['torch']}, Python "
             f"{env['python']}, {env['cpus']} CPUs, started {env['started']}", ""]
    for name in SECTIONS:
        section = report["sections"].get(name)
        if section is None:
            continue
        status = "pass" if section.get("ok") else "FAIL"
        lines += [f"## {name}: {status}", ""]
        if "error" in section:
            lines += ["```", section["error"], "```", ""]
        if name == "tests":
            lines += [f"`{section.get('command', '')}`: {section.get('passed', 0)} passed, "
                      f"{section.get('failures', 0)} failed, {section.get('errors', 0)} errors, "
                      f"{section.get('skipped', 0)} skipped", ""]
        elif name == "e2e":
            keys = ("sigterm_returncode", "sigterm_said", "resume_returncode", "checkpoint", "epochs",
                    "eval_summary", "eval", "seconds", "why")
            lines += [f"- {k}: `{section[k]}`" for k in keys if k in section] + [""]
        elif name == "throughput":
            lines += ["| model | compile | loop | step | img/s | step ms | MFU | peak GiB |",
                      "|---|---|---|---|---:|---:|---:|---:|"]
            lines += [f"| {r['model']} | {int(r['compile'])} | {r['loop']} | {r['step']} | {r['img_s']} | "
                      f"{r['step_ms']} | {100 * r['mfu']:.1f} % | {r['peak_gib']} |" for r in section.get("rows", [])]
            lines += ["", "| model | compile | clean rat/ref | AT rat/ref | AT/clean rat | AT/clean ref |",
                      "|---|---|---:|---:|---:|---:|"]
            lines += [f"| {r['model']} | {int(r['compile'])} | {r.get('clean_rat_vs_ref', '')} | "
                      f"{r.get('at_rat_vs_ref', '')} | {r.get('at_over_clean_rat', '')} | "
                      f"{r.get('at_over_clean_reference', '')} |" for r in section.get("ratios", [])]
            lines += ["", "rat/ref: img/s of rat over the reference's (targets: clean >= 1.0; AT/clean of rat <= 2.8)",
                      ""]
        elif name == "loader":
            keys = ("res", "batch", "workers", "images", "img_s", "fastest_at_step_img_s", "loader_over_at")
            lines += [f"- {k}: `{section[k]}`" for k in keys if k in section]
            lines += ["", "target: loader_over_at >= 1.2 (the loader feeds the fastest AT step with room)", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md and logs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run")
    parser.add_argument("--tiny", action="store_true", help="micro models, 32 px, a few steps (for the CPU dry run)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: all CPUs; 1 with --tiny)")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak for MFU")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for each subprocess")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"gpu_check.py: unknown section(s) {unknown}: use a comma-separated subset of {','.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device is visible: run it on the lent GPU, or pass --device cpu --tiny for the "
              "dry run", file=sys.stderr)
        return 2
    args.workers = args.workers or (1 if args.tiny else os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    sizes = _sizes(args.tiny)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "env": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sizes": sizes, "peak_tflops": args.peak_tflops},
        "sections": {}}

    def write() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "gpu_check.md").write_text(_markdown(report))

    def record(name: str) -> Callable[[dict[str, Any]], None]:
        def partial(values: dict[str, Any]) -> None:
            report["sections"][name] = {"ok": False, "partial": True, **values}
            write()
        return partial

    for name in sections:
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            if name == "tests":
                result = check_tests(args.out, args)
            elif name == "e2e":
                result = check_e2e(args.out, args, sizes)
            elif name == "throughput":
                result = check_throughput(args, sizes, device, record(name))
            else:
                rows = report["sections"].get("throughput", {}).get("rows", [])
                at = max((r["img_s"] for r in rows if r["step"] == "apgd2" and r["loop"] == "rat"), default=None)
                result = check_loader(args.out, args, sizes, device, at)
        except Exception as err:  # noqa: BLE001 - one section's failure is recorded and the next one still runs
            result = {**report["sections"].get(name, {}), "ok": False,
                      "error": "".join(traceback.format_exception_only(type(err), err)).strip(),
                      "traceback": traceback.format_exc()[-4000:]}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        report["sections"][name] = result
        write()
        print(f"[gpu_check] {name}: {'pass' if result.get('ok') else 'FAIL'} in {result['wall_s']} s",
              file=sys.stderr, flush=True)
    failed = [n for n in sections if not report["sections"][n].get("ok")]
    print(f"[gpu_check] report: {args.out / 'gpu_check.md'}; "
          f"{'all sections passed' if not failed else 'failed: ' + ', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
