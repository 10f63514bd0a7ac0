"""One-shot pruning of a causal LM: select targets -> gather statistics -> score -> pattern -> apply.

:func:`prune` is the public entry point. Methods whose scores need activations (Wanda) run the sequential
engine; weight-only methods (magnitude, random) prune directly, and still use the engine when calibration
data is given, to report each layer's reconstruction error on real inputs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.calibration.engine import AfterBlock, BlockStream, BlockTiming, run_sequential
from prunekit.calibration.statistics import LayerStatistics, all_reduce_statistics
from prunekit.core.devices import resolve_device
from prunekit.core.distributed import (
    all_gather_objects,
    broadcast_async,
    check_same_everywhere,
    fingerprint,
    rank_and_world,
    shard_rows,
)
from prunekit.core.errors import ConfigError, NonFiniteError
from prunekit.core.masks import Mask
from prunekit.core.measure import MemoryMeter
from prunekit.core.patterns import Pattern, Unstructured, check_pattern_fits
from prunekit.methods import LayerTask, MethodConfig, OneShotMethod, method_class
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import Target, find_targets, weight_matrix
from prunekit.oneshot.budgets import block_outlier_shares, owl_sparsities
from prunekit.oneshot.config import PruneConfig
from prunekit.reconstruction.block import BlockForward, BlockReconstruction, reconstruct_block
from prunekit.reconstruction.least_squares import DEFAULT_DAMPENING, refit_kept_weights

log = logging.getLogger(__name__)


@dataclass
class LayerResult:
    """What happened to one layer."""

    name: str
    block: int | None
    shape: tuple[int, int]
    method: str
    sparsity: float
    relative_error: float | None
    error_tokens: int
    seconds: float
    #: the MoE expert the matrix belongs to (``None``: not an expert)
    expert: int | None = None
    #: calibration tokens (rows) that reached the layer; for an expert, the tokens routed to it
    calibration_tokens: int = 0
    #: why the layer was not pruned as asked (an expert with too few routed tokens)
    note: str = ""


@dataclass
class PruneResult:
    """The pruned model and a record of the run."""

    model: nn.Module
    layers: list[LayerResult] = field(default_factory=list)
    blocks: list[BlockTiming] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    calibration_shape: tuple[int, int] | None = None
    #: per decoder block: the sparsity it was given (``layer_budget`` owl) and its share of outlier scores
    block_sparsity: dict[int, float] = field(default_factory=dict)
    block_outliers: dict[int, float] = field(default_factory=dict)
    #: ``reconstruct`` block: per decoder block, its output error against the dense block before and after
    block_reconstruction: dict[int, BlockReconstruction] = field(default_factory=dict)
    #: under ``torch.distributed``: per rank, its calibration windows, layers solved, seconds and peak memory
    ranks: list[dict[str, float]] = field(default_factory=list)

    @property
    def overall_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / max(1, total)


def relative_reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    """``||W X - W' X||^2 / ||W X||^2`` on sample input rows ``X`` (tokens x in); ``W'`` = ``pruned``."""
    w = weight.float()
    x = inputs.to(w.device).float()
    dense = x @ w.t()
    difference = x @ (w - pruned.to(w.device).float()).t()
    denominator = dense.pow(2).sum()
    return float(difference.pow(2).sum() / denominator) if denominator > 0 else 0.0


def _check_finite_weight(target: Target, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise NonFiniteError(
            f"NaN or Inf in the weights of layer {target.name!r}: the checkpoint is damaged or was saved in "
            "a dtype that overflowed; reload it in float32"
        )


def _block_reconstruction(
    config: PruneConfig, targets: list[Target], masks: dict[int, torch.Tensor], result: PruneResult
) -> AfterBlock:
    """The engine's ``after_block`` for ``reconstruct: block`` (:func:`~prunekit.reconstruction.block.reconstruct_block`)."""
    unsupported = [t.name for t in targets if not isinstance(t.module, nn.Linear) and not hasattr(t.module, "nf")]
    if unsupported:
        raise ConfigError(
            f"block reconstruction tunes nn.Linear (and GPT-2 Conv1D) weights; {unsupported[0]} is not one (fused "
            "MoE experts are not supported yet): prune without reconstruct, or exclude those layers"
        )

    def after_block(index: int, block: nn.Module, forward: BlockForward, inputs: list, dense: list) -> None:
        masked = []
        for target in targets:
            keep = masks.get(id(target.module))
            if target.block_index == index and keep is not None:
                weight = target.module.weight
                masked.append((weight, keep if isinstance(target.module, nn.Linear) else keep.t()))
        done = reconstruct_block(
            block, forward, inputs, dense, masked, steps=config.reconstruct_steps, lr=config.reconstruct_lr
        )
        result.block_reconstruction[index] = done
        log.info("block %d reconstructed: error %.4g -> %.4g", index, done.error_before, done.error_after)

    return after_block


