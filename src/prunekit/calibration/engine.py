"""The sequential engine: calibration streams through the decoder blocks one at a time.

For each block: move it to the compute device, hook its target layers, run every calibration batch
through it once (see :mod:`prunekit.calibration.lockstep`), let the caller prune each layer when its
statistics are complete, keep the block's outputs (computed with the pruned weights) as the next block's
inputs, move it back. Peak memory: the weights (which may stay on the CPU), one block on the device, and
one block's calibration activations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibration.capture import BlockCall, CapturedInputs, capture_block_inputs, hidden_from_output
from prunekit.calibration.lockstep import LockstepRunner
from prunekit.calibration.statistics import (
    LayerStatistics,
    accumulate_gram,
    complete_gram,
    input_sq_norms,
    sample_rows,
)
from prunekit.core.errors import NonFiniteError
from prunekit.models.experts import ExpertMatrix, fused_experts_modules, routed_through
from prunekit.models.targets import Target

log = logging.getLogger(__name__)


PruneLayer = Callable[[Target, LayerStatistics], None]
#: ``after_block(index, block, forward, inputs, dense_outputs)``, called once a block's targets are pruned and
#: before its outputs go on: ``forward(b, x)`` runs the block on calibration batch ``b`` with input ``x``;
#: ``inputs`` are the block's calibration inputs and ``dense_outputs`` the block's outputs on them before pruning
AfterBlock = Callable[[int, nn.Module, Callable[[int, torch.Tensor], torch.Tensor], list, list], None]


class BlockStream(Protocol):
    """Where block weights come from and go to when the model does not fit in memory
    (:class:`prunekit.io.streaming.StreamedBlocks`); without one, the whole model is resident."""

    def load_outside(self) -> None: ...  # weights outside the blocks, for capturing the first block's inputs

    def release_outside(self) -> None: ...

    def load_block(self, index: int, block: nn.Module) -> None: ...

    def finish_block(self, index: int, block: nn.Module) -> None: ...  # the block is pruned: write, free


Propagation = Literal["sequential", "block", "dense"]


@dataclass
class BlockTiming:
    """One block: its index, the seconds it took, and the bytes of calibration activations (the block's
    inputs, all batches) held while it ran."""

    index: int
    seconds: float
    activation_bytes: int = 0


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def move_outside_blocks(model: nn.Module, blocks_name: str, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the blocks to ``device`` (in place); meta tensors
    (not loaded: see :mod:`prunekit.io.streaming`) stay where they are."""
    prefix = blocks_name + "."
    for module_name, module in model.named_modules():
        if module_name == blocks_name or module_name.startswith(prefix):
            continue
        for param in module.parameters(recurse=False):
            if param.device != device and param.device.type != "meta":
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _collector(
    sample_rows_per_batch: int, gram_dtype: torch.dtype | None
) -> Callable[[nn.Module, tuple[Any, ...], LayerStatistics | None], LayerStatistics]:
    """Fold one batch's input of a layer into its running :class:`LayerStatistics`. A layer called with a
    second tensor argument (an expert's matrix: :class:`prunekit.models.experts.ExpertMatrix`) has its rows
    scaled by it, the tokens' routing weights, so ``X^T X`` becomes ``sum_t g_t^2 x_t x_t^T``."""

    def collect(module: nn.Module, args: tuple[Any, ...], pooled: LayerStatistics | None) -> LayerStatistics:
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        if isinstance(module, ExpertMatrix) and len(args) > 1 and isinstance(args[1], torch.Tensor):  # routed rows
            flat = flat * args[1].detach().reshape(-1, 1).to(flat.dtype)
        sq = None if gram_dtype is not None else input_sq_norms(flat)  # else: the diagonal of the Gram
        sample = sample_rows(flat, sample_rows_per_batch) if sample_rows_per_batch > 0 else None
        if pooled is None:
            gram = accumulate_gram(None, flat, gram_dtype) if gram_dtype is not None else None
            return LayerStatistics(sq, flat.shape[0], sample, gram)
        if sq is not None:
            assert pooled.sq_norms is not None
            pooled.sq_norms += sq
        pooled.n_tokens += flat.shape[0]
        if sample is not None:
            pooled.sample = sample if pooled.sample is None else torch.cat([pooled.sample, sample])
        if gram_dtype is not None:
            pooled.gram = accumulate_gram(pooled.gram, flat, gram_dtype)
        return pooled

    return collect


