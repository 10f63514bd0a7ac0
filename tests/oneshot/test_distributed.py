"""One-shot pruning on two CPU ranks (gloo, spawned here) against one process: the same masks, the same
weights to float rounding, every rank ending with the same model; ranks started differently are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import prunekit
from models import VOCAB, tiny_model

WORLD = 2
#: The ranks sum their statistics in another order than one process does; in float32 that moves SparseGPT's
#: weights by up to ~1e-4 relative on these layers (the masks stay the same), so its Hessians are accumulated in
#: float64 here, where what is left is float32 rounding.
CONFIGS = {
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt-50-refit": {"method": "sparsegpt", "sparsity": 0.5, "refit_steps": 4, "hessian_dtype": "float64"},
    "sparsegpt-2of4": {"method": "sparsegpt", "pattern": "2:4", "hessian_dtype": "float64"},
    # dense statistics within a block: the ranks solve their layers of a block at once, weights in flight
    "sparsegpt-50-block": {"method": "sparsegpt", "sparsity": 0.5, "hessian_dtype": "float64", "propagation": "block"},
}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(0))


def _prune_everything(family: str) -> dict[str, dict[str, torch.Tensor]]:
    model = tiny_model(family)
    out = {}
    for name, keys in CONFIGS.items():
        result = prunekit.prune(model, prunekit.PruneConfig(**keys), calibration(), progress=False)
        out[name] = {k: v.clone() for k, v in result.model.state_dict().items()}
        out[name]["__layers__"] = torch.tensor([len(result.layers), len(result.ranks)])
    return out


def _worker(rank: int, folder: str, family: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save(_prune_everything(family), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_two_ranks_prune_as_one_process_does(tmp_path: Path, family: str) -> None:
    mp.spawn(_worker, args=(str(tmp_path), family), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    alone = _prune_everything(family)
    for name in CONFIGS:
        layers, ranks_recorded = ranks[0][name].pop("__layers__").tolist()
        assert ranks_recorded == WORLD and layers == alone[name].pop("__layers__")[0]  # every layer reported once
        ranks[1][name].pop("__layers__")
        for key, value in alone[name].items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)  # ranks agree exactly
            assert torch.equal(ranks[0][name][key] == 0, value == 0), (name, key)  # the same masks
            scale = value.abs().max().clamp_min(1e-12)
            assert float((ranks[0][name][key] - value).abs().max() / scale) < 1e-6, (name, key)


def _mismatched_worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        config = prunekit.PruneConfig(method="wanda", sparsity=0.5 if rank == 0 else 0.6)
        prunekit.prune(tiny_model("llama"), config, calibration(), progress=False)
    except prunekit.core.errors.PrunekitError as exc:
        Path(f"{folder}/error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def test_ranks_started_with_different_settings_are_refused_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(_mismatched_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        message = (tmp_path / f"error{rank}.txt").read_text()
        assert message.startswith("DistributedError: the ranks were started with different settings"), message


def test_distributed_without_torchrun_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.cli import main

    assert main(["-q", "prune", "--method", "magnitude", "--distributed", "--out", str(tmp_path / "out")]) == 2
    assert "--distributed runs under torchrun" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_torchrun_two_ranks_write_what_one_process_writes(tmp_path: Path) -> None:
    # the whole command under torchrun (gloo on this CPU): rank 0 writes the checkpoint and its report
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from models import sample_text, save_tiny_checkpoint

    source = save_tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(sample_text())
    flags = ["--method", "sparsegpt", "--sparsity", "0.5", "--hessian-dtype", "float64"]
    flags += ["--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = [*torchrun, "-m", "prunekit", "-q", "prune", str(source), *flags, "--out", str(tmp_path / "two")]
    done = subprocess.run([*two, "--distributed"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = [sys.executable, "-m", "prunekit", "-q", "prune", str(source), *flags, "--out", str(tmp_path / "one")]
    assert subprocess.run(one, env=env, capture_output=True, timeout=300).returncode == 0
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("two", "one"))
    for key, value in b.items():
        assert torch.equal(a[key] == 0, value == 0), key
        assert float((a[key] - value).abs().max()) <= 1e-6 * float(value.abs().max().clamp_min(1e-12)), key
    report = json.loads((tmp_path / "two" / "prunekit-report" / "report.json").read_text())
    assert [r["windows"] for r in report["ranks"]] == [2, 2] and report["calibration"]["windows"] == 4
    assert sum(r["layers_solved"] for r in report["ranks"]) == report["summary"]["layers"]


def _dying_worker(rank: int, folder: str) -> None:
    import datetime
    import os

    from prunekit.methods import ScoreMethod, register_method, unregister_method
    from prunekit.oneshot.config import Recipe

    torch.set_num_threads(1)
    init = f"file://{folder}/rendezvous"
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )

    @register_method
    class DiesOnRankOne(ScoreMethod):  # magnitude, except that rank 1 dies at the first layer it solves
        name = "dies-on-rank-one"
        summary = "test only"
        needs_activations = True

        def scores(self, weight: torch.Tensor, stats: object) -> torch.Tensor:
            if rank == 1:
                os._exit(1)
            return weight.abs().float()

    try:
        (Path(folder) / "calib.txt").write_text("hello world, " * 400)
        recipe = Recipe.from_dict(
            {
                "model": {"source": f"{folder}/tiny"},
                "prune": {"method": "dies-on-rank-one", "sparsity": 0.5},
                "calibration": {"path": f"{folder}/calib.txt", "nsamples": 4, "seqlen": 16},
                "output": {"dir": f"{folder}/out"},
            }
        )
        from prunekit.oneshot.job import run_recipe

        run_recipe(recipe, progress=False)
    except prunekit.core.errors.PrunekitError as exc:
        Path(f"{folder}/error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        unregister_method("dies-on-rank-one")


def test_a_rank_that_dies_stops_the_others_and_nothing_is_written(tmp_path: Path) -> None:
    from models import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "tiny")
    context = mp.get_context("spawn")
    ranks = [context.Process(target=_dying_worker, args=(r, str(tmp_path))) for r in range(WORLD)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=240)
    assert [p.exitcode for p in ranks][1] == 1
    message = (tmp_path / "error0.txt").read_text()
    assert message.startswith("DistributedError: rank 0 of 2: another rank stopped"), message
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
