"""A small plain-PyTorch training loop for image classifiers on in-memory tensors (CIFAR-sized, CPU-friendly).

:func:`train` runs SGD with momentum on ``(images, labels)`` tensors (``uint8`` or float ``(N, C, H, W)``),
optionally driving a :class:`~prunekit.training.sparsifier.Sparsifier` (stepped after every ``optimizer.step()``),
distilling from a teacher (Hinton et al. 2015) and capturing a lottery-ticket rewind point (Frankle et al. 2020).
It returns a :class:`TrainHistory`: per logged step the training loss, learning rate, sparsity and PQ Index
(Diao et al. 2023) of the prunable weights, and the test accuracy where evaluated. :func:`evaluate` gives the
top-1 accuracy.

**Optimisation** (defaults of :class:`TrainConfig`): SGD, batch 128, peak learning rate 0.1, Nesterov momentum
0.9, weight decay ``5e-4`` on every parameter (the usual value for short CIFAR schedules; He et al. 2016 use
``1e-4`` over 164 epochs), cross-entropy. The learning rate follows a **one-cycle** schedule (Smith & Topin 2019,
"Super-Convergence"): linear warm-up from ``lr / warmup_steps`` to ``lr`` over the first ``warmup`` fraction of the
steps, then linear decay to zero at the last step. In a budget of a few epochs the final accuracy is set mostly by
annealing the learning rate to zero by the end, and a piecewise-linear cycle is what the fast CIFAR-10 recipes use
(Page 2018, "How to train your ResNet": 94% in 24 epochs); the warm-up lets batch-norm networks start at
``lr = 0.1`` without early instability (Goyal et al. 2017). ``lr_schedule="cosine"`` (same warm-up, then
``lr/2 (1 + cos(π p))``, Loshchilov & Hutter 2017) and ``"constant"`` are available.

**Determinism.** The loop draws nothing from the global RNG (a model with dropout does: seed it). Step ``t`` (0-based) takes its batch from the permutation of epoch
``t // steps_per_epoch`` (a ``torch.Generator`` seeded from ``(seed, epoch)``) and its augmentation (pad-4 random
crop and horizontal flip, He et al. 2016 Sec. 4.2) from a generator seeded from ``(seed, t)``. The loop knows no data
set: each global batch goes through ``transform(images, step)`` (default
:func:`~prunekit.training.transforms.config_transform`: the configuration's crop, flip and normalisation; CIFAR's
own pieces are in :mod:`prunekit.training.cifar.augment`) and evaluation batches through ``eval_transform``
(default: normalisation with the configuration's ``mean``/``std``). So a run is
reproducible bit for bit given the seed and the thread count, and starting at ``start_step = k`` (rewinding)
replays exactly the batches of the uninterrupted run from step ``k`` on. Epochs drop their last partial batch.

**Data parallelism.** ``batch_size`` is the *global* batch. Under ``torch.distributed`` every rank draws the same
global batch and augmentation and takes its contiguous ``1/world`` slice; the model is wrapped in
``DistributedDataParallel`` (which averages gradients: ``Σ_r g_r / W``). ``accumulation_steps = a`` splits each
rank's slice into ``a`` micro-batches, each forwarded separately (batch-norm statistics per micro-batch) with its
loss scaled by ``1/a``. One process with ``accumulation_steps = 2`` and two DDP ranks with 1 each therefore see
the same half-batches, and since halving is exact in floating point, the gradients ``g1/2 + g2/2`` are the same
bits (only batch-norm *running* statistics differ: DDP keeps rank 0's, accumulation folds both halves in).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.training import ddp
from prunekit.training.distill import kd_loss, teacher_logits
from prunekit.training.evaluation import (
    Data,
    LabelledImages,
    evaluate,
    measure_sparsity,
    model_device,
    state_difference,
    unpack,
    weights_pq_index,
)
from prunekit.training.history import StepRecord, TrainHistory
from prunekit.training.lottery import capture_rewind_point
from prunekit.training.selection import select_parameters
from prunekit.training.sparsifier import Sparsifier
from prunekit.training.train_config import (
    EVAL_SUBSET_STREAM,
    DistillConfig,
    LRSchedule,
    TrainConfig,
    derive_seed,
    global_batch_indices,
    lr_at,
    rank_slice,
    steps_per_epoch,
    total_steps,
)
from prunekit.training.transforms import BatchTransform, config_transform

logger = logging.getLogger(__name__)

__all__ = [
    "DistillConfig",
    "LRSchedule",
    "LabelledImages",
    "StepRecord",
    "TrainConfig",
    "TrainHistory",
    "derive_seed",
    "evaluate",
    "global_batch_indices",
    "lr_at",
    "measure_sparsity",
    "rank_slice",
    "state_difference",
    "steps_per_epoch",
    "total_steps",
    "train",
    "weights_pq_index",
]


# ------------------------------------------------------------------------------------------------ training


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _global_mean(value: float, count: int) -> float:
    """Mean over ranks of a per-rank mean (the rank's own value outside ``torch.distributed``)."""
    if not ddp.is_distributed():
        return value / max(1, count)
    t = torch.tensor([value, float(count)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def train(
    model: nn.Module,
    train_set: Data,
    test_set: Data | None,
    config: TrainConfig,
    *,
    sparsifier: Sparsifier | None = None,
    targets: Sequence[str] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    teacher: nn.Module | None = None,
    distill: DistillConfig | None = None,
    rewind_step: int | None = None,
    start_step: int = 0,
    progress: bool = True,
    desc: str = "train",
    transform: BatchTransform | None = None,
    eval_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``train_set`` and return its :class:`TrainHistory` (see the module docstring).

    ``sparsifier`` (built on ``model``) gets the optimizer attached and ``step()`` after every optimizer step;
    ``on_step(steps_done, model)`` runs after that (e.g. ``lambda s, m: ticket.apply_masks()`` for IMP).
    ``targets``: parameter names whose sparsity and PQI are logged (default: the sparsifier's targets, else every
    Linear/Conv weight). ``teacher`` with ``distill``: the Hinton et al. 2015 loss from the teacher's logits
    (teacher run frozen, in eval mode). ``rewind_step = k``: copy the model's ``state_dict`` after ``k`` steps
    into ``history.rewind_state`` (Frankle et al. 2020). ``start_step = k``: begin at step ``k`` of the learning-rate
    schedule and data order, as when training from a rewind point (a fresh optimizer; the sparsifier keeps its
    own step count). ``test_set = None`` skips evaluation. Under ``torch.distributed`` the model is wrapped in
    ``DistributedDataParallel`` for the run; only rank 0 shows progress. ``transform(images, step)`` turns each
    global batch into the model's input (default :func:`~prunekit.training.transforms.config_transform`), and
    ``eval_transform(images)`` each evaluation batch (default: normalisation with ``config.mean``/``config.std``).
    """
    images, labels = unpack(train_set)
    n = images.shape[0]
    total = total_steps(config, n)
    per_epoch = steps_per_epoch(n, config.batch_size)
    if not 0 <= start_step <= total:
        raise ConfigError(f"start_step must be in [0, {total}], got {start_step}")
    if rewind_step is not None and not start_step <= rewind_step <= total:
        raise ConfigError(f"rewind_step must be in [{start_step}, {total}], got {rewind_step}")
    if teacher is not None and distill is None:
        raise ConfigError("a teacher needs distill=DistillConfig(alpha, temperature) (no universal default)")
    world = torch.distributed.get_world_size() if ddp.is_distributed() else 1
    rank = torch.distributed.get_rank() if ddp.is_distributed() else 0
    part = rank_slice(config.batch_size, rank, world)
    micro = (part.stop - part.start) // config.accumulation_steps
    if micro * config.accumulation_steps != part.stop - part.start:
        raise ConfigError(
            f"each rank's {part.stop - part.start} examples do not split into {config.accumulation_steps} "
            "equal micro-batches: make batch_size a multiple of world_size x accumulation_steps"
        )
    if sparsifier is not None and sparsifier.model is not model:
        raise ConfigError("the sparsifier was built on another model: build it on the model being trained")
    names = tuple(targets) if targets is not None else _default_targets(model, sparsifier)
    test_pair = None if test_set is None else unpack(test_set)
    eval_subset = _eval_subset(test_pair, config)

    device = model_device(model)
    batch_transform = config_transform(config) if transform is None else transform
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=lr_at(start_step, total, config),
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    if sparsifier is not None:
        sparsifier.attach_optimizer(optimizer)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)

    history = TrainHistory(start_step=start_step, end_step=total, targets=names)
    permutations: dict[int, torch.Tensor] = {}
    began = time.perf_counter()
    loss_sum, loss_count = 0.0, 0

    def record(step: int, lr: float, evaluate_now: bool) -> StepRecord:
        nonlocal loss_sum, loss_count
        loss = _global_mean(loss_sum, loss_count) if step > start_step else None
        loss_sum, loss_count = 0.0, 0
        accuracy = examples = None
        if evaluate_now and eval_subset is not None:
            accuracy = evaluate(
                model,
                eval_subset,
                batch_size=config.eval_batch_size,
                mean=config.mean,
                std=config.std,
                transform=eval_transform,
            )
            examples = int(eval_subset[1].shape[0])
        entry = StepRecord(
            step=step,
            epoch=step / per_epoch,
            loss=loss,
            lr=lr,
            sparsity=measure_sparsity(model, names),
            pqi=weights_pq_index(model, names),
            accuracy=accuracy,
            eval_examples=examples,
            seconds=time.perf_counter() - began,
        )
        history.records.append(entry)
        logger.debug("%s step %d: %s", desc, step, entry)
        return entry

    from tqdm.auto import tqdm

    bar = tqdm(total=total - start_step, desc=desc, unit="step", disable=not progress or rank != 0, leave=False)
    with _num_threads(config.threads):
        model.train()
        if rewind_step == start_step:
            history.rewind_state = capture_rewind_point(model)
        record(start_step, lr_at(start_step, total, config), evaluate_now=config.eval_every > 0)
        for step in range(start_step, total):
            lr = lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = global_batch_indices(step, n, config.batch_size, config.seed, permutations)
            x = batch_transform(images[index], step)[part]
            y = labels[index][part]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for m in range(config.accumulation_steps):
                xs = x[m * micro : (m + 1) * micro].to(device)
                ys = y[m * micro : (m + 1) * micro].to(device)
                last = m == config.accumulation_steps - 1
                with contextlib.nullcontext() if last or world == 1 else net.no_sync():
                    logits = net(xs)
                    if teacher is not None and distill is not None:
                        soft = teacher_logits(teacher, xs)
                        loss = kd_loss(logits, soft, ys, alpha=distill.alpha, temperature=distill.temperature)
                    else:
                        loss = F.cross_entropy(logits, ys)
                    if config.accumulation_steps > 1:
                        loss = loss / config.accumulation_steps
                    loss.backward()
                step_loss += float(loss.detach())
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"{desc}: the training loss became {step_loss} at step {step}: lower the learning rate"
                )
            optimizer.step()
            if sparsifier is not None:
                sparsifier.step()
            done = step + 1
            if on_step is not None:
                on_step(done, model)
            if rewind_step == done:
                history.rewind_state = capture_rewind_point(model)
            loss_sum += step_loss
            loss_count += 1
            evaluate_now = config.eval_every > 0 and done % config.eval_every == 0 and done < total
            changed = measure_sparsity(model, names) != history.records[-1].sparsity  # every mask change is logged
            if changed or done % config.log_every == 0 or evaluate_now or done == total:
                entry = record(done, lr, evaluate_now)
                bar.set_postfix(loss=f"{entry.loss:.3f}", sparsity=f"{entry.sparsity:.3f}", refresh=False)
            bar.update(1)
        bar.close()
        if test_pair is not None:
            history.final_accuracy = evaluate(
                model,
                test_pair,
                batch_size=config.eval_batch_size,
                mean=config.mean,
                std=config.std,
                transform=eval_transform,
            )
            last = history.records[-1]
            history.records[-1] = StepRecord(
                **{**asdict(last), "accuracy": history.final_accuracy, "eval_examples": int(test_pair[1].shape[0])}
            )
    history.seconds = time.perf_counter() - began
    logger.info(
        "%s: %d steps in %.1f s, accuracy %s, sparsity %.4f",
        desc,
        total - start_step,
        history.seconds,
        "n/a" if history.final_accuracy is None else f"{history.final_accuracy:.4f}",
        history.records[-1].sparsity,
    )
    return history


def _default_targets(model: nn.Module, sparsifier: Sparsifier | None) -> tuple[str, ...]:
    if sparsifier is not None:
        return tuple(sparsifier.masks)
    return tuple(p.name for p in select_parameters(model))


def _eval_subset(
    test: tuple[torch.Tensor, torch.Tensor] | None, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if test is None or config.eval_every == 0:
        return None
    images, labels = test
    if config.eval_samples is None or config.eval_samples >= labels.shape[0]:
        return images, labels
    generator = torch.Generator().manual_seed(derive_seed(config.seed, EVAL_SUBSET_STREAM, 0))
    index = torch.randperm(labels.shape[0], generator=generator)[: config.eval_samples].sort().values
    return images[index], labels[index]