def _share_the_work(
    model: nn.Module, config: PruneConfig, targets: list[Target], calibration: torch.Tensor | None, stream: object
) -> torch.Tensor | None:
    """Under ``torch.distributed`` (several ranks): refuse what cannot be split yet, check that every rank
    holds the same settings, model and calibration windows, and return this rank's share of the windows."""
    rank, world = rank_and_world()
    unsupported = [
        (config.layer_budget == "owl", "layer_budget owl"),
        (config.reconstruct == "block", "reconstruct block"),
        (stream is not None, "--lazy"),
        (any(t.expert is not None for t in targets), "MoE expert matrices"),
    ]
    refused = [name for is_set, name in unsupported if is_set]
    if refused:
        raise ConfigError(
            f"{', '.join(refused)} cannot run on several ranks yet: run it in one process (without torchrun)"
        )
    shapes = ";".join(
        f"{n}:{tuple(p.shape)}:{float(p.detach().double().sum()):.12e}" for n, p in model.named_parameters()
    )
    check_same_everywhere(fingerprint(config.model_dump_json(), shapes), "settings or model weights")
    if calibration is None:
        return None  # weight-only: every rank decides the same from the same weights
    check_same_everywhere(
        fingerprint(str(tuple(calibration.shape)), calibration.cpu().numpy().tobytes()), "calibration windows"
    )
    return shard_rows(calibration, rank, world)


