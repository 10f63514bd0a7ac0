"""Prefill and greedy decoding of a causal LM (eager, static cache, compiled), timed phase by phase."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.calibration.data import model_max_context
from prunekit.core.devices import device_of, synchronize
from prunekit.core.errors import ConfigError
from prunekit.eval.speed.timing import PhaseTiming, _repeat, phase_timing

log = logging.getLogger(__name__)


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
