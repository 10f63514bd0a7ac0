"""Two CPU ranks (gloo) with different data end with bit-identical masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 8


def _worker(rank: int, folder: str) -> None:
    from prunekit.training import CubicSchedule, Sparsifier, SparsifierConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks, as DDP would broadcast
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        schedule = CubicSchedule(initial_sparsity=0.0, final_sparsity=0.75, start_step=2, end_step=6, frequency=2)
        config = SparsifierConfig(schedule=schedule, method="granet", distribution="global", regrow_end_step=10)
        sparsifier = Sparsifier(model, config, optimizer)
        for step in range(STEPS):
            g = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own data; no DDP wrapper, so
            x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)  # the weights drift apart
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            sparsifier.step()
        masks = {name: mask.keep for name, mask in sparsifier.masks.items()}
        torch.save({"masks": masks, "weights": model.state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_masks_are_identical_on_every_rank(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert list(r0["masks"]) == ["0.weight", "2.weight"]
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    total = sum(m.numel() for m in r0["masks"].values())
    assert sum(int(m.sum()) for m in r0["masks"].values()) == total - int(0.75 * total)
    assert not torch.equal(r0["weights"]["0.weight"], r1["weights"]["0.weight"])  # the ranks did see different data
