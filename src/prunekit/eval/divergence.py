"""How far a model's next-token distribution is from a reference model's on the same tokens: the mean per-token
``KL(p_reference || p_model)`` (the objective of the Týr-the-Pruner width search, Li et al. 2025, Sec. 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_kl(reference_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(p || q)`` with ``log p`` = ``reference_logprobs`` and ``q = softmax(logits)``, both
    ``(..., vocab)``; returns ``(...)`` in float32."""
    if reference_logprobs.shape != logits.shape:
        raise ValueError(f"reference {tuple(reference_logprobs.shape)} and logits {tuple(logits.shape)} differ")
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = reference_logprobs.float()
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class ReferenceOutputs:
    """The next-token log-probabilities of a reference model on ``(n, seqlen)`` token ``windows``, computed once
    and kept (``n x seqlen x vocab`` floats), to score other models by :meth:`kl`."""

    def __init__(self, reference: nn.Module, windows: torch.Tensor, *, batch_size: int = 1) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.device = next(reference.parameters()).device
        with torch.no_grad():
            self.logprobs = [
                F.log_softmax(reference(input_ids=batch.to(self.device), use_cache=False).logits.float(), dim=-1)
                for batch in self._batches()
            ]

    def _batches(self) -> list[torch.Tensor]:
        return [self.windows[i : i + self.batch_size] for i in range(0, len(self.windows), self.batch_size)]

    def kl(self, model: nn.Module) -> float:
        """Mean per-token ``KL(p_reference || p_model)`` over the windows."""
        total, count = 0.0, 0
        with torch.no_grad():
            for batch, reference in zip(self._batches(), self.logprobs, strict=True):
                kl = token_kl(reference, model(input_ids=batch.to(self.device), use_cache=False).logits)
                total += float(kl.double().sum())
                count += kl.numel()
        return total / max(1, count)
