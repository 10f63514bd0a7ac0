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

Granularity: unstructured, N:M (:class:`prunekit.patterns.NM`, gradual ``M:M -> ... -> N:M``, the mask from
:func:`prunekit.patterns.nm_mask` on ``|W|`` viewed as ``(out, in·k·k)``) or ``"channel"`` (whole output rows /
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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from prunekit.errors import ConfigError, TargetError
from prunekit.masks import Mask
from prunekit.models.targets import is_linear_map
from prunekit.patterns import NM, Unstructured, check_pattern_fits, nm_mask, parse_pattern
from prunekit.training import ddp
from prunekit.training.distributions import (
    channel_mask,
    erk_densities,
    global_magnitude_masks,
    layer_keep_counts,
    magnitude_masks,
    nm_n_at,
    random_masks,
)
from prunekit.training.regrow import cosine_regrow_fraction, prune_and_regrow
from prunekit.training.schedules import (
    CubicSchedule,
    LinearSchedule,
    OneShotSchedule,
    Schedule,
    is_update_step,
    sparsity_at,
)

logger = logging.getLogger(__name__)

Method = Literal["gmp", "granet"]
Distribution = Literal["uniform", "erk", "global"]
Init = Literal["magnitude", "erk", "uniform"]
Granularity = Literal["unstructured", "channel"] | NM

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Modules pruned by default (plus transformers' GPT-2-style ``Conv1D``); ``nn.MultiheadAttention`` can be added
(its ``in_proj_weight`` is then pruned; its ``out_proj`` is an ``nn.Linear`` already)."""


class TargetSelectionError(TargetError, ConfigError):
    """A name pattern or module type selects no parameter (a :class:`~prunekit.errors.TargetError`, as in
    one-shot pruning, and a :class:`~prunekit.errors.ConfigError`)."""


@dataclass(frozen=True, kw_only=True)
class SparsifierConfig:
    """What to prune during training, when and how (see the module docstring for the papers).

    ``schedule``: a :mod:`~prunekit.training.schedules` schedule (sparsity per optimizer step).
    ``method``: ``"gmp"`` or ``"granet"``. ``distribution``: ``"uniform"``, ``"erk"`` or ``"global"`` (Global MP).
    ``granularity``: ``"unstructured"``, ``"channel"``, or an N:M pattern (``NM(2, 4)`` or ``"2:4"``).
    ``min_density``: per-layer floor of Global MP. ``erk_power_scale``: exponent of the ERK ratio.
    ``init``: how the step-0 mask is chosen when the schedule starts sparse: by magnitude, or at random with ERK
    or uniform layer densities (sparse-to-sparse training). ``regrow_fraction``: GraNet's initial death/regrowth
    fraction ``α``; ``regrow_end_step``: ``T_end`` of its cosine decay (default: the schedule's end; GraNet uses the
    whole training run). ``mask_gradients``: zero the gradients of pruned weights with a hook.
    ``include``/``exclude``: regular expressions searched in parameter names (``"features.0.weight"``);
    ``module_types``: which modules' weights are candidates (default :data:`DEFAULT_MODULE_TYPES`).
    ``seed``: seeds the random sparse initialisation.
    """

    schedule: Schedule
    method: Method = "gmp"
    distribution: Distribution = "uniform"
    granularity: Granularity = "unstructured"
    min_density: float = 0.0
    erk_power_scale: float = 1.0
    init: Init = "magnitude"
    regrow_fraction: float = 0.5
    regrow_end_step: int | None = None
    mask_gradients: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    module_types: tuple[type[nn.Module], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, (OneShotSchedule, LinearSchedule, CubicSchedule)):
            raise ConfigError(
                f"schedule must be a OneShotSchedule, LinearSchedule or CubicSchedule, got {self.schedule!r}"
            )
        _check_choice("method", self.method, ("gmp", "granet"))
        _check_choice("distribution", self.distribution, ("uniform", "erk", "global"))
        _check_choice("init", self.init, ("magnitude", "erk", "uniform"))
        granularity = self.granularity
        if isinstance(granularity, str) and granularity not in ("unstructured", "channel"):
            granularity = parse_pattern(granularity)  # "2:4" -> NM(2, 4), or a ConfigError naming the choices
            if isinstance(granularity, Unstructured):
                granularity = "unstructured"
            object.__setattr__(self, "granularity", granularity)
        if not isinstance(granularity, NM) and granularity not in ("unstructured", "channel"):
            raise ConfigError(f"granularity must be 'unstructured', 'channel' or an N:M pattern, got {granularity!r}")
        for name in ("min_density", "regrow_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.erk_power_scale, (int, float)) or self.erk_power_scale < 0:
            raise ConfigError(f"erk_power_scale must be >= 0, got {self.erk_power_scale!r}")
        if self.regrow_end_step is not None and (
            isinstance(self.regrow_end_step, bool)
            or not isinstance(self.regrow_end_step, int)
            or self.regrow_end_step < 1
        ):
            raise ConfigError(f"regrow_end_step must be a whole number >= 1 or None, got {self.regrow_end_step!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be a whole number, got {self.seed!r}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
            object.__setattr__(self, name, patterns)
            for text in patterns:
                try:
                    re.compile(text)
                except (re.error, TypeError) as exc:
                    raise ConfigError(f"{name} pattern {text!r} is not a valid regular expression: {exc}") from None
        types = tuple(self.module_types)
        object.__setattr__(self, "module_types", types)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise ConfigError(f"module_types must be nn.Module classes such as nn.Linear, got {types!r}")
        self._check_combination()

    def _check_combination(self) -> None:
        structured = self.granularity != "unstructured"
        if structured and self.method != "gmp":
            raise ConfigError(
                f"GraNet regrows single weights, so it needs granularity 'unstructured', got {self.granularity}: "
                "use method='gmp' for N:M or channel pruning"
            )
        if structured and self.init != "magnitude":
            raise ConfigError(f"a random sparse init is unstructured; use init='magnitude' with {self.granularity}")
        if isinstance(self.granularity, NM):
            if self.distribution != "uniform":
                raise ConfigError("N:M granularity fixes every layer's sparsity: use distribution='uniform'")
            if not math.isclose(self.schedule.final_sparsity, self.granularity.target_sparsity, abs_tol=1e-9):
                raise ConfigError(
                    f"pattern {self.granularity} means sparsity {self.granularity.target_sparsity:g}, but the schedule "
                    f"ends at {self.schedule.final_sparsity:g}: make the schedule's final sparsity "
                    f"{self.granularity.target_sparsity:g}"
                )
        if self.granularity == "channel" and self.distribution == "global":
            raise ConfigError("row norms of different layers are not comparable: use distribution 'uniform' or 'erk'")
        if self.method == "granet" and isinstance(self.schedule, OneShotSchedule):
            raise ConfigError(
                "GraNet prunes and regrows at regular update steps: use a CubicSchedule (or LinearSchedule) "
                "with a frequency"
            )

    def describe(self) -> dict[str, str]:
        """Every field as text (stored in checkpoints to refuse resuming under another configuration)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = repr(tuple(t.__qualname__ for t in value)) if f.name == "module_types" else repr(value)
        return out


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True, eq=False)
class SparseParameter:
    """A pruned parameter: its full name, the tensor, and whether it stores ``(in, out)`` (transformers' Conv1D)."""

    name: str
    parameter: nn.Parameter
    transposed: bool = False


def _weights_of(module: nn.Module) -> list[str]:
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    else:
        names = ("weight",)
    return [
        n for n in names if isinstance(module._parameters.get(n), nn.Parameter) and module._parameters[n].dim() >= 2
    ]


def select_parameters(
    model: nn.Module,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    module_types: tuple[type[nn.Module], ...] = (),
) -> list[SparseParameter]:
    """The weights to prune, in model order: weights of ``module_types`` (default: Linear, Conv1d/2d/3d and
    transformers' ``Conv1D``), kept if an ``include`` pattern matches their name (all when none is given), minus
    ``exclude`` matches. A pattern that matches nothing, or an empty selection, is a :class:`TargetSelectionError`.
    """
    candidates: list[SparseParameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if module_types:
            chosen = isinstance(module, module_types)
        else:
            chosen = isinstance(module, DEFAULT_MODULE_TYPES) or is_linear_map(module)
        if not chosen:
            continue
        transposed = is_linear_map(module) and not isinstance(module, nn.Linear)
        for param_name in _weights_of(module):
            parameter = module._parameters[param_name]
            if id(parameter) in seen:  # tied weights are pruned once
                continue
            seen.add(id(parameter))
            full = f"{module_name}.{param_name}" if module_name else param_name
            candidates.append(SparseParameter(full, parameter, transposed))
    if not candidates:
        kinds = ", ".join(t.__name__ for t in (module_types or DEFAULT_MODULE_TYPES))
        raise TargetSelectionError(f"{type(model).__name__} has no weight to prune among {kinds}: set module_types")
    selected = candidates
    if include:
        selected = []
        for text in include:
            hits = [p for p in candidates if re.search(text, p.name)]
            if not hits:
                raise TargetSelectionError(
                    f"include pattern {text!r} matches no prunable weight; names look like {candidates[0].name!r}"
                )
            selected.extend(p for p in hits if p not in selected)
        selected.sort(key=candidates.index)
    for text in exclude:
        kept = [p for p in selected if not re.search(text, p.name)]
        if len(kept) == len(selected):
            raise TargetSelectionError(
                f"exclude pattern {text!r} matches no selected weight; names look like {selected[0].name!r}"
            )
        selected = kept
    if not selected:
        raise TargetSelectionError("the include/exclude patterns leave no weight to prune")
    return selected


def as_matrix(tensor: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """A weight (or mask) as an ``(out, in·k·k)`` matrix: conv kernels flattened, ``(in, out)`` storage transposed."""
    return tensor.t() if transposed else tensor.reshape(tensor.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: torch.Size, transposed: bool = False) -> torch.Tensor:
    """Inverse of :func:`as_matrix` (contiguous)."""
    return matrix.t().contiguous() if transposed else matrix.reshape(shape).contiguous()


def decide_masks(
    scores: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    config: SparsifierConfig,
) -> dict[str, torch.Tensor]:
    """Keep-masks for a global target ``sparsity`` from ``(out, in·k·k)`` score matrices (``-inf`` = already pruned).

    Unstructured: per-layer counts by ``uniform``/``erk`` (:func:`~prunekit.training.distributions.layer_keep_counts`)
    then each layer's largest scores, or Global MP with the ``min_density`` floor. N:M: ``nm_mask`` with the gradual
    ``N' = nm_n_at(sparsity)``. Channel: rows by L2 norm, per-layer sparsity from ``uniform``/``erk``.
    ``shapes`` are the parameters' own shapes (ERK counts kernel dimensions).
    """
    granularity = config.granularity
    if isinstance(granularity, NM):
        n = nm_n_at(sparsity, granularity.n, granularity.m)
        return {name: nm_mask(s, n, granularity.m) for name, s in scores.items()}
    if granularity == "channel":
        if config.distribution == "erk":
            densities = erk_densities(shapes, 1.0 - sparsity, config.erk_power_scale)
            layer_sparsity = {name: 1.0 - densities[name] for name in scores}
        else:
            layer_sparsity = dict.fromkeys(scores, sparsity)
        return {name: channel_mask(s, layer_sparsity[name]) for name, s in scores.items()}
    if config.distribution == "global":
        return global_magnitude_masks(scores, sparsity, config.min_density)
    counts = layer_keep_counts(shapes, sparsity, config.distribution, config.erk_power_scale)
    return magnitude_masks(scores, counts)


@dataclass(frozen=True)
class LayerSparsity:
    """Kept and total weights of one pruned parameter."""

    name: str
    shape: tuple[int, ...]
    numel: int
    kept: int

    @property
    def sparsity(self) -> float:
        """Fraction of this parameter's weights pruned."""
        return 1.0 - self.kept / max(1, self.numel)


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and overall sparsity of the masks after ``step`` optimizer steps (``target``: the schedule's)."""

    step: int
    target: float
    layers: tuple[LayerSparsity, ...]

    @property
    def numel(self) -> int:
        """All chosen weights."""
        return sum(layer.numel for layer in self.layers)

    @property
    def kept(self) -> int:
        """Weights kept over all layers."""
        return sum(layer.kept for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Overall fraction pruned."""
        return 1.0 - self.kept / max(1, self.numel)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "step": self.step,
            "target": self.target,
            "sparsity": self.sparsity,
            "layers": {layer.name: {"shape": list(layer.shape), "sparsity": layer.sparsity} for layer in self.layers},
        }


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

        Refuses (:class:`~prunekit.errors.ConfigError`) a state saved under another configuration or for other
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
