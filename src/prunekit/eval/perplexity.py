"""Perplexity as in the Wanda/SparseGPT papers: tokenize the text once, split it into non-overlapping
windows of ``seqlen`` tokens, ``ppl = exp(mean token NLL)`` over every predicted token of every window.

The NLL is computed in row chunks so the float32 log-softmax over a large vocabulary never doubles the
logits' memory.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibration.data import load_text_tokens, model_max_context
from prunekit.core.errors import CalibrationError

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity and exactly what it was measured on."""

    perplexity: float
    windows: int
    seqlen: int
    tokens_scored: int
    seconds: float
    source: str = ""


def _chunked_nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        part = logits[start : start + chunk].float()
        total += nn.functional.cross_entropy(part, targets[start : start + chunk], reduction="sum").double()
    return total


def check_eval_seqlen(seqlen: int, context: int | None) -> None:
    """Refuse evaluation windows longer than the model's context."""
    if context is not None and seqlen > context:
        raise CalibrationError(
            f"perplexity seqlen {seqlen} is longer than the model's context of {context}: "
            f"use --ppl-seqlen {context} or less"
        )


@torch.no_grad()
def perplexity_of_tokens(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    source: str = "",
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token tensor, over ``floor(len / seqlen)`` windows (or fewer).

    ``device``: where to run; the model is moved there for the measurement and back afterwards
    (default: where the model is).
    """
    check_eval_seqlen(seqlen, model_max_context(getattr(model, "config", None)))
    if not isinstance(seqlen, int) or seqlen < 2:
        raise CalibrationError(
            f"perplexity seqlen must be a whole number of at least 2 tokens, got {seqlen!r}: use e.g. --ppl-seqlen 2048"
        )
    if max_windows is not None and max_windows < 1:
        raise CalibrationError(f"max_windows must be positive, got {max_windows!r}: omit it to use every window")
    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise CalibrationError(
            f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}: use a longer "
            "text or a shorter --ppl-seqlen"
        )
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.to(device).eval()
    started = time.perf_counter()
    nll = torch.zeros((), dtype=torch.float64)
    try:
        for w in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress):
            ids = tokens[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0]
            nll += _chunked_nll_sum(logits[:-1], ids[0, 1:]).cpu()
            del logits
    finally:
        model.to(home).train(was_training)
    scored = windows * (seqlen - 1)
    value = math.exp(float(nll) / scored)
    return PerplexityResult(value, windows, seqlen, scored, time.perf_counter() - started, source)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a text file (e.g. ``wikitext2_test.txt``); see :func:`perplexity_of_tokens`."""
    check_eval_seqlen(seqlen, model_max_context(getattr(model, "config", None)))
    tokens = load_text_tokens(tokenizer, path, what="evaluation")
    return perplexity_of_tokens(model, tokens, seqlen, max_windows, device, progress, str(path))