def prune(
    model: nn.Module,
    config: PruneConfig | None = None,
    calibration: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    progress: bool = True,
    stream: BlockStream | None = None,
) -> PruneResult:
    """Prune a Hugging Face causal LM one-shot.

    Args:
        model: a decoder-only transformers model (any family: the block stack is discovered).
        config: method, sparsity/pattern, targets...; defaults to Wanda at 50% unstructured.
        calibration: ``(nsamples, seqlen)`` token ids (see :func:`prunekit.calibration.sample_windows`);
            required by Wanda, optional for magnitude and random (used then to measure errors).
        inplace: prune ``model`` itself; by default a deep copy is pruned and ``model`` is untouched.
        progress: show a progress bar per block.
        stream: for models larger than memory (see :func:`prune_checkpoint`): ``model`` is a skeleton on
            the meta device, pruned in place, whose blocks ``stream`` loads and writes one at a time.

    Called on every rank of an initialised ``torch.distributed`` process group (``torchrun``), with the same
    model, config and calibration on each, the ranks share the work: each takes a contiguous share of the
    calibration windows, every layer's statistics are summed across ranks before it is solved, layer ``i`` is
    solved on rank ``i mod N`` and its weights and mask sent to the others, and every rank returns the same
    model, with all layers' records and one record per rank in ``PruneResult.ranks``.
    """
    config = config or PruneConfig()
    pattern = config.parsed_pattern()
    method = config.build_method()
    refit_steps = config.resolved_refit_steps()
    if config.needs_calibration() and calibration is None:
        if method.needs_activations:
            raise ConfigError(f"method {config.method!r} needs calibration data: pass calibration token ids")
        raise ConfigError(
            "refitting the kept weights needs calibration data: pass calibration token ids or refit_steps=0"
        )
    if config.reconstruct == "block" and calibration is None:
        raise ConfigError(
            "block reconstruction fits the block's outputs on calibration data: pass calibration token ids"
        )
    if calibration is not None and (calibration.dim() != 2 or calibration.numel() == 0):
        raise ConfigError(f"calibration must be a non-empty (nsamples, seqlen) tensor, got {tuple(calibration.shape)}")

    blocks_name, blocks = find_decoder_blocks(model)
    targets = find_targets(model, blocks_name, config.include, config.exclude)
    for target in targets:
        check_pattern_fits(pattern, target.shape[1], target.name)
        if (calibration is not None or stream is not None) and target.block_index is None:
            raise ConfigError(
                f"layer {target.name!r} is outside the decoder blocks, where calibration cannot reach it "
                "(or, with --lazy, that are not streamed): prune it in memory with --method magnitude and no "
                "calibration, or exclude it"
            )
        if stream is None:  # streamed weights are checked as they are loaded
            _check_finite_weight(target, weight_matrix(target.module))

    if not inplace and stream is None:
        model = copy.deepcopy(model)
        blocks_name, blocks = find_decoder_blocks(model)
        targets = find_targets(model, blocks_name, config.include, config.exclude)
    rank, world = rank_and_world()
    if world > 1:
        calibration = _share_the_work(model, config, targets, calibration, stream)
    #: under torch.distributed, the rank that solves each layer (the others receive its result)
    owners = {t.name: i % world for i, t in enumerate(targets)} if calibration is not None else {}
    device = resolve_device(config.device)
    fallback = method_class("magnitude")(MethodConfig())  # for layers no calibration batch reached
    result = PruneResult(model=model)
    meter = MemoryMeter(device)
    started = time.perf_counter()
    patterns: dict[int | None, Pattern] = {}
    masks: dict[int, torch.Tensor] = {}  # module -> keep-mask, for block reconstruction
    after_block = None
    if config.reconstruct == "block":
        after_block = _block_reconstruction(config, targets, masks, result)
    if config.layer_budget == "owl":
        if stream is not None or calibration is None:
            raise ConfigError(
                "layer_budget owl scores every block on calibration activations before pruning: give calibration "
                "data, and prune in memory (not --lazy)"
            )
        result.block_outliers, sizes = block_outlier_shares(
            model,
            blocks_name,
            blocks,
            targets,
            calibration,
            config.owl_outlier_multiple,
            device=device,
            batch_size=config.batch_size,
            progress=progress,
        )
        result.block_sparsity = owl_sparsities(result.block_outliers, sizes, pattern.sparsity, config.owl_max_deviation)
        scope = config.scope or config.method_class().default_scope
        patterns = {b: Unstructured(s, scope) for b, s in result.block_sparsity.items()}
        log.info("OWL block sparsities: %s", {b: round(s, 4) for b, s in result.block_sparsity.items()})

    in_flight: list[Callable[[], None]] = []  # broadcasts of solved layers, finished by settle()
    propagation = config.resolved_propagation()

    def settle() -> None:
        with torch.no_grad():
            while in_flight:
                in_flight.pop(0)()

    def prune_layer(target: Target, inputs: LayerStatistics) -> None:
        owner = owners.get(target.name, rank)
        if owner == rank:
            solve_layer(target, inputs)
        if world == 1 or calibration is None:
            return
        # the owner sends its solved weights and mask, the others receive them; under sequential
        # propagation the layer's forward resumes right away, so wait here; otherwise every rank goes on to
        # solve its next layers of the block while these travel (settle() finishes them before the second pass)
        weight = weight_matrix(target.module)
        if owner != rank:
            masks[id(target.module)] = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        in_flight.append(broadcast_async([weight, masks[id(target.module)]], src=owner))
        if propagation == "sequential":
            settle()

    def solve_layer(target: Target, inputs: LayerStatistics) -> None:
        t0 = time.perf_counter()
        weight = weight_matrix(target.module)
        if stream is not None:
            _check_finite_weight(target, weight)
        chosen: OneShotMethod | None = method
        note = ""
        if target.expert is not None and calibration is not None and inputs.n_tokens < config.expert_min_tokens:
            note = f"{inputs.n_tokens} routed calibration tokens < expert_min_tokens={config.expert_min_tokens}: " + (
                "pruned by magnitude" if config.underused_experts == "magnitude" else "left dense"
            )
            log.warning("expert matrix %s: %s", target.name, note)
            chosen = fallback if config.underused_experts == "magnitude" else None
            inputs = LayerStatistics(None, inputs.n_tokens, inputs.sample)
        elif not inputs.reached and method.needs_activations:
            log.warning("no calibration batch reached %s; pruning it by magnitude", target.name)
            chosen = fallback
        if chosen is None:  # left dense
            mask, new_weight = Mask(torch.ones_like(weight, dtype=torch.bool)), weight
        else:
            stats = inputs if inputs.reached else None
            layer_pattern = patterns.get(target.block_index, pattern)
            pruned = chosen.finalize(LayerTask(target.name, weight, stats, layer_pattern, keep_gram=refit_steps > 0))
            mask, new_weight = pruned.mask, pruned.weight
        if chosen is not None and refit_steps and inputs.gram is not None:
            dampening = DEFAULT_DAMPENING if pruned.dampening is None else pruned.dampening
            gram = inputs.gram.to(weight.device)
            new_weight = refit_kept_weights(weight, new_weight, mask.keep, gram, refit_steps, dampening=dampening)
        error = None
        if inputs.sample is not None and inputs.sample.numel():
            error = relative_reconstruction_error(weight, new_weight, inputs.sample)
        with torch.no_grad():
            weight.copy_(new_weight)
        masks[id(target.module)] = mask.keep
        result.layers.append(
            LayerResult(
                target.name,
                target.block_index,
                target.shape,
                "dense" if chosen is None else chosen.name,
                mask.sparsity,
                error,
                0 if inputs.sample is None else int(inputs.sample.shape[0]),
                time.perf_counter() - t0,
                expert=target.expert,
                calibration_tokens=inputs.n_tokens,
                note=note,
            )
        )

    with meter:
        if calibration is None:
            for index, block in enumerate(blocks):
                if stream is not None:
                    stream.load_block(index, block)
                for target in targets:
                    if target.block_index == index or (index == 0 and target.block_index is None):
                        prune_layer(target, LayerStatistics(None, 0, None))
                if stream is not None:
                    stream.finish_block(index, block)
        else:
            result.calibration_shape = (int(calibration.shape[0]), int(calibration.shape[1]))
            result.blocks = run_sequential(
                model,
                blocks_name,
                blocks,
                targets,
                calibration,
                prune_layer,
                device=device,
                batch_size=config.batch_size,
                sample_tokens=config.sample_tokens,
                offload_activations=config.offload_activations,
                propagation=propagation,
                gram_dtype=method.gram_dtype() if config.needs_hessian() else None,
                stream=stream,
                progress=progress,
                routing_weighted=config.routing_weighted,
                after_block=after_block,
                reduce_statistics=all_reduce_statistics if world > 1 else None,
                settle=settle,
            )
            settle()  # layers no batch reached, pruned after their block's settle
    result.seconds = time.perf_counter() - started
    result.peak_rss_bytes = meter.peak_rss_bytes
    result.peak_device_bytes = meter.peak_device_bytes
    if world > 1 and calibration is not None:  # each rank holds the records of the layers it solved
        mine = {
            "rank": rank,
            "windows": int(calibration.shape[0]),
            "layers_solved": len(result.layers),
            "seconds": result.seconds,
            "peak_rss_bytes": meter.peak_rss_bytes,
            "peak_device_bytes": meter.peak_device_bytes or 0,
            "activation_bytes": max((b.activation_bytes for b in result.blocks), default=0),
        }
        gathered = all_gather_objects((mine, result.layers))
        result.ranks = [record for record, _ in gathered]
        result.layers = [layer for _, layers in gathered for layer in layers]
        result.calibration_shape = (sum(r["windows"] for r in result.ranks), int(calibration.shape[1]))
    order = {t.name: i for i, t in enumerate(targets)}
    result.layers.sort(key=lambda r: order[r.name])
    log.info(
        "pruned %d layers to %.2f%% sparsity in %.1f s",
        len(result.layers),
        100 * result.overall_sparsity,
        result.seconds,
    )
    return result
