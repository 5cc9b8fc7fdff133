"""torch.distributed set-up from torchrun's environment, and the few collectives the trainer needs."""
from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    A plain ``python -m rat.train`` (no WORLD_SIZE) runs as a single process without a process group. Each rank uses
    ``cuda:LOCAL_RANK`` when CUDA is available (or asked for) and the CPU otherwise; the backend defaults to nccl on
    GPU and gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("training.device=cuda but no CUDA device is visible: use --training.device cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(chosen, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=30),
                                device_id=torch_device if chosen == "nccl" else None)
        _logger.info("joined process group: backend=%s world_size=%d", chosen, world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op without a process group)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def env_rank() -> int:
    """This process's rank as torchrun sets it (``RANK``; 0 for a plain ``python -m rat.train``), readable before the
    process group exists."""
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_replicas_in_sync(module: torch.nn.Module, exclude: Collection[str] = ()) -> int:
    """Verify that every rank holds the same parameters and buffers (DDP replicas must never diverge), except the
    tensors named in ``exclude``.

    Compares a per-tensor float64 checksum across ranks; returns the number of ranks compared.

    Raises:
        RuntimeError: naming the first tensor whose value differs between ranks.
    """
    names, sums = [], []
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_floating_point() and name not in exclude:
            names.append(name)
            sums.append(tensor.detach().double().sum().item())
    checksums = gather_objects(sums)
    for rank, other in enumerate(checksums[1:], start=1):
        for name, a, b in zip(names, checksums[0], other):
            if a != b:
                raise RuntimeError(f"DDP replicas diverged: {name} differs between rank 0 and rank {rank}")
    return len(checksums)


def batchnorm_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm running statistics of ``module`` by name: the buffers named ``*running_mean``/``*running_var``
    (timm's ``distribute_bn`` rule), the only tensors that differ between DDP replicas by design when every rank
    normalizes its own batch."""
    return {name: buf for name, buf in module.named_buffers()
            if name.endswith(("running_mean", "running_var")) and buf.is_floating_point()}


def mean_over_ranks(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """New tensors: the mean of each of ``tensors`` over all ranks (copies without a process group).

    One all-reduce of all of them, flattened in float64 on ``device`` (where the backend can reduce: an EMA kept on the
    CPU is moved for it under nccl); every rank gets the same values, in each tensor's own dtype and device. This is
    timm's ``distribute_bn(reduce=True)``, which reduces in place, one collective per buffer, on the buffer's device.
    """
    if not tensors:
        return {}
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors.values()])
    world = dist.get_world_size() if dist.is_initialized() else 1
    flat = all_reduce_sum(flat) / world
    out, offset = {}, 0
    for name, t in tensors.items():
        out[name] = flat[offset:offset + t.numel()].view(t.shape).to(t.device, t.dtype)
        offset += t.numel()
    return out
