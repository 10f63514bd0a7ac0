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

import inspect
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunekit.calibration.data import model_max_context
from prunekit.core.devices import device_of, dtype_of, synchronize
from prunekit.core.errors import ConfigError, PrunekitError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import find_targets, weight_matrix

log = logging.getLogger(__name__)

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
# (row multiple, column multiple) of a weight that both semi-structured backends accept, per dtype.
SEMI_STRUCTURED_TILE = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}
MIN_CAPABILITY = (8, 0)

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
class PhaseTiming:
    """Timed repeats of one phase (prefill or decode) and the tokens/s they give."""

    tokens: int
    """Tokens per timed run: ``batch_size * prompt_tokens`` (prefill) or ``batch_size * new_tokens`` (decode)."""
    warmup: int
    repeats: int
    seconds: tuple[float, ...]
    median_s: float
    min_s: float
    max_s: float
    tokens_per_s: float
    """``tokens / median_s``."""
    spread: float
    """``(max_s - min_s) / median_s``: 0.05 means the timed runs lay within 5% of the median's size."""


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
class SemiStructuredResult:
    """Which linear layers were converted to 2:4 semi-structured tensors, why others were not, new timings."""

    converted: tuple[str, ...]
    skipped: dict[str, str]
    """Layer name -> the reason it stayed dense."""
    prefill: PhaseTiming | None
    decode: PhaseTiming | None
    max_abs_logit_diff: float | None
    """Largest difference of the prompt's next-token logits, converted vs dense storage (a sanity check)."""


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


def seconds_per_call(call: Callable[[], Any], device: torch.device, calls: int = 1) -> float:
    """Wall seconds per call over ``calls`` back-to-back calls of ``call``, ``device`` synchronised before
    and after (the timing loop that the structural report and the latency table share)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def check_speed_args(
    model: nn.Module | None,
    batch_size: int,
    prompt_tokens: int,
    new_tokens: int = 0,
    warmup: int = 0,
    repeats: int = 1,
) -> None:
    """Refuse settings that cannot be measured, naming the fix (:class:`~prunekit.core.errors.ConfigError`).

    ``model=None`` checks everything but the model's context length (for a check before loading).
    """
    for name, value, least in (
        ("batch_size (--batch-size)", batch_size, 1),
        ("prompt_tokens (--prompt-tokens)", prompt_tokens, 1),
        ("new_tokens (--new-tokens)", new_tokens, 0),
        ("warmup (--warmup)", warmup, 0),
        ("repeats (--repeats)", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    context = model_max_context(getattr(model, "config", None))
    if context is not None and prompt_tokens + new_tokens > context:
        raise ConfigError(
            f"a prompt of {prompt_tokens} tokens plus {new_tokens} new tokens is longer than the model's context "
            f"of {context} tokens: lower --prompt-tokens or --new-tokens so they sum to {context} or less"
        )


def random_prompt(model: nn.Module, batch_size: int, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    """``(batch_size, prompt_tokens)`` token ids drawn uniformly from the vocabulary with a seeded generator."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ConfigError(f"cannot tell the vocabulary size of {type(model).__name__}: it needs input embeddings")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(vocab), (batch_size, prompt_tokens), generator=generator)
    return ids.to(device_of(model))


