"""Benchmark: pruning during training, ResNet-20 on the shared CIFAR-10 JPEG copy, CPU (issue 6).

    .venv/bin/python bench/bench_training.py                    # the full run: see --epochs (~90 min on 2 cores)
    .venv/bin/python bench/bench_training.py --only gmp90 ddp   # some experiments (dense is reused from its cache)
    .venv/bin/python bench/bench_training.py --train-subset 512 --test-subset 500 --epochs 0.25 \\
        --ddp-steps 4 --out /tmp/smoke/training.json            # a smoke test of the plumbing

Experiments run one after the other **in this process** (the DDP one spawns two more); every training run uses
:func:`prunekit.training.loop.train` with the same settings: SGD, global batch 128, Nesterov momentum 0.9,
weight decay 5e-4, one-cycle learning rate peaking at 0.1 after 20% of the steps, pad-4 crop + flip, the same
seed for the initial weights, the data order and the augmentation. Each run is ``--epochs`` E epochs long.

* ``dense``: E epochs. Its weights after ``k = round(--rewind-fraction x steps)`` steps are the IMP rewind point,
  and its trained weights are IMP's first round and what ``structured50`` prunes (kept in ``bench/work/``).
* ``gmp90``: gradual magnitude pruning (Zhu & Gupta 2017) to 90%, cubic schedule from 5% to about
  ``--prune-end`` (75%) of the steps, updated every ``steps/40`` steps, the same sparsity in every pruned layer.
* ``gmp90_erk``: ``gmp90`` with the Erdos-Renyi-Kernel allocation (Evci et al. 2020) in place of the uniform one:
  the same schedule and total sparsity, small layers kept denser than large ones (reported beside ``gmp90``).
* ``gmp90_kd``: ``gmp90`` with Hinton et al. 2015's distillation loss from the dense run as teacher (alpha 0.9,
  temperature 4): a recovery method, shown beside the floor, not in place of it.
* ``global_mp90``: the same schedule, one magnitude threshold over all pruned layers (Global MP), per-layer
  density floor ``min_density = 0.05``.
* ``granet90``: GraNet (Liu et al. 2021) dense-to-sparse on the same schedule: global magnitude pruning (floor
  0.05), then at each update drop a cosine-decayed fraction (0.5 at the start, to 0 at the schedule's end) of
  each layer's smallest weights and regrow as many by gradient magnitude.
* ``imp``: lottery ticket with rewinding (Frankle et al. 2020): prune 20% of the remaining weights globally by
  magnitude, rewind the survivors (and batch-norm buffers) to step k and the learning-rate schedule to step k,
  train steps k..T, five times (0.8^5 = 32.8% remain). ``imp_reinit``: the final masks on a fresh draw of the
  model's own initialisation (Kaiming normal), trained all T steps (Frankle & Carbin 2019's control).
* ``structured50``: the dense model with 50% of the channels of every prunable space physically removed
  (``prune_structurally(model, (x,), 0.5)``: L2 magnitude, uniform), fine-tuned ``--finetune-epochs`` F epochs
  (one-cycle peaking at ``--finetune-lr``). ``scratch50``: the same pruned architecture freshly initialised
  (Kaiming normal, as the dense model) and trained E + F epochs at the dense settings: as many steps as the
  structured model received in all (dense training + fine-tuning), Liu et al. 2019's "Scratch-E".
* ``ddp``: GMP to 90% for ``--ddp-steps`` steps on a ``--ddp-subset`` subset, global batch ``--ddp-batch``,
  with 2 processes (gloo, one thread each, each rank half of every global batch) against 1 process
  accumulating the same two half-batches (one thread): masks and weights are compared.

Pruned layers (every unstructured method, IMP included): every convolution of the residual blocks (their 1x1
projection shortcuts included); the first convolution (432 weights, 3 input channels) and the classifier
(640 weights) stay dense, as is common (Gale et al. 2019). "sparsity" is measured from the weights: the
fraction of exact zeros among the pruned layers' weights ("all_weights_sparsity": among every conv and linear
weight). For the structured runs, "sparsity" is the fraction of parameters removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "training_cifar10.json"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
WORK = HERE / "work"
EXPERIMENTS = (
    "dense",
    "gmp90",
    "gmp90_erk",
    "gmp90_kd",
    "global_mp90",
    "granet90",
    "imp",
    "structured50",
    "scratch50",
    "ddp",
)
DISTILL = {"alpha": 0.9, "temperature": 4.0}  # Hinton et al. 2015's loss; the usual CIFAR setting
EXCLUDE = (r"^conv\.weight$", r"^fc\.weight$")  # the stem conv and the classifier stay dense
MIN_DENSITY = 0.05

log = logging.getLogger("bench_training")


# ---------------------------------------------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3.0, help="epochs of every training run (E)")
    parser.add_argument("--finetune-epochs", type=float, default=1.0, help="fine-tuning of structured50 (F)")
    parser.add_argument("--finetune-lr", type=float, default=0.02, help="peak learning rate of the fine-tuning")
    parser.add_argument("--train-subset", type=int, default=0, help="train on N examples (0: all 50,000)")
    parser.add_argument("--test-subset", type=int, default=0, help="test on N examples (0: all 10,000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prune-end", type=float, default=0.75, help="gradual pruning ends at this fraction of the steps"
    )
    parser.add_argument("--rewind-fraction", type=float, default=0.05, help="IMP rewind step k as a fraction of T")
    parser.add_argument("--ddp-steps", type=int, default=200)
    parser.add_argument("--ddp-batch", type=int, default=64, help="global batch of the DDP check (2 halves)")
    parser.add_argument("--ddp-subset", type=int, default=4096, help="training examples of the DDP check")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, metavar="NAME", help=" ".join(EXPERIMENTS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON path; .png and .md are written beside it")
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--work", type=Path, default=WORK, help="extraction, decoded-image cache, dense weights")
    args = parser.parse_args(argv)
    if args.epochs <= 0 or args.finetune_epochs <= 0 or not 0 <= args.rewind_fraction < 1:
        parser.error("--epochs and --finetune-epochs must be > 0 and --rewind-fraction in [0, 1)")
    return args


def load_data(args: argparse.Namespace) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from prunekit.training.cifar import load_cifar10

    train, test = load_cifar10(args.archive, args.work / "cifar10", cache_dir=args.work / "cifar10-cache")

    def subset(images: torch.Tensor, labels: torch.Tensor, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n <= 0 or n >= labels.shape[0]:
            return images, labels
        index = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(stream))[:n].sort().values
        return images[index], labels[index]

    train_pair = subset(train.images, train.labels, args.train_subset, 1)
    return train_pair, subset(test.images, test.labels, args.test_subset, 2)


def new_resnet20(seed: int) -> nn.Module:
    """ResNet-20 (He et al. 2016, option-B shortcuts as in open_lth) initialised under ``seed``."""
    from prunekit.training.cifar.models import resnet20

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return resnet20()


def target_names(model: nn.Module) -> list[str]:
    from prunekit.training.sparsifier import select_parameters

    return [p.name for p in select_parameters(model, exclude=EXCLUDE)]


def all_weight_names(model: nn.Module) -> list[str]:
    from prunekit.training.sparsifier import select_parameters

    return [p.name for p in select_parameters(model)]


def gradual_schedule(total: int, final: float = 0.9, start: float = 0.05, end: float = 0.75) -> Any:
    """Cubic schedule (Zhu & Gupta 2017) 0 -> ``final`` from ``start`` to about ``end`` of ``total`` steps, with
    about 40 updates (the end is rounded to a whole number of updates)."""
    from prunekit.training import CubicSchedule

    frequency = max(1, round(total / 40))
    first = round(start * total)
    updates = max(1, round((end * total - first) / frequency))
    return CubicSchedule(
        final_sparsity=final, start_step=first, end_step=first + updates * frequency, frequency=frequency
    )


def train_config(args: argparse.Namespace, epochs: float, **overrides: Any) -> Any:
    from prunekit.training.loop import TrainConfig, steps_per_epoch

    per_epoch = steps_per_epoch(args.n_train, 128)
    base = {
        "epochs": epochs,
        "batch_size": 128,
        "lr": 0.1,
        "seed": args.seed,
        "threads": args.threads,
        "log_every": 10,
        "eval_every": max(1, per_epoch // 2),
        "eval_samples": min(2000, args.n_test),
    }
    base.update(overrides)
    return TrainConfig(**base)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    model.train(was)
    return counter.get_total_flops() // 2


def sparse_extras(model: nn.Module, epochs: float) -> dict[str, Any]:
    from prunekit.training.loop import measure_sparsity

    names = target_names(model)
    return {
        "epochs": epochs,
        "sparsity": measure_sparsity(model, names),
        "all_weights_sparsity": measure_sparsity(model, all_weight_names(model)),
        "pruned_weights": sum(model.get_parameter(n).numel() for n in names),
    }


# -------------------------------------------------------------------------------------------------- runners


class Bench:
    """Holds the data and the dense run (which IMP and the structured runs start from)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from prunekit.training.loop import steps_per_epoch, total_steps

        self.args = args
        self.train_set, self.test_set = load_data(args)
        args.n_train, args.n_test = int(self.train_set[1].shape[0]), int(self.test_set[1].shape[0])
        self.steps_per_epoch = steps_per_epoch(args.n_train, 128)
        self.total = total_steps(train_config(args, args.epochs), args.n_train)
        self.rewind_step = round(args.rewind_fraction * self.total)
        self._dense: dict[str, Any] | None = None
        self.trained_dense = False  # set when dense() trained (not read back) the dense run

    def budget(self) -> dict[str, Any]:
        a = self.args
        return {
            "epochs_per_run": a.epochs,
            "finetune_epochs": a.finetune_epochs,
            "train_examples": a.n_train,
            "test_examples": a.n_test,
            "batch_size": 128,
            "steps_per_epoch": self.steps_per_epoch,
            "steps_per_run": self.total,
            "imp_rewind_step": self.rewind_step,
            "threads": a.threads,
            "optimizer": "SGD nesterov momentum 0.9, weight decay 5e-4, one-cycle lr 0.1 (warm-up 20%)",
            "finetune_lr": a.finetune_lr,
            "seed": a.seed,
            "ddp": {"steps": a.ddp_steps, "global_batch": a.ddp_batch, "train_examples": min(a.ddp_subset, a.n_train)},
        }

    def _train(self, model: nn.Module, name: str, config: Any, **kwargs: Any) -> Any:
        from prunekit.training.loop import train

        return train(model, self.train_set, self.test_set, config, desc=name, **kwargs)

    # -- dense (cached) ------------------------------------------------------------------------------------

    def _dense_key(self) -> str:
        a = self.args
        settings = [a.epochs, a.n_train, a.n_test, a.train_subset, a.test_subset, a.seed, a.threads, self.rewind_step]
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]

    def dense(self) -> dict[str, Any]:
        """Train (or read back) the dense run: {"entry", "final", "rewind"}."""
        if self._dense is not None:
            return self._dense
        path = self.args.work / "training_cifar10" / f"dense-{self._dense_key()}.pt"
        if path.is_file():
            log.info("reusing the dense run from %s", path)
            self._dense = torch.load(path, weights_only=True)
            return self._dense
        from prunekit.training.report import history_entry

        model = new_resnet20(self.args.seed)
        history = self._train(
            model,
            "dense",
            train_config(self.args, self.args.epochs),
            targets=target_names(model),
            rewind_step=self.rewind_step,
        )
        entry = history_entry(history, **sparse_extras(model, self.args.epochs))
        self._dense = {"entry": entry, "final": model.state_dict(), "rewind": history.rewind_state}
        self.trained_dense = True
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self._dense, tmp)
        tmp.replace(path)
        return self._dense

    def dense_model(self) -> nn.Module:
        model = new_resnet20(self.args.seed)
        model.load_state_dict(self.dense()["final"])
        return model

    # -- gradual pruning -----------------------------------------------------------------------------------

    def sparse(self, name: str, *, distill: bool = False, **config: Any) -> dict[str, Any]:
        from prunekit.training import DistillConfig, Sparsifier, SparsifierConfig
        from prunekit.training.report import history_entry

        model = new_resnet20(self.args.seed)
        schedule = gradual_schedule(self.total, end=self.args.prune_end)
        sparsifier = Sparsifier(model, SparsifierConfig(schedule=schedule, exclude=EXCLUDE, **config))
        teacher = {"teacher": self.dense_model().eval(), "distill": DistillConfig(**DISTILL)} if distill else {}
        history = self._train(model, name, train_config(self.args, self.args.epochs), sparsifier=sparsifier, **teacher)
        sparsifier.remove()
        extras = sparse_extras(model, self.args.epochs)
        extras["schedule"] = {
            "start_step": schedule.start_step,
            "end_step": schedule.end_step,
            "frequency": schedule.frequency,
            "final_sparsity": schedule.final_sparsity,
        }
        extras["config"] = {k: v for k, v in sparsifier.config.describe().items() if k != "schedule"}
        if distill:
            extras["distill"] = {**DISTILL, "teacher": "the dense run"}
        return history_entry(history, **extras)

    # -- lottery ticket --------------------------------------------------------------------------------------

    def imp(self) -> dict[str, dict[str, Any]]:
        from prunekit.training import LotteryConfig, LotteryTicket
        from prunekit.training.lottery import apply_masks_
        from prunekit.training.report import history_entry

        dense = self.dense()
        model = new_resnet20(self.args.seed)
        model.load_state_dict(dense["rewind"])
        ticket = LotteryTicket(model, LotteryConfig(rate=0.2, target_density=0.8**5, scope="global", exclude=EXCLUDE))
        ticket.capture()  # the rewind point: step k of the dense run
        model.load_state_dict(dense["final"])  # round 0 = the dense run
        config = train_config(self.args, self.args.epochs)
        rounds, history = [], None
        started = time.perf_counter()
        while not ticket.done:
            density = ticket.prune_round()
            ticket.rewind()
            history = self._train(
                model,
                f"imp round {ticket.rounds}",
                config,
                targets=target_names(model),
                start_step=self.rewind_step,
                on_step=lambda _step, _model: ticket.apply_masks(),
            )
            rounds.append(
                {
                    "round": ticket.rounds,
                    "density": density,
                    "sparsity": sparse_extras(model, self.args.epochs)["sparsity"],
                    "accuracy": history.final_accuracy,
                    "steps": history.end_step - history.start_step,
                    "seconds": history.seconds,
                    "history": history_entry(history)["history"],
                }
            )
            print(f"  imp round {ticket.rounds}: density {density:.4f} accuracy {history.final_accuracy}", flush=True)
        assert history is not None
        imp = history_entry(
            history,
            **sparse_extras(model, self.args.epochs),
            rounds=rounds,
            rewind_step=self.rewind_step,
            note=f"{len(rounds)} rounds of 20%, rewind to step {self.rewind_step}; steps and plot: the last round",
        )
        imp["seconds"] = time.perf_counter() - started
        imp["round0_accuracy"] = dense["entry"]["accuracy"]

        masks = {name: mask.keep for name, mask in ticket.masks.items()}
        control = new_resnet20(self.args.seed + 1)  # a fresh draw of the model's own initialisation
        apply_masks_(control, masks)
        reinit_history = self._train(
            control,
            "imp_reinit",
            config,
            targets=target_names(control),
            on_step=lambda _step, m: apply_masks_(m, masks),
        )
        reinit = history_entry(
            reinit_history, **sparse_extras(control, self.args.epochs), note="IMP's final masks, fresh init, T steps"
        )
        return {"imp": imp, "imp_reinit": reinit}

    # -- structural --------------------------------------------------------------------------------------------

    def pruned_architecture(self) -> tuple[nn.Module, nn.Module]:
        from prunekit.structured import prune_structurally

        dense = self.dense_model().eval()
        pruned = prune_structurally(dense, (torch.zeros(1, 3, 32, 32),), 0.5).model
        return dense, pruned

    def structured(self) -> dict[str, Any]:
        from prunekit.training.loop import evaluate
        from prunekit.training.report import history_entry

        dense, pruned = self.pruned_architecture()
        before = evaluate(pruned, self.test_set)
        config = train_config(self.args, self.args.finetune_epochs, lr=self.args.finetune_lr)
        history = self._train(pruned, "structured50", config)
        params, pruned_params = count_params(dense), count_params(pruned)
        return history_entry(
            history,
            epochs=self.args.finetune_epochs,
            sparsity=1 - pruned_params / params,
            params=pruned_params,
            dense_params=params,
            macs=count_macs(pruned),
            dense_macs=count_macs(dense),
            accuracy_before_finetune=before,
            dense_accuracy=self.dense()["entry"]["accuracy"],
            note=f"50% channels removed from the dense run, fine-tuned {self.args.finetune_epochs:g} epochs",
        )

    def scratch(self) -> dict[str, Any]:
        from prunekit.training.cifar.models import init_weights
        from prunekit.training.lottery import scratch_init
        from prunekit.training.report import history_entry

        dense, pruned = self.pruned_architecture()
        model = scratch_init(pruned, self.args.seed + 2, init=init_weights)
        epochs = self.args.epochs + self.args.finetune_epochs
        history = self._train(model, "scratch50", train_config(self.args, epochs))
        return history_entry(
            history,
            epochs=epochs,
            sparsity=1 - count_params(model) / count_params(dense),
            params=count_params(model),
            note=f"structured50's architecture from scratch, {epochs:g} epochs (dense + fine-tune steps)",
        )

    # -- DDP -----------------------------------------------------------------------------------------------------

    def ddp(self) -> dict[str, Any]:
        from prunekit.training.loop import evaluate, state_difference

        a = self.args
        n = min(a.ddp_subset, a.n_train)
        # a seeded random subset: the folder order is by class, so the first n examples would all be airplanes
        index = torch.randperm(self.train_set[1].shape[0], generator=torch.Generator().manual_seed(3))[:n].sort().values
        data = (self.train_set[0][index].clone(), self.train_set[1][index].clone())
        with tempfile.TemporaryDirectory(prefix="prunekit-ddp-") as folder:
            started = time.perf_counter()
            mp.spawn(_ddp_rank, args=(folder, data, a.ddp_steps, a.ddp_batch, a.seed), nprocs=2, join=True)
            ddp_seconds = time.perf_counter() - started
            ranks = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(2)]
        started = time.perf_counter()
        single, masks, history = _ddp_run(data, a.ddp_steps, a.ddp_batch, a.seed, accumulation=2)
        single_seconds = time.perf_counter() - started
        state = single.state_dict()
        params = {name for name, _ in single.named_parameters()}
        differing = sum(int((ranks[0]["masks"][k] != masks[k]).sum()) for k in masks)
        between_ranks = sum(int((ranks[0]["masks"][k] != ranks[1]["masks"][k]).sum()) for k in masks)
        rank0 = new_resnet20(a.seed)
        rank0.load_state_dict(ranks[0]["state"])
        return {
            "accuracy": evaluate(single, self.test_set),
            "ddp_rank0_accuracy": evaluate(rank0, self.test_set),
            "sparsity": history.final_sparsity,
            "steps": a.ddp_steps,
            "seconds": ddp_seconds + single_seconds,
            "ddp_seconds": ddp_seconds,
            "single_seconds": single_seconds,
            "mask_entries": sum(m.numel() for m in masks.values()),
            "mask_entries_differing": differing,
            "mask_entries_differing_between_ranks": between_ranks,
            "max_abs_weight_difference": state_difference(
                {k: v for k, v in state.items() if k in params}, ranks[0]["state"]
            ),
            "max_abs_buffer_difference": state_difference(
                {k: v for k, v in state.items() if k not in params}, ranks[0]["state"]
            ),
            "history": [asdict(r) for r in history.records],
            "note": (
                f"GMP 90%, {a.ddp_steps} steps, {n} examples, global batch {a.ddp_batch}: 2 gloo ranks vs 1 process "
                "accumulating the same halves; accuracy: the single process's (rank 0's in ddp_rank0_accuracy)"
            ),
        }


