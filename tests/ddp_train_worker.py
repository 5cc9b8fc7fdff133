"""One rank of the 2-process DDP check in test_train_ddp.py (launched with torchrun; not a test module itself).

Trains a few steps of APGD adversarial training with rat's engine under real DDP (gloo) and writes, per rank, the
sample ids it read and a checksum of every parameter after training.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rat.attacks import create_attack
from rat.data import build_train_loader
from rat.models import create_model
from rat.train.distributed import cleanup_distributed, init_distributed
from rat.train.engine import StepOptions, train_one_epoch
from rat.train.optim import build_optimizer
from rat.train.state import TrainState
from rat.train.task import AdversarialTask


def main(train_beton: str, out_dir: str) -> None:
    info = init_distributed("cpu", "gloo")
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
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(
        {"order": order, "checksums": checksums, "steps": result.step, "batches_per_epoch": len(loader)}))
    cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