def _forward_kwargs(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The name of the cache argument (``cache`` in recent transformers, else ``past_key_values``) and
    ``logits_to_keep=1`` where the model accepts it."""
    params = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return cache_name, extra


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _prefill(model: nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """One forward over ``ids`` that builds the KV cache; returns (cache, next-token logits)."""
    _, extra = _forward_kwargs(model)
    out = model(input_ids=ids, use_cache=True, **extra)
    return _cache_of(out), out.logits[:, -1, :]


def _decode_steps(model: nn.Module, cache: Any, first: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` one-token greedy steps starting from token ``first`` (batch, 1); returns the new tokens."""
    cache_name, extra = _forward_kwargs(model)
    token = first
    produced = []
    for _ in range(new_tokens):
        kwargs = {cache_name: cache} if cache is not None else {}
        out = model(input_ids=token, use_cache=True, **kwargs, **extra)
        cache = _cache_of(out)
        token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        produced.append(token)
    return torch.cat(produced, dim=1)


def _decode_run(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Prefill all but the last prompt token (untimed), then time ``new_tokens`` decode steps."""
    device = ids.device
    cache = _prefill(model, ids[:, :-1])[0] if ids.shape[1] > 1 else None
    synchronize(device)
    started = time.perf_counter()
    generated = _decode_steps(model, cache, ids[:, -1:], new_tokens)
    synchronize(device)
    return time.perf_counter() - started, torch.cat([ids, generated], dim=1)


def _static_step(model: nn.Module, token: torch.Tensor, cache: Any, position: torch.Tensor) -> torch.Tensor:
    """One decode step on a static cache: the next-token logits ``(batch, vocab)``."""
    cache_name, extra = _forward_kwargs(model)
    out = model(input_ids=token, position_ids=position, use_cache=True, **{cache_name: cache}, **extra)
    return out.logits[:, -1, :]


def _decode_run_static(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, step: Callable[..., torch.Tensor]
) -> tuple[float, torch.Tensor]:
    """:func:`_decode_run` on a fresh ``transformers.StaticCache``, each step through ``step`` (compiled)."""
    from transformers import StaticCache

    device = ids.device
    known = ids.shape[1] - 1
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
    batch = ids.shape[0]
    if known:
        cache_name, extra = _forward_kwargs(model)
        positions = torch.arange(known, device=device).expand(batch, known)
        model(input_ids=ids[:, :-1], position_ids=positions, use_cache=True, **{cache_name: cache}, **extra)
    token = ids[:, -1:]
    produced = []
    synchronize(device)
    started = time.perf_counter()
    for i in range(new_tokens):
        position = torch.full((batch, 1), known + i, device=device)
        token = step(model, token, cache, position).argmax(dim=-1, keepdim=True)
        produced.append(token)
    synchronize(device)
    return time.perf_counter() - started, torch.cat([ids, *produced], dim=1)


def compiled_decode_step() -> Callable[..., torch.Tensor]:
    """The decode step under :func:`torch.compile` (static shapes); dynamo compiles it once per model."""
    return torch.compile(_static_step, dynamic=False)


def greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The prompt followed by exactly ``new_tokens`` greedy tokens per sequence, generated as timed by
    :func:`measure_decode` (KV cache, one token per step, no stop at EOS)."""
    with torch.inference_mode():
        return _decode_run(model, prompt, new_tokens)[1]


def phase_timing(seconds: list[float], tokens: int, warmup: int) -> PhaseTiming:
    """Summarise timed runs of ``tokens`` tokens each (median, min, max, spread, tokens/s); also for pooling
    runs taken in rounds, interleaved with other models, as ``bench/bench_speed.py`` does."""
    median = statistics.median(seconds)
    lo, hi = min(seconds), max(seconds)
    return PhaseTiming(
        tokens=tokens,
        warmup=warmup,
        repeats=len(seconds),
        seconds=tuple(seconds),
        median_s=median,
        min_s=lo,
        max_s=hi,
        tokens_per_s=tokens / median if median > 0 else float("inf"),
        spread=(hi - lo) / median if median > 0 else 0.0,
    )


def _repeat(run: Callable[[], float], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeats)]


def measure_prefill(
    model: nn.Module,
    batch_size: int = 1,
    prompt_tokens: int = 128,
    *,
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
) -> PhaseTiming:
    """Time one forward pass over a random ``(batch_size, prompt_tokens)`` prompt (see the module docstring)."""
    check_speed_args(model, batch_size, prompt_tokens, 0, warmup, repeats)
    ids = random_prompt(model, batch_size, prompt_tokens, seed)
    device = ids.device

    def run() -> float:
        synchronize(device)
        started = time.perf_counter()
        _prefill(model, ids)
        synchronize(device)
        return time.perf_counter() - started

    with torch.inference_mode():
        seconds = _repeat(run, warmup, repeats)
    return phase_timing(seconds, batch_size * prompt_tokens, warmup)


def measure_decode(
    model: nn.Module,
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    *,
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
    compiled: bool = False,
) -> PhaseTiming:
    """Time greedy generation of ``new_tokens`` tokens per sequence after a random prompt (see the module
    docstring: only the one-token decode steps are timed; ``compiled``: static cache and
    :func:`torch.compile`, the first warm-up run compiling)."""
    check_speed_args(model, batch_size, prompt_tokens, new_tokens, warmup, repeats)
    if new_tokens < 1:
        raise ConfigError(f"new_tokens (--new-tokens) must be >= 1 to measure decoding, got {new_tokens}")
    if compiled and warmup < 1:
        raise ConfigError("compiled decoding needs warmup >= 1: the first run compiles the model")
    if compiled and "position_ids" not in inspect.signature(model.forward).parameters:
        raise ConfigError(
            f"{type(model).__name__} takes no position_ids: compiled decoding needs a transformers decoder "
            "that runs on a static KV cache; measure it with compiled=False"
        )
    ids = random_prompt(model, batch_size, prompt_tokens, seed)
    step = compiled_decode_step() if compiled else None

    def run() -> float:
        if step is not None:
            return _decode_run_static(model, ids, new_tokens, step)[0]
        return _decode_run(model, ids, new_tokens)[0]

    with torch.inference_mode():
        seconds = _repeat(run, warmup, repeats)
    return phase_timing(seconds, batch_size * new_tokens, warmup)


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


def semi_structured_unsupported(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why 2:4 semi-structured kernels cannot run here (problem and fix), or ``None`` when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (
            f"semi-structured (2:4) sparse kernels need a CUDA GPU of compute capability >= 8.0, and the model "
            f"is on {device.type}: run on such a GPU (--device cuda) or drop --semi-structured"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (
            f"semi-structured (2:4) sparse kernels need compute capability >= 8.0 (Ampere or newer), this GPU "
            f"has {capability[0]}.{capability[1]}: use a newer GPU or drop --semi-structured"
        )
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return (
            f"semi-structured (2:4) sparse kernels take float16 or bfloat16 weights, the model is "
            f"{str(dtype).removeprefix('torch.')}: load it with --dtype float16 or --dtype bfloat16"
        )
    return None


def _is_two_of_four(weight: torch.Tensor) -> bool:
    out_features, in_features = weight.shape
    groups = (weight != 0).reshape(out_features, in_features // 4, 4)
    return bool(groups.sum(dim=-1).max() <= 2)


def semi_structured_plan(model: nn.Module) -> dict[str, str | None]:
    """For every linear map of the model: ``None`` if its weight can be converted to a 2:4 semi-structured
    tensor, else the reason it cannot (dtype, shape, not 2:4, Conv1D, tied). Checks only the weights, not
    the device (see :func:`semi_structured_unsupported`)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    plan: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            plan[name] = "GPT-2-style Conv1D stores its weight transposed: only nn.Linear weights are converted"
            continue
        else:
            continue
        rows, cols = weight.shape
        if weight.dtype not in SEMI_STRUCTURED_TILE:
            plan[name] = f"dtype {str(weight.dtype).removeprefix('torch.')}: only float16/bfloat16 are converted"
        elif owners.get(id(module.weight), 0) > 1:
            plan[name] = "its weight is shared with another module (tied embeddings)"
        elif rows % SEMI_STRUCTURED_TILE[weight.dtype][0] or cols % SEMI_STRUCTURED_TILE[weight.dtype][1]:
            row_tile, col_tile = SEMI_STRUCTURED_TILE[weight.dtype]
            plan[name] = f"shape ({rows}, {cols}) is not a multiple of ({row_tile}, {col_tile})"
        elif not _is_two_of_four(weight):
            plan[name] = "weight is not 2:4 sparse (a group of 4 inputs keeps more than 2): prune with --pattern 2:4"
        else:
            plan[name] = None
    return plan


def _convert_semi_structured(
    model: nn.Module, plan: dict[str, str | None]
) -> tuple[list[str], dict[str, str], dict[str, nn.Parameter]]:
    """Swap eligible weights for semi-structured tensors in place; returns converted, skipped, originals."""
    from torch.sparse import to_sparse_semi_structured

    converted: list[str] = []
    skipped = {name: reason for name, reason in plan.items() if reason is not None}
    originals: dict[str, nn.Parameter] = {}
    for name, reason in plan.items():
        if reason is not None:
            continue
        module = model.get_submodule(name)
        try:
            sparse = to_sparse_semi_structured(module.weight.detach().contiguous())
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            skipped[name] = f"to_sparse_semi_structured refused it: {exc}"
            continue
        originals[name] = module.weight
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return converted, skipped, originals


def _restore(model: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    for name, weight in originals.items():
        model.get_submodule(name).weight = weight


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
            _measure_semi_structured(model, batch_size, prompt_tokens, new_tokens, phases) if semi_structured else None
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


def _measure_semi_structured(
    model: nn.Module, batch_size: int, prompt_tokens: int, new_tokens: int, phases: dict[str, int]
) -> SemiStructuredResult:
    plan = semi_structured_plan(model)
    probe = random_prompt(model, 1, prompt_tokens, phases["seed"])
    with torch.inference_mode():
        reference = _prefill(model, probe)[1].float()
    converted, skipped, originals = _convert_semi_structured(model, plan)
    log.info("semi-structured: %d linear layers converted, %d left dense", len(converted), len(skipped))
    if not converted:
        log.warning("no linear layer could be converted to 2:4 semi-structured: %s", skipped)
        return SemiStructuredResult((), skipped, None, None, None)
    try:
        with torch.inference_mode():
            diff = float((_prefill(model, probe)[1].float() - reference).abs().max())
        prefill = measure_prefill(model, batch_size, prompt_tokens, **phases)
        decode = measure_decode(model, batch_size, prompt_tokens, new_tokens, **phases)
    finally:
        _restore(model, originals)
    return SemiStructuredResult(tuple(converted), skipped, prefill, decode, diff)


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