def run_sequential(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    targets: Sequence[Target],
    input_ids: torch.Tensor,
    prune_layer: PruneLayer,
    *,
    device: torch.device,
    batch_size: int = 1,
    sample_tokens: int = 256,
    offload_activations: bool = False,
    propagation: Propagation = "sequential",
    gram_dtype: torch.dtype | None = None,
    stream: BlockStream | None = None,
    progress: bool = True,
    routing_weighted: bool = True,
    after_block: AfterBlock | None = None,
    reduce_statistics: Callable[[LayerStatistics], None] | None = None,
    settle: Callable[[], None] | None = None,
) -> list[BlockTiming]:
    """Prune ``targets`` block by block.

    ``prune_layer(target, inputs)`` is called exactly once per target, after all batches' inputs to that
    layer are known. Targets that no batch reached get ``LayerStatistics(None, 0, None)`` after their block.
    With ``gram_dtype`` the inputs' Gram matrix ``X^T X`` is accumulated too, in that dtype. With a
    ``stream``, each block's weights are loaded just before it runs and handed back once it is pruned.

    ``propagation`` says which inputs a layer's statistics come from:

    * ``"sequential"`` (one pass per block): the actual inputs of the pruned model, every earlier layer
      (of this block too) already pruned; each layer is pruned before any batch uses its output.
    * ``"block"`` (two passes per block, as the Wanda and llm-compressor code): the block runs dense for
      statistics, is pruned, then runs again to produce the pruned outputs that feed the next block.
    * ``"dense"`` (one pass per block): statistics of the dense model's own activations; pruning never
      changes what later blocks see.

    Fused MoE experts whose matrices are targets run one expert at a time through those matrices
    (:func:`prunekit.models.experts.routed_through`), so each expert's statistics come from its own routed
    tokens, weighted by their routing weights when ``routing_weighted``.

    With ``after_block`` (block reconstruction), each block first runs dense once more to record its outputs,
    its inputs are kept until it is done, ``after_block`` may change its weights, and its outputs are then
    computed again: memory holds three sets of one block's activations.

    With ``reduce_statistics`` (several ranks, each with its own calibration windows:
    :func:`~prunekit.calibration.statistics.all_reduce_statistics`), each layer's statistics are combined
    across ranks before it is pruned, once per shared input, in the same order on every rank. ``settle()``
    is called once a block's layers are all pruned, before its outputs are computed again or go on: where
    ``prune_layer`` left work in flight (another rank's weights on their way), it completes it.

    Returns the time spent per block.
    """
    by_block: dict[int, list[Target]] = {}
    for target in targets:
        if target.block_index is None:
            raise ValueError(f"{target.name} is outside the decoder blocks; the engine prunes block layers only")
        by_block.setdefault(target.block_index, []).append(target)

    if stream is not None:
        stream.load_outside()
    home = module_device(model)
    move_outside_blocks(model, blocks_name, device)
    try:
        captured: CapturedInputs = capture_block_inputs(model, blocks, input_ids, batch_size, device)
    finally:
        move_outside_blocks(model, blocks_name, home)
        if stream is not None:
            stream.release_outside()

    n_batches = len(captured.hidden)
    per_batch_rows = math.ceil(sample_tokens / n_batches) if sample_tokens > 0 else 0
    collect = _collector(per_batch_rows, gram_dtype)
    hidden: list[torch.Tensor | None] = (
        [h.to("cpu") for h in captured.hidden] if offload_activations else list(captured.hidden)
    )
    captured.hidden.clear()
    timings: list[BlockTiming] = []
    bar = tqdm(range(len(blocks)), desc="pruning blocks", unit="block", disable=not progress)
    for index in bar:
        started = time.perf_counter()
        held = sum(h.numel() * h.element_size() for h in hidden if h is not None)
        block = blocks[index]
        if stream is not None:
            stream.load_block(index, block)
        block_home = module_device(block)
        block.to(device)
        layer_targets = by_block.get(index, [])
        by_module = {id(t.module): t for t in layer_targets}

        def finalize(
            module: nn.Module, pooled: LayerStatistics, batches: list[int], by_module: dict[int, Target] = by_module
        ) -> None:
            target = by_module[id(module)]
            if reduce_statistics is not None and "reduced" not in pooled.cache:
                reduce_statistics(pooled)
                pooled.cache["reduced"] = True
            if pooled.gram is not None and "gram_complete" not in pooled.cache:
                complete_gram(pooled.gram)
                pooled.cache["gram_complete"] = True
            if pooled.sq_norms is None and pooled.gram is not None:
                pooled.sq_norms = pooled.gram.diagonal().float().clone()
            assert pooled.sq_norms is not None
            finite = torch.isfinite(pooled.sq_norms).all() and (
                pooled.gram is None or torch.isfinite(pooled.gram).all()
            )
            if not finite:
                raise NonFiniteError(
                    f"NaN or Inf in the inputs of layer {target.name!r}: the model (or an earlier pruned "
                    "layer) produces non-finite activations; check the weights and use float32 or bfloat16"
                )
            prune_layer(target, pooled)

        runner: LockstepRunner[torch.Tensor] = LockstepRunner(
            [t.module for t in layer_targets], collect, finalize, park=propagation == "sequential"
        )
        calls = captured.calls[index]

        def make_job(
            b: int,
            release: bool,
            block: nn.Module = block,
            calls: list[BlockCall] = calls,
            hidden: list[torch.Tensor | None] = hidden,
        ) -> Callable[[], torch.Tensor]:
            def job() -> torch.Tensor:
                call = calls[b]
                x = hidden[b]
                assert x is not None
                if release:  # the block's own frames keep what they need: no second copy while it runs
                    hidden[b] = None
                # no ``with torch.no_grad()`` here: grad mode is per thread, and jobs parked inside such a block
                # would restore each other's saved modes out of order; the runner runs them all under no_grad
                out = block(to_device(x, device), *to_device(call.args, device), **to_device(call.kwargs, device))
                del x
                result = hidden_from_output(out)
                return result.to("cpu") if offload_activations else result

            return job

        def forward(b: int, x: torch.Tensor, block: nn.Module = block, calls: list[BlockCall] = calls) -> torch.Tensor:
            call = calls[b]
            out = block(to_device(x, device), *to_device(call.args, device), **to_device(call.kwargs, device))
            return hidden_from_output(out)

        dense_outputs: list[torch.Tensor] = []
        if after_block is not None:
            with torch.no_grad():
                dense_outputs = [forward(b, x) for b, x in enumerate(hidden) if x is not None]
        inputs = list(hidden)
        # the block's outputs go on after it is pruned (and reconstructed), except under dense propagation
        two_passes = propagation == "block" or (after_block is not None and propagation == "sequential")
        expert_targets = [t.module for t in layer_targets if isinstance(t.module, ExpertMatrix)]
        owners_with_targets = {id(m.owner) for m in expert_targets}
        owners = [
            (f"{blocks_name}.{index}.{n}", m) for n, m in fused_experts_modules(block) if id(m) in owners_with_targets
        ]
        with torch.no_grad(), routed_through(owners, expert_targets, weigh_rows=routing_weighted):
            outputs = runner.run([make_job(b, release=not two_passes) for b in range(n_batches)])
            if settle is not None:
                settle()
            if after_block is not None:
                if two_passes:
                    outputs = []  # computed again once the block is reconstructed
                after_block(index, block, forward, inputs, dense_outputs)
            if two_passes:  # second pass: outputs of the pruned (and reconstructed) block
                outputs = [make_job(b, release=True)() for b in range(n_batches)]
        inputs, dense_outputs = [], []
        hidden = list(outputs)
        reached = {id(m) for m in runner.finalized}
        for target in layer_targets:
            if id(target.module) not in reached:
                prune_layer(target, LayerStatistics(None, 0, None))
        block.to(block_home)
        if stream is not None:
            stream.finish_block(index, block)
        timings.append(BlockTiming(index, time.perf_counter() - started, held))
        if progress:
            bar.set_postfix(last=f"{timings[-1].seconds:.1f}s")
    return timings