def _ddp_run(
    data: tuple[torch.Tensor, torch.Tensor], steps: int, batch: int, seed: int, accumulation: int
) -> tuple[nn.Module, dict[str, torch.Tensor], Any]:
    from prunekit.training import Sparsifier, SparsifierConfig
    from prunekit.training.loop import TrainConfig, train

    model = new_resnet20(seed)
    sparsifier = Sparsifier(model, SparsifierConfig(schedule=gradual_schedule(steps), exclude=EXCLUDE))
    config = TrainConfig(
        steps=steps, batch_size=batch, seed=seed, threads=1, accumulation_steps=accumulation, log_every=10
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    desc = f"ddp rank {rank}" if dist.is_initialized() else "ddp single process"
    history = train(model, data, None, config, sparsifier=sparsifier, desc=desc)
    masks = {name: mask.keep for name, mask in sparsifier.masks.items()}
    sparsifier.remove()
    return model, masks, history


def _ddp_rank(rank: int, folder: str, data: tuple[torch.Tensor, torch.Tensor], steps: int, batch: int, seed: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        model, masks, _ = _ddp_run(data, steps, batch, seed, accumulation=1)
        torch.save({"masks": masks, "state": model.state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- report


def _gap_floor(dense: dict[str, Any], run: dict[str, Any], floor: str) -> dict[str, Any]:
    """``run`` within 2.5 accuracy points of ``dense``."""
    gap = 100 * (dense["accuracy"] - run["accuracy"])
    return {
        "floor": floor,
        "result": f"{100 * run['accuracy']:.2f}% vs {100 * dense['accuracy']:.2f}% (gap {gap:.2f} points)",
        "met": gap <= 2.5,
    }


def floors(experiments: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    dense = experiments.get("dense")
    gaps = {
        "gmp90": "gradual magnitude at 90% within 2.5 points of dense (same length)",
        "gmp90_erk": "gradual magnitude (ERK allocation) at 90% within 2.5 points of dense (same length)",
        # not the floor (the student learns from a dense model trained as long): shown beside it
        "gmp90_kd": "(beside the floor) gradual magnitude at 90% distilled from the dense run, within 2.5 points",
    }
    for name, floor in gaps.items():
        if dense and experiments.get(name):
            out.append(_gap_floor(dense, experiments[name], floor))
    imp, reinit = experiments.get("imp"), experiments.get("imp_reinit")
    if imp and reinit:
        out.append(
            {
                "floor": "IMP with rewinding beats its random-reinit control",
                "result": f"{100 * imp['accuracy']:.2f}% vs {100 * reinit['accuracy']:.2f}% at sparsity "
                f"{imp['sparsity']:.4f}",
                "met": imp["accuracy"] > reinit["accuracy"],
            }
        )
    ddp = experiments.get("ddp")
    if ddp:
        out.append(
            {
                "floor": "DDP (2 processes) reaches the same masks as 1 process (same seed, global batch)",
                "result": f"{ddp['mask_entries_differing']} of {ddp['mask_entries']} mask entries differ; "
                f"max |weight difference| {ddp['max_abs_weight_difference']:.3g}",
                "met": ddp["mask_entries_differing"] == 0,
            }
        )
    return out


def write(args: argparse.Namespace, bench: Bench, experiments: dict[str, Any], previous: list[str]) -> None:
    from prunekit.core.measure import versions
    from prunekit.training.report import write_training_report

    seconds = sum(e.get("seconds") or 0.0 for e in experiments.values())
    budget = {**bench.budget(), "measured_minutes": round(seconds / 60, 1)}
    dense = experiments.get("dense")
    if dense and dense.get("seconds"):  # training and its evaluations, per step; x steps of a full epoch
        per_step = dense["seconds"] / dense["steps"]
        budget["dense_seconds_per_step"] = round(per_step, 3)
        budget["dense_minutes_per_full_epoch_with_evals"] = round(per_step * (50_000 // 128) / 60, 2)
    if previous:
        budget["kept_from_a_previous_run"] = previous
    report = {
        "title": "Pruning during training: ResNet-20 on CIFAR-10 (JPEG copy), CPU",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(),
        "budget": budget,
        "experiments": experiments,
        "floors": floors(experiments),
    }
    write_training_report(
        report, args.out, markdown_path=args.out.with_suffix(".md"), plot_path=args.out.with_suffix(".png")
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bench = Bench(args)
    chosen = list(args.only or EXPERIMENTS)
    experiments: dict[str, Any] = {}
    previous: list[str] = []
    if args.only and args.out.is_file():  # keep the other experiments of an earlier run
        experiments = json.loads(args.out.read_text()).get("experiments", {})
        rerun = set(chosen) | ({"imp_reinit"} if "imp" in chosen else set())
        previous = [name for name in experiments if name not in rerun]
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "dense": lambda: {"dense": bench.dense()["entry"]},
        "gmp90": lambda: {"gmp90": bench.sparse("gmp90", distribution="uniform")},
        "gmp90_erk": lambda: {"gmp90_erk": bench.sparse("gmp90_erk", distribution="erk")},
        "gmp90_kd": lambda: {"gmp90_kd": bench.sparse("gmp90_kd", distill=True, distribution="uniform")},
        "global_mp90": lambda: {
            "global_mp90": bench.sparse("global_mp90", distribution="global", min_density=MIN_DENSITY)
        },
        "granet90": lambda: {
            "granet90": bench.sparse("granet90", method="granet", distribution="global", min_density=MIN_DENSITY)
        },
        "imp": bench.imp,
        "structured50": lambda: {"structured50": bench.structured()},
        "scratch50": lambda: {"scratch50": bench.scratch()},
        "ddp": lambda: {"ddp": bench.ddp()},
    }
    print(
        f"{len(chosen)} experiments, {args.epochs:g} epochs per run, {bench.total} steps per run, "
        f"{bench.steps_per_epoch} steps per epoch, {args.n_train} training examples, {args.threads} threads",
        flush=True,
    )
    for name in chosen:
        started = time.perf_counter()
        produced = runners[name]()
        if bench.trained_dense:  # trained here, maybe as a prerequisite of another experiment: report it
            produced = {"dense": bench.dense()["entry"], **produced}
            bench.trained_dense = False
        for key, entry in produced.items():
            experiments[key] = entry
            previous = [p for p in previous if p != key]
            accuracy = entry.get("accuracy")
            print(
                f"{key:14s} accuracy {'-' if accuracy is None else f'{100 * accuracy:.2f}%':>8s} "
                f"sparsity {entry.get('sparsity') or 0.0:.4f} steps {entry.get('steps')} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        write(args, bench, experiments, previous)
    for floor in floors(experiments):
        print(f"floor: {floor['floor']}: {floor['result']} -> {'met' if floor['met'] else 'NOT met'}", flush=True)
    print(f"wrote {args.out} (+ .md, .png)", flush=True)


if __name__ == "__main__":
    main()
