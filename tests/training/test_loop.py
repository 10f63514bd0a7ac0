"""The training loop (exact determinism, resuming from a rewind point, a sparsifier inside it, DDP equal to
gradient accumulation), evaluation on a hand-made model, and the atomic training report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.training import CubicSchedule, Sparsifier, SparsifierConfig
from prunekit.training.loop import (
    DistillConfig,
    TrainConfig,
    evaluate,
    global_batch_indices,
    lr_at,
    measure_sparsity,
    rank_slice,
    train,
)
from prunekit.training.report import history_entry, render_markdown, write_training_report

TINY = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=0, threads=1, log_every=2)  # 64 examples: 4 steps/epoch


def tiny_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 3, (n,), generator=g)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- pure pieces


def test_learning_rate_schedules_by_hand():
    onecycle = TrainConfig(lr=0.1, warmup=0.2)  # total 10: w = 2 warm-up steps, then 8 linear down to 0
    assert [round(lr_at(t, 10, onecycle), 12) for t in range(10)] == [
        0.05,
        0.1,
        0.1,
        0.0875,
        0.075,
        0.0625,
        0.05,
        0.0375,
        0.025,
        0.0125,
    ]
    cosine = TrainConfig(lr=0.1, warmup=0.2, lr_schedule="cosine")
    assert lr_at(4, 10, cosine) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(6, 10, cosine) == pytest.approx(0.05)
    assert lr_at(7, 10, TrainConfig(lr=0.1, warmup=0.0, lr_schedule="constant")) == 0.1


def test_batches_cover_each_epoch_once_are_seeded_and_split_over_ranks():
    epoch = torch.cat([global_batch_indices(t, 10, 3, seed=5) for t in range(3)])  # 10 // 3 = 3 steps, 1 dropped
    assert epoch.numel() == 9 and len(set(epoch.tolist())) == 9
    assert torch.equal(global_batch_indices(4, 10, 3, seed=5), global_batch_indices(4, 10, 3, seed=5))
    assert not torch.equal(torch.cat([global_batch_indices(t, 10, 3, seed=5) for t in range(3, 6)]), epoch)
    batch = torch.arange(8)
    assert torch.equal(torch.cat([batch[rank_slice(8, r, 2)] for r in range(2)]), batch)
    with pytest.raises(ConfigError):
        rank_slice(7, 0, 2)


def test_evaluate_on_a_hand_made_model():
    # Logits are the two "pixels" themselves (mean 0, std 1: normalisation is the identity on float images).
    images = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 2.0], [7.0, 6.0]]).view(5, 2, 1, 1)
    labels = torch.tensor([0, 1, 1, 0, 0])  # predictions 0, 1, 0, 1, 0: three of five right
    model = nn.Flatten().train()
    accuracy = evaluate(model, (images, labels), batch_size=2, mean=(0.0, 0.0), std=(1.0, 1.0))
    assert accuracy == 3 / 5
    assert model.training  # the flag is restored


# -------------------------------------------------------------------------------------------------- training


def test_training_is_bit_for_bit_deterministic_given_the_seed():
    data = tiny_data()
    runs = []
    for _ in range(2):
        model = tiny_net()
        history = train(model, data, data, TINY, progress=False)
        runs.append((model, history))
    (m1, h1), (m2, h2) = runs
    assert states_equal(m1, m2)
    assert [r.loss for r in h1.records] == [r.loss for r in h2.records]
    assert h1.final_accuracy == h2.final_accuracy and h1.end_step == 8
    assert [r.step for r in h1.records] == [0, 2, 4, 6, 8] and h1.records[0].loss is None
    other = tiny_net()
    train(other, data, None, TrainConfig(**{**TINY.__dict__, "seed": 1}), progress=False)
    assert not states_equal(other, m1)  # the seed does change the data order and augmentation


def test_training_from_a_rewind_point_replays_the_uninterrupted_run():
    # Without momentum the optimizer has no state, so restarting at step k from the step-k weights (same learning
    # rate schedule, same batches and augmentation) must end exactly where the uninterrupted run ended.
    config = TrainConfig(**{**TINY.__dict__, "momentum": 0.0, "nesterov": False})
    data = tiny_data()
    full = tiny_net()
    seen = []
    history = train(full, data, None, config, rewind_step=3, on_step=lambda s, m: seen.append(s), progress=False)
    assert seen == list(range(1, 9)) and history.rewind_state is not None
    resumed = tiny_net(seed=1)
    resumed.load_state_dict(history.rewind_state)
    again = train(resumed, data, None, config, start_step=3, progress=False)
    assert again.start_step == 3 and again.records[0].step == 3
    assert states_equal(resumed, full)


def test_a_sparsifier_in_the_loop_ends_at_the_scheduled_sparsity():
    data = tiny_data()
    model = tiny_net()
    schedule = CubicSchedule(final_sparsity=0.75, start_step=1, end_step=5, frequency=2)
    sparsifier = Sparsifier(model, SparsifierConfig(schedule=schedule, exclude=(r"^8\.",)))  # the classifier stays
    history = train(model, data, data, TINY, sparsifier=sparsifier, progress=False)
    assert history.targets == ("0.weight", "3.weight")
    assert history.final_sparsity == measure_sparsity(model, ["0.weight", "3.weight"]) == 0.75  # 216 + 576 weights
    sparsities = [r.sparsity for r in history.records]
    assert sparsities == sorted(sparsities) and sparsities[0] == 0.0
    # Cubic from 0 at step 1 (the schedule's t0 keeps s_i = 0) to 0.75 at step 5, updates every 2 steps: the two
    # mask changes (steps 3 and 5, odd, so not on the log_every = 2 grid) are logged where they happen.
    by_step = {r.step: r.sparsity for r in history.records}
    assert by_step[2] == 0.0 and 0.0 < by_step[3] < 0.75 and by_step[5] == 0.75
    assert all(r.pqi is not None and 0.0 <= r.pqi <= 1.0 for r in history.records)
    assert history.records[-1].accuracy == history.final_accuracy


def test_distillation_and_bad_settings():
    data = tiny_data()
    teacher = tiny_net(seed=3)
    history = train(tiny_net(), data, None, TINY, teacher=teacher, distill=DistillConfig(0.5, 2.0), progress=False)
    assert all(math.isfinite(r.loss) for r in history.records[1:])
    with pytest.raises(ConfigError, match="distill"):
        train(tiny_net(), data, None, TINY, teacher=teacher, progress=False)
    with pytest.raises(ConfigError, match="micro-batches"):
        train(tiny_net(), data, None, TrainConfig(batch_size=15, accumulation_steps=2), progress=False)
    with pytest.raises(ConfigError):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError):
        TrainConfig(lr_schedule="step")


# ------------------------------------------------------------------------------------------- DDP = accumulation

DDP_CONFIG = TrainConfig(steps=6, batch_size=16, lr=0.05, seed=0, threads=1, log_every=3)


def _sparsifier(model: nn.Module) -> Sparsifier:
    schedule = CubicSchedule(final_sparsity=0.8, start_step=1, end_step=5, frequency=2)
    return Sparsifier(model, SparsifierConfig(schedule=schedule))


def _ddp_worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        model = tiny_net()
        sparsifier = _sparsifier(model)
        train(model, tiny_data(), None, DDP_CONFIG, sparsifier=sparsifier, progress=False)
        masks = {name: mask.keep for name, mask in sparsifier.masks.items()}
        torch.save({"masks": masks, "state": model.state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ddp_ranks_equal_one_process_accumulating_the_same_two_half_batches(tmp_path: Path):
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = tiny_net()
    sparsifier = _sparsifier(single)
    config = TrainConfig(**{**DDP_CONFIG.__dict__, "accumulation_steps": 2})
    train(single, tiny_data(), None, config, sparsifier=sparsifier, progress=False)
    state = single.state_dict()
    for name, mask in sparsifier.masks.items():
        assert 0.0 < float(mask.keep.float().mean()) < 1.0
        for r in ranks:
            assert torch.equal(r["masks"][name], mask.keep), name
    for name, param in single.named_parameters():  # the very same bits, not just close
        for r in ranks:
            assert torch.equal(r["state"][name], param.detach()), name
    assert not torch.equal(ranks[0]["state"]["1.running_mean"], state["1.running_mean"])  # see the module docstring


# ---------------------------------------------------------------------------------------------------- report


def test_report_writes_json_markdown_and_png_atomically(tmp_path: Path, monkeypatch):
    data = tiny_data()
    history = train(tiny_net(), data, data, TINY, progress=False)
    report = {
        "title": "tiny",
        "budget": {"epochs": 2},
        "experiments": {"dense": history_entry(history, note="hand"), "copy": history_entry(history)},
        "floors": [{"floor": "x", "result": "y", "met": True}],
    }
    paths = [tmp_path / "out" / name for name in ("r.json", "r.md", "r.png")]
    write_training_report(report, paths[0], markdown_path=paths[1], plot_path=paths[2])
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(report))
    assert "| dense |" in paths[1].read_text() and "| yes |" in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["r.json", "r.md", "r.png"]  # no temporary files
    assert render_markdown(report).count("\n| ") == 5  # two headers, two experiments, one floor

    before = paths[2].read_bytes()
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_training_report({**report, "title": "again"}, paths[0], markdown_path=paths[1], plot_path=paths[2])
    assert paths[2].read_bytes() == before  # the previous figure is intact
    assert json.loads(paths[0].read_text())["title"] == "tiny"
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["r.json", "r.md", "r.png"]
