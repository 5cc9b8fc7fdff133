"""One rank of the 2-process checks in test_train_ddp.py (launched with torchrun; not a test module itself).

Reads a beton whose labels are the sample indices through the distributed train and val loaders (train over epochs 0,
1 and 0 again; val over a subset and over everything), then trains a few steps of APGD adversarial training with rat's
engine under real DDP (gloo). Writes, per rank, the indices each loader gave, the sample ids training read and a
checksum of every parameter after training. Then a checkpoint write that fails on rank 0 (its folder lies under a
file): what each rank saw. Then a BatchNorm model (resnet10t, each rank normalizing its own batch): an epoch of 3 steps
straight, and one stopped after 1 step, checkpointed and resumed on fresh states (other initial weights). Then
gradient accumulation: 2 steps of 2 micro-batches per rank on fixed images (the test compares them with 1 process of 4
micro-batches). Last, with 2 CUDA devices only, SyncBatchNorm's statistics of one forward pass.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from process_support import fixed_images, layernorm_classifier, stop_after_checks
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rat.attacks import create_attack
from rat.data import build_train_loader, build_val_loader, read_beton_info
from rat.models import create_model, load_checkpoint_file
from rat.train.checkpoint import CheckpointWriteError, save_on_primary
from rat.train.distributed import DistInfo, barrier, batchnorm_stats, cleanup_distributed, init_distributed
from rat.train.engine import EpochHooks, StepOptions, train_one_epoch
from rat.train.optim import build_optimizer
from rat.train.state import TrainState
from rat.train.task import AdversarialTask


def read_shards(index_beton: str) -> dict:
    """The indices each distributed loader of this rank yields (the beton's labels are its sample indices)."""
    train = build_train_loader(index_beton, batch_size=8, resolution=16, device="cpu", num_workers=1, seed=11,
                               distributed=True, drop_last=False)
    epochs: dict[str, list] = {}
    for epoch in (0, 1, 0):  # epoch 0 twice: the order is a function of (seed, epoch)
        train.set_epoch(epoch)
        epochs.setdefault(str(epoch), []).append([int(v) for _, y in train for v in y])
    n = read_beton_info(index_beton)["num_samples"]
    val = build_val_loader(index_beton, batch_size=8, resolution=16, device="cpu", num_workers=1, distributed=True,
                           indices=np.arange(3, n))
    every = build_val_loader(index_beton, batch_size=8, resolution=16, device="cpu", num_workers=1, distributed=True)
    return {"train": epochs, "train_len": len(train), "val": [int(v) for _, y in val for v in y],
            "val_all": [int(v) for _, y in every for v in y], "val_len": [len(val), len(every)]}


def _values(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {name: t.detach().double().flatten().tolist() for name, t in tensors.items() if t.is_floating_point()}


def batchnorm_resume(out_dir: str, info: DistInfo) -> dict:
    """resnet10t with an EMA, APGD-1, on 3 batches of 8 fixed 32 px images per rank (each rank its own): one epoch
    straight; the same stopped after 1 step, checkpointed (BN statistics averaged over the ranks in the file) and
    resumed from the file on fresh states. Each rank's own BN statistics at the stop, the checkpoint's, and the
    weights, buffers and EMA at the end of both runs (the trainer averages the BN statistics at every epoch end:
    ``average_batchnorm``)."""
    x, y = fixed_images(48, 32)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(24 * info.rank, 24 * info.rank + 24, 8)]

    def fresh(init_seed: int) -> tuple[TrainState, AdversarialTask]:
        torch.manual_seed(init_seed)
        module = create_model("resnet10t", num_classes=10)
        model = DistributedDataParallel(module)  # rank 0's weights on every rank, then the EMA of them
        attack = create_attack("apgd", module, norm="Linf", eps=4 / 255, n_iter=1, seed=info.rank)
        state = TrainState(module, build_optimizer(module, "sgd", 0.05, 5e-4), attack,
                           ema=ModelEmaV3(module, decay=0.5), rank=info.rank, world_size=info.world_size,
                           local_bn=True)
        return state, AdversarialTask(model, attack, nn.CrossEntropyLoss())

    def epoch(state: TrainState, task: AdversarialTask, hooks: EpochHooks | None = None) -> None:
        train_one_epoch(task, batches, state, StepOptions(lr=lambda step: 0.05), hooks=hooks)

    def everything(state: TrainState) -> dict[str, list]:
        return _values({**{f"model.{k}": v for k, v in state.module.state_dict().items()},
                        **{f"ema.{k}": v for k, v in state.ema.module.state_dict().items()}})

    straight, task = fresh(0)
    epoch(straight, task)
    straight.average_batchnorm()
    stopped, task = fresh(0)
    epoch(stopped, task, stop_after_checks(1))
    own = _values(batchnorm_stats(stopped.module))
    folder = Path(out_dir, "batchnorm", "checkpoints")
    save_on_primary(stopped.state_dict(), folder, [], primary=info.is_primary)
    barrier()
    checkpoint = load_checkpoint_file(folder / "last.pt")
    resumed, task = fresh(1 + info.rank)
    resumed.load_state_dict(checkpoint)
    epoch(resumed, task)
    resumed.average_batchnorm()
    return {"stopped_at": [stopped.step, stopped.batches_done], "own": own,
            "checkpoint": _values({k: v for k, v in checkpoint["model"].items() if k in own}),
            "replicas_in_sync": checkpoint["replicas_in_sync"], "steps": [straight.step, resumed.step],
            "straight": everything(straight), "resumed": everything(resumed)}


def accumulation(info: DistInfo) -> dict[str, list]:
    """Two optimizer steps of 2 micro-batches of 8 per rank (grad_accum 2) under DDP, AdamW, APGD-2 Linf: rank r
    takes images 32·s + 16·r .. + 16 of step s of 64 fixed images. The weights after them."""
    module = layernorm_classifier()
    model = DistributedDataParallel(module)
    attack = create_attack("apgd", module, norm="Linf", eps=4 / 255, n_iter=2, seed=info.rank)
    state = TrainState(module, build_optimizer(module, "adamw", 0.0, 0.05), attack, rank=info.rank,
                       world_size=info.world_size)
    x, y = fixed_images(64)
    starts = [32 * s + 16 * info.rank + 8 * m for s in range(2) for m in range(2)]
    batches = [(x[i:i + 8], y[i:i + 8]) for i in starts]
    train_one_epoch(AdversarialTask(model, attack, nn.CrossEntropyLoss()), batches, state,
                    StepOptions(lr=lambda step: 1e-3 * (step + 1), grad_accum=2))
    return _values(module.state_dict())


def sync_batchnorm(info: DistInfo) -> dict[str, list] | None:
    """With a CUDA device per rank (torch's SyncBatchNorm has no CPU implementation): resnet10t built the trainer's
    way with ``--model.sync_bn 1``, one training-mode forward pass of rank r's half of 32 fixed images (TF32 off); its
    BN statistics. None without the devices."""
    if torch.cuda.device_count() < info.world_size:
        return None
    from rat.train.build import build_model, model_kwargs
    from rat.train.spec import TrainSpec, make_train_config

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    spec = TrainSpec.from_config(make_train_config(["--model.arch", "resnet10t", "--model.sync_bn", "1"]))
    torch.manual_seed(0)
    module, _ = build_model(spec.model, model_kwargs(spec.model, 10, 32), torch.device("cuda", info.rank),
                            distributed=True)
    x, _ = fixed_images(32, 32)
    module.train()(x[16 * info.rank:16 * info.rank + 16].to(f"cuda:{info.rank}"))
    return _values(batchnorm_stats(module))


def main(train_beton: str, index_beton: str, out_dir: str) -> None:
    info = init_distributed("cpu", "gloo")
    shards = read_shards(index_beton)
    torch.manual_seed(info.rank)  # different init on purpose: DDP must broadcast rank 0's weights
    module = create_model("convnext_micro_cvst", num_classes=10).to(memory_format=torch.channels_last)
    model = DistributedDataParallel(module)
    loader = build_train_loader(train_beton, batch_size=16, resolution=32, device=info.device, num_workers=1, seed=0,
                                distributed=True)
    loader.set_epoch(0)
    order = [int(i) for i in loader.epoch_order(0)]
    optimizer = build_optimizer(module, "adamw", 1e-3, 0.05)
    attack = create_attack("apgd", module, norm="Linf", eps=4 / 255, n_iter=2, seed=info.rank)
    state = TrainState(module, optimizer, attack, rank=info.rank, world_size=info.world_size)
    task = AdversarialTask(model, attack, nn.CrossEntropyLoss())
    result = train_one_epoch(task, loader, state, StepOptions(lr=lambda step: 1e-3, steps_per_epoch=3))
    checksums = {name: p.detach().double().sum().item() for name, p in module.named_parameters()}
    try:
        save_on_primary(state.state_dict(), Path(out_dir, "blocked", "checkpoints"), [], primary=info.is_primary)
        write_error = None
    except CheckpointWriteError as err:
        write_error = str(err)
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(
        {"order": order, "checksums": checksums, "steps": result.step, "batches_per_epoch": len(loader),
         "shards": shards, "write_error": write_error, "batchnorm": batchnorm_resume(out_dir, info),
         "accumulated": accumulation(info), "sync_batchnorm": sync_batchnorm(info)}))
    cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
