"""One rank of the 2-process checks in test_train_ddp.py (launched with torchrun; not a test module itself).

Reads a beton whose labels are the sample indices through the distributed train and val loaders (train over epochs 0,
1 and 0 again; val over a subset and over everything), then trains a few steps of APGD adversarial training with rat's
engine under real DDP (gloo). Writes, per rank, the indices each loader gave, the sample ids training read and a
checksum of every parameter after training. Last, a checkpoint write that fails on rank 0 (its folder lies under a
file): what each rank saw.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rat.attacks import create_attack
from rat.data import build_train_loader, build_val_loader, read_beton_info
from rat.models import create_model
from rat.train.checkpoint import CheckpointWriteError, save_on_primary
from rat.train.distributed import cleanup_distributed, init_distributed
from rat.train.engine import StepOptions, train_one_epoch
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
         "shards": shards, "write_error": write_error}))
    cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
