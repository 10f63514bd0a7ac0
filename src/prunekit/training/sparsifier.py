"""Pruning during training: a :class:`Sparsifier` wires schedules, distributions and regrowth to a model.

Methods (``SparsifierConfig.method``, with ``distribution`` choosing how the global target is split):

* ``"gmp"``: gradual magnitude pruning (Zhu & Gupta 2017) on any schedule; ``distribution="uniform"`` prunes every
  layer alike, ``"erk"`` by Erdős–Rényi-Kernel densities (Evci et al. 2020), ``"global"`` is Global MP (one
  threshold over all layers, per-layer floor ``min_density``).
* ``"granet"``: GraNet (Liu et al. 2021): at each update step prune to the scheduled sparsity (global magnitude by
  default), then drop a cosine-decayed fraction of each layer's smallest weights and regrow as many where the
  dense gradient is largest (zero-initialised). ``init="magnitude"`` with ``initial_sparsity=0`` is the paper's
  dense-to-sparse mode; ``init="erk"``/``"uniform"`` with ``initial_sparsity > 0`` starts from a random sparse
  network (sparse-to-sparse mode).

Granularity: unstructured, N:M (:class:`prunekit.core.patterns.NM`, gradual ``M:M -> ... -> N:M``, the mask from
:func:`prunekit.core.patterns.nm_mask` on ``|W|`` viewed as ``(out, in·k·k)``) or ``"channel"`` (whole output rows /
filters by L2 norm; biases are left as they are). Call :meth:`Sparsifier.step` after every ``optimizer.step()``::

    sparsifier = Sparsifier(model, SparsifierConfig(schedule=CubicSchedule(final_sparsity=0.9, start_step=0,
                                                                           end_step=1000, frequency=100)))
    sparsifier.attach_optimizer(optimizer)       # zero momentum / Adam moments at pruned positions
    for batch in data:
        loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad(); sparsifier.step()
    sparsifier.remove()                           # a plain model with zeros, no hooks

Pruned weights are set to exactly zero in place after every step (no parametrization); an optional gradient
hook zeroes their gradients so that momentum cannot move them. Under ``torch.distributed`` the gradient
statistics are averaged and rank 0's masks are broadcast (:mod:`prunekit.training.ddp`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.core.masks import Mask
from prunekit.core.patterns import NM, check_pattern_fits
from prunekit.training import ddp
from prunekit.training.distributions import decide_masks, layer_keep_counts, random_masks
from prunekit.training.regrow import cosine_regrow_fraction, prune_and_regrow
from prunekit.training.schedules import OneShotSchedule, is_update_step, sparsity_at
from prunekit.training.selection import as_matrix, from_matrix, select_parameters
from prunekit.training.sparse_config import SparsifierConfig
from prunekit.training.sparsity_report import LayerSparsity, SparsityReport

#: what users import from here; the pieces live in ``selection``, ``sparse_config`` and ``sparsity_report``
__all__ = ["Sparsifier", "SparsifierConfig", "SparsityReport", "select_parameters"]

logger = logging.getLogger(__name__)


class Sparsifier:
    """Holds one boolean keep-mask per chosen weight and updates them during training (see the module docstring).

    Construction chooses the targets, sets the step-0 mask (``schedule.sparsity_at(0)``, by magnitude or at
    random) and zeroes the pruned weights. To resume, build model, optimizer and sparsifier as for a fresh run,
    then load the three state dicts.
    """

    def __init__(
        self, model: nn.Module, config: SparsifierConfig, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        self.model = model
        self.config = config
        self._params = select_parameters(model, config.include, config.exclude, config.module_types)
        if isinstance(config.granularity, NM):
            for p in self._params:
                check_pattern_fits(config.granularity, as_matrix(p.parameter, p.transposed).shape[1], p.name)
        self._step = 0
        self._generator = torch.Generator().manual_seed(config.seed)
        self._keep = {p.name: torch.ones_like(p.parameter, dtype=torch.bool) for p in self._params}
        self._grad_stash: dict[str, torch.Tensor] = {}
        self._optimizer: Any = None
        self._hooks: list[Any] = []
        self._removed = False
        self._initial_masks()
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        self.apply_masks()
        if config.mask_gradients or config.method == "granet":
            self._hooks = [p.parameter.register_hook(self._gradient_hook(p.name)) for p in self._params]
        self._collect_grads = self._regrows_at(1)
        self._log(update=True)

    # -- public API -----------------------------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far."""
        return self._step

    @property
    def target_sparsity(self) -> float:
        """The schedule's sparsity at the current step."""
        return sparsity_at(self._step, self.config.schedule)

    @property
    def masks(self) -> dict[str, Mask]:
        """A copy of the current keep-masks, by parameter name (in each parameter's own shape)."""
        return {name: Mask(keep.clone()) for name, keep in self._keep.items()}

    def step(self) -> None:
        """Advance one optimizer step: on update steps prune to the schedule (and, for GraNet, drop and regrow),
        then zero the pruned weights and optimizer state. Call after ``optimizer.step()``."""
        self._check_live()
        self._step += 1
        t = self._step
        changed = False
        if is_update_step(t, self.config.schedule):
            self._keep = self._decide(sparsity_at(t, self.config.schedule))
            self.apply_masks()  # GraNet: pruned weights are zero before regrowth (regrown there start at 0)
            changed = True
        if self._regrows_at(t):
            self._regrow(t)
            changed = True
        if changed:
            ddp.broadcast_masks_(self._keep)
        self._grad_stash.clear()
        self.apply_masks()
        self._collect_grads = self._regrows_at(t + 1)
        self._log(update=changed)

    def attach_optimizer(self, optimizer: Any) -> None:
        """Zero the optimizer's per-weight state (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``, any
        state tensor shaped like the weight) at pruned positions after every step, so that no stale moment
        moves a pruned weight or a regrown one."""
        self._check_live()
        self._optimizer = optimizer
        self._mask_optimizer_state()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set pruned weights (and, with an attached optimizer, their state) to zero, in place."""
        for p in self._params:
            p.parameter.masked_fill_(~self._keep[p.name], 0)
        self._mask_optimizer_state()

    def sparsity_report(self) -> SparsityReport:
        """Per-layer and overall sparsity of the current masks."""
        layers = tuple(
            LayerSparsity(p.name, tuple(p.parameter.shape), p.parameter.numel(), int(self._keep[p.name].sum()))
            for p in self._params
        )
        return SparsityReport(self._step, self.target_sparsity, layers)

    def state_dict(self) -> dict[str, Any]:
        """Masks, step counter, configuration, RNG state and any pending gradient statistics (CPU tensors and
        plain values: ``torch.load(weights_only=True)`` reads it)."""
        return {
            "step": self._step,
            "masks": {name: keep.cpu().clone() for name, keep in self._keep.items()},
            "config": self.config.describe(),
            "rng_state": self._generator.get_state(),
            "grad_stash": {name: g.cpu().clone() for name, g in self._grad_stash.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a resumed run then makes exactly the masks of an uninterrupted one.

        Refuses (:class:`~prunekit.core.errors.ConfigError`) a state saved under another configuration or for other
        parameters.
        """
        self._check_live()
        saved, mine = dict(state["config"]), self.config.describe()
        different = [f"{k}: saved {saved.get(k)} vs {mine.get(k)}" for k in mine if saved.get(k) != mine[k]]
        if different:
            raise ConfigError(
                "sparsifier state was saved with another configuration (" + "; ".join(different) + "): "
                "build the Sparsifier with the saved configuration"
            )
        masks = state["masks"]
        if set(masks) != set(self._keep):
            raise ConfigError(
                f"sparsifier state holds masks for {sorted(masks)} but this model's targets are {sorted(self._keep)}"
            )
        for p in self._params:
            keep = masks[p.name]
            if tuple(keep.shape) != tuple(p.parameter.shape):
                raise ConfigError(
                    f"saved mask {p.name!r} has shape {tuple(keep.shape)}, weight {tuple(p.parameter.shape)}"
                )
            self._keep[p.name] = keep.to(device=p.parameter.device, dtype=torch.bool).clone()
        self._step = int(state["step"])
        self._generator.set_state(state["rng_state"])
        self._grad_stash = {
            p.name: state["grad_stash"][p.name].to(p.parameter.device).clone()
            for p in self._params
            if p.name in state.get("grad_stash", {})
        }
        self._collect_grads = self._regrows_at(self._step + 1)
        self.apply_masks()

    def remove(self) -> nn.Module:
        """Apply the masks one last time, remove the gradient hooks, detach the optimizer; returns the model, a plain
        module whose pruned weights are zero. The sparsifier cannot be used afterwards."""
        self._check_live()
        self.apply_masks()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._optimizer = None
        self._grad_stash.clear()
        self._removed = True
        return self.model

    # -- wiring ---------------------------------------------------------------------------------------------------

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this Sparsifier was removed: create a new one to keep pruning")

    def _initial_masks(self) -> None:
        sparsity = sparsity_at(0, self.config.schedule)
        if sparsity <= 0.0:
            return
        if self.config.init == "magnitude":
            self._keep = self._decide(sparsity)
        else:
            shapes = {p.name: tuple(p.parameter.shape) for p in self._params}
            counts = layer_keep_counts(shapes, sparsity, self.config.init, self.config.erk_power_scale)
            drawn = random_masks(shapes, counts, self._generator)
            self._keep = {p.name: drawn[p.name].to(p.parameter.device) for p in self._params}
        ddp.broadcast_masks_(self._keep)

    def _decide(self, sparsity: float) -> dict[str, torch.Tensor]:
        scores, shapes = {}, {}
        for p in self._params:
            magnitude = as_matrix(p.parameter.detach(), p.transposed).abs().float()
            scores[p.name] = magnitude.masked_fill(~as_matrix(self._keep[p.name], p.transposed), -math.inf)
            shapes[p.name] = tuple(p.parameter.shape)
        decided = decide_masks(scores, shapes, sparsity, self.config)
        return {p.name: from_matrix(decided[p.name], p.parameter.shape, p.transposed) for p in self._params}

    def _regrow_fraction(self, step: int) -> float:
        end = self.config.regrow_end_step or self.config.schedule.end_step
        return cosine_regrow_fraction(step, self.config.regrow_fraction, end)

    def _regrows_at(self, step: int) -> bool:
        schedule = self.config.schedule
        if self.config.method != "granet" or isinstance(schedule, OneShotSchedule):
            return False
        on_grid = step >= schedule.start_step and (step - schedule.start_step) % schedule.frequency == 0
        return on_grid and self._regrow_fraction(step) > 0.0

    def _regrow(self, step: int) -> None:
        grads = {}
        for p in self._params:
            grad = self._grad_stash.get(p.name)
            if grad is None and p.parameter.grad is not None and not self.config.mask_gradients:
                grad = p.parameter.grad.detach().clone()
            if grad is None:
                raise RuntimeError(
                    f"GraNet needs the dense gradient of {p.name!r} at step {step}: call loss.backward() before "
                    "optimizer.step() and sparsifier.step() on every step"
                )
            grads[p.name] = grad
        ddp.all_reduce_mean_(list(grads.values()))
        fraction = self._regrow_fraction(step)
        regrown = 0
        for p in self._params:
            self._keep[p.name], count = prune_and_regrow(self._keep[p.name], p.parameter, grads[p.name], fraction)
            regrown += count
        logger.info("step %d: GraNet dropped and regrew %d weights (fraction %.4f)", step, regrown, fraction)

    def _gradient_hook(self, name: str) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            if self._collect_grads:  # the next sparsifier.step() regrows: keep the dense gradient (summed)
                previous = self._grad_stash.get(name)
                self._grad_stash[name] = grad.detach().clone() if previous is None else previous + grad.detach()
            if self.config.mask_gradients:
                return grad.masked_fill(~self._keep[name], 0)
            return None

        return hook

    @torch.no_grad()
    def _mask_optimizer_state(self) -> None:
        if self._optimizer is None:
            return
        state = self._optimizer.state
        for p in self._params:
            if p.parameter not in state:
                continue
            for value in state[p.parameter].values():
                if torch.is_tensor(value) and value.shape == p.parameter.shape:
                    value.masked_fill_(~self._keep[p.name], 0)

    def _log(self, update: bool) -> None:
        level = logging.INFO if update else logging.DEBUG
        if not logger.isEnabledFor(level):
            return
        report = self.sparsity_report()
        logger.log(level, "step %d: sparsity %.4f (target %.4f)", report.step, report.sparsity, report.target)
        if update and logger.isEnabledFor(logging.DEBUG):
            for layer in report.layers:
                logger.debug("step %d: %s sparsity %.4f", report.step, layer.name, layer.sparsity)
