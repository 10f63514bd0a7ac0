"""The SparseGPT method object and its options; the solver is :mod:`prunekit.methods.sparsegpt.solver`."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from prunekit.core.masks import Mask
from prunekit.core.patterns import NM, Pattern
from prunekit.methods.base import LayerTask, MethodConfig, OneShotMethod, Pruned
from prunekit.methods.registry import register_method
from prunekit.methods.sparsegpt.solver import inverse_hessian, sparsegpt_prune


class SparseGPTConfig(MethodConfig):
    """SparseGPT's options (Frantar & Alistarh 2023, Sec. 3.3 and 3.4)."""

    dampening: float = Field(
        0.01, ge=0, description="sparsegpt: added to the Hessian diagonal, as a fraction of its mean"
    )
    block_size: int = Field(128, gt=0, description="sparsegpt: columns per lazy-update block")
    hessian_dtype: Literal["float32", "float64"] = Field(
        "float32", description="sparsegpt: dtype the Hessian (and the refit's) is accumulated and inverted in"
    )


@register_method
class SparseGPT(OneShotMethod):
    name = "sparsegpt"
    summary = "OBS mask + weight update from H = X X^T (Frantar & Alistarh 2023, Alg. 1)"
    config_class = SparseGPTConfig
    needs_activations = True
    needs_gram = True
    default_scope = "layer"
    #: Four refit steps cut SparseGPT's perplexity on SmolLM2-135M from 41.17 to 37.32 at 2:4 and from 27.48 to
    #: 26.00 at 50%, for 12-27% more pruning time (BENCHMARKS.md, "SparseGPT on SmolLM2-135M-Instruct").
    default_refit_steps = 4
    config: SparseGPTConfig

    @classmethod
    def check(cls, config: MethodConfig, pattern: Pattern) -> None:
        assert isinstance(config, SparseGPTConfig)
        if isinstance(pattern, NM) and config.block_size % pattern.m:
            raise ValueError(
                f"block_size {config.block_size} must be a multiple of M={pattern.m} for pattern {pattern}"
            )

    def gram_dtype(self) -> torch.dtype:
        return getattr(torch, self.config.hessian_dtype)

    def finalize(self, task: LayerTask) -> Pruned:
        stats = task.stats
        if stats is None or stats.gram is None:
            raise ValueError(f"sparsegpt needs the input Gram matrix of {task.name!r}: pass calibration data")
        weight = task.weight
        if self.name not in stats.cache:  # once per input: q/k/v share it
            stats.cache[self.name] = inverse_hessian(stats.gram.to(weight.device), self.config.dampening, task.name)
            if not task.keep_gram:
                stats.gram = None  # the inverse is all the solver needs from here on
        solved = sparsegpt_prune(weight, stats.cache[self.name], task.pattern, block_size=self.config.block_size)
        return Pruned(Mask(solved.keep), solved.weight, solved.dampening)
