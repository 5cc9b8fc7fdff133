"""Two real gloo ranks on 127.0.0.1: train shards are disjoint, cover the data, reshuffle per epoch; val too."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ffcv")

pytestmark = [pytest.mark.ffcv, pytest.mark.timeout(420)]

N = 50  # even: DistributedSampler pads nothing, so the two train shards are exactly disjoint
WORLD = 2
SEED = 11


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, port: int, beton: str, out_dir: str) -> None:
    import torch.distributed as dist

    from rat.data import build_train_loader, build_val_loader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        train = build_train_loader(beton, batch_size=8, resolution=16, device="cpu", num_workers=1, seed=SEED,
                                   distributed=True, drop_last=False)
        epochs = {}
        for epoch in (0, 1, 0):  # epoch 0 twice: the order is a function of (seed, epoch)
            train.set_epoch(epoch)
            epochs.setdefault(str(epoch), []).append([int(v) for _, y in train for v in y])
        val = build_val_loader(beton, batch_size=8, resolution=16, device="cpu", num_workers=1, distributed=True,
                               indices=np.arange(3, N))
        every = build_val_loader(beton, batch_size=8, resolution=16, device="cpu", num_workers=1, distributed=True)
        result = {"train": epochs, "train_len": len(train), "val": [int(v) for _, y in val for v in y],
                  "val_all": [int(v) for _, y in every for v in y], "val_len": [len(val), len(every)]}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_rank_sharding(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from rat.data import write_arrays_beton
    from rat.data.demo import load_demo_arrays

    images, _ = load_demo_arrays("val")
    beton = write_arrays_beton(images[:N], np.arange(N), tmp_path / "idx.beton", classes=[str(i) for i in range(N)],
                               write_mode="raw", num_workers=1)
    mp.start_processes(_rank_main, args=(_free_port(), str(beton), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    for epoch in ("0", "1"):
        shards = [r["train"][epoch][0] for r in ranks]
        assert len(shards[0]) == len(shards[1]) == N // WORLD
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: ranks share samples"
        assert sorted(shards[0] + shards[1]) == list(range(N)), f"epoch {epoch}: shards do not cover the data"
    for r in ranks:
        assert r["train"]["0"][0] == r["train"]["0"][1]  # set_epoch(0) again: same order
        assert r["train"]["0"][0] != r["train"]["1"][0]  # a new epoch reshuffles
        assert sorted(r["train"]["0"][0]) != sorted(r["train"]["1"][0])  # ... across ranks, not just within
        assert r["train_len"] == -(-(N // WORLD) // 8)
    # Val: each rank evaluates its own contiguous run of the given indices (or of all samples), in order, disjoint,
    # complete (no padding), sizes within one.
    assert ranks[0]["val"] + ranks[1]["val"] == list(range(3, N))
    assert abs(len(ranks[0]["val"]) - len(ranks[1]["val"])) <= 1
    assert ranks[0]["val_all"] + ranks[1]["val_all"] == list(range(N))
    assert len(ranks[0]["val_all"]) == len(ranks[1]["val_all"]) == N // WORLD
    assert [r["val_len"] for r in ranks] == [[3, 4], [3, 4]]  # ceil(24 / 8), ceil(23 / 8); ceil(25 / 8) each
