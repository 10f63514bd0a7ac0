"""GGUF files run in llama.cpp (through ``llama-cpp-python``, the optional extra ``prunekit[llamacpp]``): logits
for checking an export against PyTorch, and prefill and decode tokens/s for ``prunekit bench-speed --runtime
llamacpp``, several models timed in interleaved rounds so that a drift of the machine falls on all of them."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.core.errors import ConfigError, ModelLoadError
from prunekit.eval.speed.timing import PhaseTiming, phase_timing

log = logging.getLogger(__name__)

INSTALL = "pip install 'prunekit[llamacpp]' (it builds llama.cpp from source with the C++ compiler here)"


def llama_cpp_available() -> bool:
    """Whether ``llama-cpp-python`` can be imported."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def open_gguf(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    context: int = 512,
    logits_all: bool = False,
    float32_cache: bool = False,
) -> Any:
    """A ``llama_cpp.Llama`` on the GGUF file ``path``, quiet, on ``threads`` CPU threads (all cores by default),
    its key/value cache in float16 as llama.cpp's default (``float32_cache``: float32, for exact comparisons)."""
    if not llama_cpp_available():
        raise ConfigError(f"running GGUF files in llama.cpp needs llama-cpp-python: {INSTALL}")
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} not found: check the path")
    try:
        return Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=context,
            n_threads=threads or os.cpu_count() or 1,
            n_threads_batch=threads or os.cpu_count() or 1,
            logits_all=logits_all,
            verbose=False,
            **({"type_k": 0, "type_v": 0} if float32_cache else {}),  # GGML_TYPE_F32
        )
    except ValueError as exc:  # llama-cpp-python's word for "llama.cpp refused the file"
        raise ModelLoadError(f"llama.cpp could not load {str(path)!r}: {exc}") from None


def llamacpp_logits(path: str | os.PathLike[str], token_ids: list[int], *, threads: int | None = None) -> np.ndarray:
    """The logits llama.cpp computes for every position of ``token_ids``, ``(len(token_ids), vocab)`` float32,
    with a float32 key/value cache (llama.cpp's default float16 cache alone moves logits by ~1e-3)."""
    model = open_gguf(path, threads=threads, context=max(len(token_ids), 8), logits_all=True, float32_cache=True)
    try:
        model.eval(list(token_ids))
        return np.array(model.scores[: len(token_ids)], dtype=np.float32)
    finally:
        model.close()


@dataclass(frozen=True)
class LlamaCppSpeed:
    """Prefill and decode tokens/s of one GGUF file in llama.cpp at batch 1."""

    path: str
    bytes: int
    threads: int
    prompt_tokens: int
    new_tokens: int
    prefill: PhaseTiming
    decode: PhaseTiming

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_round(model: Any, prompt: list[int], decode: list[int]) -> tuple[float, float]:
    model.reset()
    start = time.perf_counter()
    model.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for token in decode:
        model.eval([token])
    return prefill, time.perf_counter() - start


def measure_llamacpp(
    paths: list[str | os.PathLike[str]],
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
) -> list[LlamaCppSpeed]:
    """Time prefill (``prompt_tokens`` at once) and decode (``new_tokens`` single-token steps on the cache) of
    every file in ``paths``, in ``warmup + repeats`` rounds that visit the files in turn; the same seeded token
    ids for all (drawn below the smallest vocabulary). Medians and spreads over the timed rounds."""
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("prompt and new tokens and repeats must be >= 1, warmup >= 0")
    threads = threads or os.cpu_count() or 1
    models = [open_gguf(path, threads=threads, context=prompt_tokens + new_tokens) for path in paths]
    try:
        vocab = min(model.n_vocab() for model in models)
        ids = np.random.default_rng(seed).integers(0, vocab, prompt_tokens + new_tokens).tolist()
        prompt, decode = ids[:prompt_tokens], ids[prompt_tokens:]
        times: list[list[tuple[float, float]]] = [[] for _ in models]
        for round_index in range(warmup + repeats):
            for model, record in zip(models, times, strict=True):
                measured = _one_round(model, prompt, decode)
                if round_index >= warmup:
                    record.append(measured)
    finally:
        for model in models:
            model.close()
    return [
        LlamaCppSpeed(
            path=str(path),
            bytes=Path(path).stat().st_size,
            threads=threads,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            prefill=phase_timing([p for p, _ in record], prompt_tokens, warmup),
            decode=phase_timing([d for _, d in record], new_tokens, warmup),
        )
        for path, record in zip(paths, times, strict=True)
    ]
