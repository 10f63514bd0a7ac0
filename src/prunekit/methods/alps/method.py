"""The ALPS method object and its options; the solver is :mod:`prunekit.methods.alps.solver`."""

from __future__ import annotations

from pydantic import Field

from prunekit.core.masks import Mask
from prunekit.methods.alps.solver import alps_prune, scaled_problem
from prunekit.methods.base import LayerTask, MethodConfig, OneShotMethod, Pruned
from prunekit.methods.registry import register_method


class AlpsConfig(MethodConfig):
    """ALPS's options (Meng et al. 2024, Sec. 3)."""

    dampening: float = Field(0.01, ge=0, description="alps: added to the Hessian diagonal, as a fraction of its mean")
    rho: float = Field(0.1, gt=0, description="alps: the ADMM penalty at the start (it grows as the support settles)")
    max_iterations: int = Field(300, ge=1, description="alps: ADMM iterations at most (the quality/time knob)")
    update_every: int = Field(3, ge=1, description="alps: iterations between support checks and rho updates")
    min_iterations: int = Field(30, ge=0, description="alps: iterations before a settled support may stop the loop")


@register_method
class Alps(OneShotMethod):
    name = "alps"
    summary = "mask and weights by ADMM on ||W X - W0 X||^2, then a refit on the support (Meng et al. 2024, Alg. 1)"
    config_class = AlpsConfig
    needs_activations = True
    needs_gram = True
    default_scope = "layer"
    #: ALPS ends with preconditioned conjugate gradients on the fixed support (its Sec. 3.3); the pipeline's
    #: refit is that step.
    default_refit_steps = 10
    config: AlpsConfig

    def finalize(self, task: LayerTask) -> Pruned:
        stats = task.stats
        if stats is None or stats.gram is None:
            raise ValueError(f"alps needs the input Gram matrix of {task.name!r}: pass calibration data")
        if self.name not in stats.cache:  # once per input: q/k/v share it
            stats.cache[self.name] = scaled_problem(stats.gram.to(task.weight.device), self.config.dampening)
        solved = alps_prune(
            task.weight,
            stats.cache[self.name],
            task.pattern,
            rho=self.config.rho,
            max_iterations=self.config.max_iterations,
            update_every=self.config.update_every,
            min_iterations=self.config.min_iterations,
        )
        return Pruned(Mask(solved.keep), solved.weight, self.config.dampening)
