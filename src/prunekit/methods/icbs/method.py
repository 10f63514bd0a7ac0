"""The iCBS method object and its options; the refinement is :mod:`prunekit.methods.icbs.solver`."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from prunekit.core.masks import Mask
from prunekit.core.patterns import select_keep_mask
from prunekit.methods.base import LayerTask, MethodConfig, OneShotMethod, Pruned
from prunekit.methods.icbs.solver import icbs_refine
from prunekit.methods.magnitude.scores import magnitude_scores
from prunekit.methods.registry import register_method
from prunekit.methods.wanda.scores import wanda_scores

log = logging.getLogger(__name__)


class IcbsConfig(MethodConfig):
    """iCBS's options (Rosenberg et al. 2024, Alg. 1): the starting mask and the budget of the refinement."""

    start_mask: Literal["wanda", "magnitude"] = Field("wanda", description="icbs: the mask the refinement starts from")
    exchanges: int = Field(
        100,
        ge=0,
        description="icbs: exchange steps at most (the quality/time knob; 0 = the start mask; a step exchanges "
        "one pair per row, or under N:M one per group)",
    )
    candidates: int = Field(16, ge=1, description="icbs: kept and pruned candidates per row in each block")


@register_method
class Icbs(OneShotMethod):
    name = "icbs"
    summary = "Wanda's mask refined by block coordinate descent on r^T H r (Rosenberg et al. 2024, Alg. 1)"
    config_class = IcbsConfig
    needs_activations = True
    needs_gram = True
    default_scope = "row"
    #: The paper keeps the weights; prunekit's least-squares refit on the refined support then lowers the same
    #: error further, as it does for SparseGPT.
    default_refit_steps = 4
    config: IcbsConfig

    def finalize(self, task: LayerTask) -> Pruned:
        stats = task.stats
        if stats is None or stats.gram is None or stats.sq_norms is None:
            raise ValueError(f"icbs needs the input Gram matrix and norms of {task.name!r}: pass calibration data")
        if self.config.start_mask == "wanda":
            scores = wanda_scores(task.weight, stats.sq_norms)
        else:
            scores = magnitude_scores(task.weight)
        keep = select_keep_mask(scores, task.pattern)
        refined = icbs_refine(
            task.weight,
            keep,
            stats.gram.to(task.weight.device),
            task.pattern,
            steps=self.config.exchanges,
            block=self.config.candidates,
        )
        before, after = float(refined.error_before.sum()), float(refined.error_after.sum())
        log.debug("icbs %s: %d exchanges, error %.4g -> %.4g", task.name, refined.swaps, before, after)
        mask = Mask(refined.keep)
        return Pruned(mask, mask.apply(task.weight))
