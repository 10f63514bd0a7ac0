"""How fast a (pruned) causal LM really runs: prefill and decode tokens per second, and its size.

Pruning zeroes weights but leaves them in dense tensors. Dense matmul kernels multiply the zeros like any
other number, so a 50% sparse checkpoint is exactly as slow as the dense one unless something runs it on a
sparse kernel. This module measures instead of assuming:

* **prefill**: one forward pass over a ``(batch_size, prompt_tokens)`` prompt that builds the KV cache and
  returns the next-token logits (``logits_to_keep=1`` where the model takes it, as ``generate`` does);
  tokens/s counts ``batch_size * prompt_tokens``.
* **decode**: greedy generation of ``new_tokens`` tokens per sequence with the KV cache: the prompt minus
  its last token is prefilled (not timed), then ``new_tokens`` one-token forward passes are timed, the first
  one fed the last prompt token; each yields one new token, so the output is exactly
  ``prompt_tokens + new_tokens`` long (the same tokens as ``model.generate(do_sample=False,
  min_new_tokens=G, max_new_tokens=G)``). Tokens/s counts ``batch_size * new_tokens``.

With ``compiled=True`` decoding runs the way transformers recommends for fast generation: a static KV cache
(``transformers.StaticCache``, sized ``prompt_tokens + new_tokens``) and the one-token step under
:func:`torch.compile` with static shapes, which removes most of Python's per-layer overhead (what remains is the
kernels and the memory traffic). The first warm-up run compiles (once per model); the
tokens are the same as those of the eager path.

Every phase runs ``warmup`` untimed times, then ``repeats`` timed times; the median gives the tokens/s and
``spread = (max - min) / median`` says how steady the timings were. Prompts are random token ids from a
seeded generator (no tokenizer needed). Runs are under :func:`torch.inference_mode`; on CUDA the device is
synchronised before each clock read.

On CUDA GPUs of compute capability 8.0 or newer, 2:4 sparse ``nn.Linear`` weights in float16/bfloat16 can
be converted with :func:`torch.sparse.to_sparse_semi_structured` (``semi_structured=True``), which makes
``F.linear`` run on sparse tensor-core kernels (cuSPARSELt or CUTLASS). Only the weight operand can be
sparse, and its shape must be a multiple of the backend's tile: for float16/bfloat16 the stricter of the two
backends (CUTLASS) needs rows a multiple of 32 and columns a multiple of 64 (``_DTYPE_SHAPE_CONSTRAINTS`` in
``torch/sparse/semi_structured.py``). Layers that do not qualify stay dense, and the result says why.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunekit.core.devices import device_of, dtype_of
from prunekit.core.errors import ConfigError, PrunekitError
from prunekit.eval.speed.decode import check_speed_args, measure_decode, measure_prefill
from prunekit.eval.speed.semi_structured import (
    SemiStructuredResult,
    measure_semi_structured,
    semi_structured_unsupported,
)
from prunekit.eval.speed.timing import PhaseTiming
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import find_targets, weight_matrix

log = logging.getLogger(__name__)


CPU_NOTE = (
    "CPU: stock PyTorch has no CPU kernels that skip zero weights, neither unstructured nor 2:4, so a pruned "
    "model runs the same dense matmuls as the dense one and equal speed is expected. What pruning buys here "
    "is size: see the non-zero parameter count, which a sparse storage format or a sparse runtime is needed "
    "to turn into bytes or speed."
)
CUDA_DENSE_NOTE = (
    "CUDA: dense kernels do not skip zero weights, so a pruned model stored densely runs at dense speed. Only "
    "2:4 weights converted to semi-structured tensors (semi_structured=True / --semi-structured; "
    "float16/bfloat16, compute capability >= 8.0) run on sparse kernels."
)
SEMI_STRUCTURED_NOTE = (
    "semi-structured: {converted} of {total} linear layers run on 2:4 sparse kernels. The dense operand is "
    "padded to the kernel's tile, so small batches (decode at batch 1) may gain little or even lose."
)


@dataclass(frozen=True)
class SizeStats:
    """Parameter counts: how many there are, how many are non-zero, and what they take stored densely."""

    parameters: int
    """Every parameter of the model, tied ones counted once."""
    nonzero_parameters: int
    dense_bytes: int
    """Bytes of all parameters in dense storage: what the checkpoint and memory hold today."""
    nonzero_value_bytes: int
    """Bytes of the non-zero values alone, before the index or bitmask any sparse format adds."""
    target_parameters: int
    """Weights of the linear maps inside the decoder blocks (what ``prune`` targets by default)."""
    target_nonzeros: int
    target_sparsity: float


@dataclass(frozen=True)
class SpeedResult:
    """Prefill and decode speed of one model, the setting they were measured in, and its size."""

    device: str
    dtype: str
    threads: int
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    seed: int
    prefill: PhaseTiming
    decode: PhaseTiming
    size: SizeStats
    semi_structured: SemiStructuredResult | None
    note: str
    #: Whether decoding ran compiled on a static KV cache (:func:`measure_decode` with ``compiled=True``).
    compiled_decode: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class SpeedComparison:
    """A dense and a pruned model measured alike; ratios are pruned / dense (> 1: the pruned one is faster)."""

    dense: SpeedResult
    pruned: SpeedResult
    prefill_speedup: float
    decode_speedup: float
    semi_structured_prefill_speedup: float | None
    semi_structured_decode_speedup: float | None
    nonzero_ratio: float
    """Non-zero parameters of the pruned model / of the dense one."""
    note: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


def size_stats(model: nn.Module) -> SizeStats:
    """Count parameters and non-zeros (tied parameters once), and those of the default prune targets."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared parameter once
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in params)
    dense_bytes = sum(p.numel() * p.element_size() for p in params)
    value_bytes = sum(int(torch.count_nonzero(p.detach())) * p.element_size() for p in params)
    target_total = target_nonzero = 0
    try:
        blocks_name, _ = find_decoder_blocks(model)
        targets = find_targets(model, blocks_name)
    except PrunekitError as exc:
        log.debug("no decoder-block targets to count: %s", exc)
        targets = []
    for target in targets:
        weight = weight_matrix(target.module)
        target_total += weight.numel()
        target_nonzero += int(torch.count_nonzero(weight))
    return SizeStats(
        parameters=total,
        nonzero_parameters=nonzero,
        dense_bytes=dense_bytes,
        nonzero_value_bytes=value_bytes,
        target_parameters=target_total,
        target_nonzeros=target_nonzero,
        target_sparsity=1.0 - target_nonzero / target_total if target_total else 0.0,
    )


