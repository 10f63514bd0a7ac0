"""Training a small causal LM from scratch for the benchmarks that need a model family no checkpoint here
has (no hub downloads): AdamW, linear warm-up then cosine decay to 5% of the rate, gradient clipping at 1,
random windows of a token stream, seeded."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("tiny_lm")


def train_causal_lm(
    model: torch.nn.Module, tokens: torch.Tensor, steps: int, batch: int, seqlen: int, lr: float, seed: int = 0
) -> tuple[list[float], float]:
    """Train ``model`` in place on ``steps`` batches of ``batch`` random ``seqlen``-token windows of the 1-D
    ``tokens``; returns the losses and the seconds taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    started = time.perf_counter()
    model.train()
    losses: list[float] = []
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        starts = torch.randint(0, tokens.numel() - seqlen - 1, (batch,), generator=generator)
        ids = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f (%.0f s)", step, steps, losses[-1], time.perf_counter() - started)
    model.eval()
    return losses, time.perf_counter() - started


def record_training(out: Path, info: dict[str, Any], test_text: Path, ppl_seqlen: int, ppl_windows: int) -> None:
    """Load the model saved in ``out``, add its dense perplexity on ``test_text`` to ``info``, and write
    ``out/training.json`` (the mark that the model is trained and may be reused); prints it."""
    from prunekit.eval.perplexity import perplexity
    from prunekit.io.loading import load_model

    loaded = load_model(str(out))
    result = perplexity(loaded.model, loaded.tokenizer, str(test_text), ppl_seqlen, ppl_windows, progress=False)
    info = {**info, "dense_perplexity": result.perplexity, "ppl_windows": result.windows, "ppl_seqlen": result.seqlen}
    (out / "training.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