def _note(device: torch.device, semi: SemiStructuredResult | None) -> str:
    if device.type == "cpu":
        return CPU_NOTE
    if device.type == "cuda":
        if semi is None:
            return CUDA_DENSE_NOTE
        total = len(semi.converted) + len(semi.skipped)
        return SEMI_STRUCTURED_NOTE.format(converted=len(semi.converted), total=total)
    return f"{device.type}: stock PyTorch has no kernels here that skip zero weights; equal speed is expected."


def measure_speed(
    model: nn.Module,
    *,
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
    semi_structured: bool = False,
    compiled_decode: bool = False,
) -> SpeedResult:
    """Measure prefill and decode tokens/s of ``model`` where its weights are, and count its non-zeros;
    ``compiled_decode`` times decoding on a static KV cache under :func:`torch.compile`.

    With ``semi_structured=True`` (CUDA, compute capability >= 8.0, float16/bfloat16 only, else
    :class:`~prunekit.core.errors.ConfigError`), eligible 2:4 ``nn.Linear`` weights are then converted with
    :func:`torch.sparse.to_sparse_semi_structured`, both phases are measured again, and the dense weights are
    put back before returning. The model is run in eval mode; its previous mode is restored.
    """
    check_speed_args(model, batch_size, prompt_tokens, new_tokens, warmup, repeats)
    if new_tokens < 1:
        raise ConfigError(f"new_tokens (--new-tokens) must be >= 1 to measure decoding, got {new_tokens}")
    device, dtype = device_of(model), dtype_of(model)
    if semi_structured:
        reason = semi_structured_unsupported(device, dtype)
        if reason:
            raise ConfigError(reason)
    was_training = model.training
    model.eval()
    try:
        size = size_stats(model)
        phases = {"warmup": warmup, "repeats": repeats, "seed": seed}
        log.info("prefill: %d x %d tokens, %d warm-up + %d timed", batch_size, prompt_tokens, warmup, repeats)
        prefill = measure_prefill(model, batch_size, prompt_tokens, **phases)
        log.info("decode: %d x %d new tokens, %d warm-up + %d timed", batch_size, new_tokens, warmup, repeats)
        decode = measure_decode(model, batch_size, prompt_tokens, new_tokens, **phases, compiled=compiled_decode)
        semi = (
            measure_semi_structured(model, batch_size, prompt_tokens, new_tokens, phases) if semi_structured else None
        )
    finally:
        model.train(was_training)
    return SpeedResult(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        seed=seed,
        prefill=prefill,
        decode=decode,
        size=size,
        semi_structured=semi,
        note=_note(device, semi),
        compiled_decode=compiled_decode,
    )


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def compare_results(dense: SpeedResult, pruned: SpeedResult) -> SpeedComparison:
    """Ratios pruned / dense of two measurements taken alike (refuses different settings)."""
    setting = ("device", "batch_size", "prompt_tokens", "new_tokens")
    different = [k for k in setting if getattr(dense, k) != getattr(pruned, k)]
    if different:
        raise ConfigError(f"the two measurements differ in {', '.join(different)}: measure both models alike")
    semi = pruned.semi_structured
    semi_prefill = _ratio(semi.prefill.tokens_per_s, dense.prefill.tokens_per_s) if semi and semi.prefill else None
    semi_decode = _ratio(semi.decode.tokens_per_s, dense.decode.tokens_per_s) if semi and semi.decode else None
    return SpeedComparison(
        dense=dense,
        pruned=pruned,
        prefill_speedup=_ratio(pruned.prefill.tokens_per_s, dense.prefill.tokens_per_s),
        decode_speedup=_ratio(pruned.decode.tokens_per_s, dense.decode.tokens_per_s),
        semi_structured_prefill_speedup=semi_prefill,
        semi_structured_decode_speedup=semi_decode,
        nonzero_ratio=_ratio(pruned.size.nonzero_parameters, dense.size.nonzero_parameters),
        note=pruned.note,
    )


def compare_speed(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    *,
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
    semi_structured: bool = False,
) -> SpeedComparison:
    """Measure a dense model and its pruned version alike (same prompts) and return both with the ratios.

    ``semi_structured`` applies to the pruned model only (dense weights are not 2:4).
    """
    common = {
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "seed": seed,
    }
    # validate both before the slow part
    check_speed_args(dense_model, batch_size, prompt_tokens, new_tokens, warmup, repeats)
    check_speed_args(pruned_model, batch_size, prompt_tokens, new_tokens, warmup, repeats)
    if semi_structured:
        reason = semi_structured_unsupported(device_of(pruned_model), dtype_of(pruned_model))
        if reason:
            raise ConfigError(reason)
    dense = measure_speed(dense_model, **common)
    pruned = measure_speed(pruned_model, **common, semi_structured=semi_structured)
    return compare_results(dense, pruned)
