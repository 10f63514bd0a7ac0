"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding, and its controls.

Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis", Algorithm / sec. 1): train, prune ``p%`` of the remaining
weights by magnitude, reset the survivors to their initial values, repeat. Frankle et al. 2020 ("Linear Mode
Connectivity and the Lottery Ticket Hypothesis"; "Stabilizing the LTH") rewind to the weights of an early
iteration ``k > 0`` instead of the initialisation, which makes IMP work on deep networks.

Pure functions: :func:`capture_rewind_point`, :func:`imp_round`, :func:`rewind`, the controls
:func:`random_reinit` (same masks, fresh initialisation; Frankle & Carbin sec. 2) and :func:`scratch_init` (the
"train from scratch" control for structural pruning, Liu et al. 2019, "Rethinking the Value of Network Pruning":
the pruned architecture, freshly initialised), and :func:`rounds_to_reach`. :class:`LotteryTicket` drives them.
Masks are ``True`` = kept, keyed by parameter name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import ConfigDict, field_validator, model_validator
from torch import nn

from prunekit.core.config import StrictConfig
from prunekit.core.errors import ConfigError
from prunekit.core.masks import Mask
from prunekit.training.distributions import common_device, top_k_mask
from prunekit.training.selection import ExcludePatterns, IncludePatterns, ModuleTypes, select_parameters

#: Where IMP ranks magnitudes: over all pruned layers together, or within each layer (not
#: :data:`prunekit.core.patterns.Scope`, the comparison group of a one-shot mask).
RankingScope = Literal["global", "layer"]


def capture_rewind_point(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy every parameter and buffer of ``model`` (its ``state_dict``): the weights at rewinding iteration ``k``
    (Frankle et al. 2020; ``k = 0`` is the original initialisation of Frankle & Carbin 2019)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def imp_round(
    masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], rate: float, scope: RankingScope = "global"
) -> dict[str, torch.Tensor]:
    """One IMP pruning step (Frankle & Carbin 2019, Algorithm step 3): remove ``ceil(rate · remaining)`` of the
    remaining weights with the smallest ``|W|``, over all layers together (``"global"``) or in each layer
    (``"layer"``). Already-pruned weights stay pruned; returns new masks."""
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"rate must be in (0, 1), got {rate!r}: Frankle & Carbin prune 0.2 per round")
    if scope not in ("global", "layer"):
        raise ConfigError(f"scope must be 'global' or 'layer', got {scope!r}")
    scores = {
        name: weights[name].detach().abs().float().masked_fill(~keep.to(weights[name].device), -math.inf)
        for name, keep in masks.items()
    }
    if scope == "layer":
        out = {}
        for name, keep in masks.items():
            kept = int(keep.sum())
            out[name] = top_k_mask(scores[name], kept - math.ceil(rate * kept - 1e-9))
        return out
    names = list(masks)
    kept = sum(int(masks[name].sum()) for name in names)
    device = common_device([scores[name] for name in names])
    flat = torch.cat([scores[name].reshape(-1).to(device) for name in names])
    keep = top_k_mask(flat, kept - math.ceil(rate * kept - 1e-9))
    sizes = [masks[name].numel() for name in names]
    return {
        name: part.reshape(masks[name].shape).to(masks[name].device)
        for name, part in zip(names, keep.split(sizes), strict=True)
    }


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries of the named parameters of ``model``, in place."""
    for name, keep in masks.items():
        parameter = model.get_parameter(name)
        parameter.masked_fill_(~keep.to(parameter.device), 0)


def rewind(model: nn.Module, snapshot: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Restore exactly the weights of the rewind point on kept positions, zero elsewhere (Frankle & Carbin 2019,
    Algorithm step 4; Frankle et al. 2020 for ``k > 0``). Buffers (e.g. batch-norm statistics) are restored too."""
    model.load_state_dict(snapshot, strict=True)
    apply_masks_(model, masks)


def _reinitialise(model: nn.Module, seed: int, init: Callable[[nn.Module], None] | None) -> None:
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # the caller's RNG streams are left untouched
        torch.manual_seed(seed)
        if init is not None:
            init(model)
            return
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def random_reinit(
    model: nn.Module, masks: Mapping[str, torch.Tensor], seed: int, init: Callable[[nn.Module], None] | None = None
) -> None:
    """Control of Frankle & Carbin 2019 (sec. 2, "random reinitialization"): the same masks on a fresh draw from
    the model's initialisation, seeded (the global RNG is not disturbed). ``init(model)`` is that initialisation
    (e.g. :func:`prunekit.training.cifar.models.init_weights`); without it every module's ``reset_parameters``
    runs, which is PyTorch's default, not necessarily the one the model was built with."""
    _reinitialise(model, seed, init)
    apply_masks_(model, masks)


def scratch_init(model: nn.Module, seed: int, init: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """ "Train from scratch" control (Liu et al. 2019, "Rethinking the Value of Network Pruning"): a copy of the
    (structurally pruned) architecture, freshly initialised under ``seed`` by ``init(model)`` (default: every
    module's ``reset_parameters``)."""
    fresh = copy.deepcopy(model)
    _reinitialise(fresh, seed, init)
    return fresh


def rounds_to_reach(target_density: float, rate: float) -> int:
    """Fewest IMP rounds ``r`` with ``(1 - rate)^r <= target_density`` (e.g. 5 rounds of 0.2 for 0.8^5 = 0.328)."""
    if not 0.0 < target_density <= 1.0:
        raise ConfigError(f"target_density must be in (0, 1], got {target_density!r}")
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"rate must be in (0, 1), got {rate!r}")
    return max(0, math.ceil(math.log(target_density) / math.log(1.0 - rate) - 1e-9))


class LotteryConfig(StrictConfig):
    """IMP settings: prune ``rate`` of the remaining weights per round (``scope`` global or per layer) until at most
    ``target_density`` remains; ``include``/``exclude``/``module_types`` choose the weights as in
    :class:`~prunekit.training.sparse_config.SparsifierConfig`. A strict, frozen pydantic configuration."""

    model_config = ConfigDict(frozen=True)

    rate: float = 0.2
    target_density: float = 0.8**5
    scope: RankingScope = "global"
    include: IncludePatterns = ()
    exclude: ExcludePatterns = ()
    module_types: ModuleTypes = ()

    @field_validator("scope", mode="before")
    @classmethod
    def _scope(cls, value: object) -> object:
        if value not in ("global", "layer"):
            raise ConfigError(f"scope must be 'global' or 'layer', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> LotteryConfig:
        rounds_to_reach(self.target_density, self.rate)  # validates both
        return self


class LotteryTicket:
    """A small IMP driver (Frankle & Carbin 2019; rewinding of Frankle et al. 2020)::

    ticket = LotteryTicket(model, LotteryConfig(rate=0.2, target_density=0.8**5))
    train(model, steps=k); ticket.capture()          # rewind point (k = 0: before training)
    train(model)
    while not ticket.done:
        ticket.prune_round(); ticket.rewind()
        train(model, after_step=ticket.apply_masks)  # keep pruned weights at zero
    """

    def __init__(self, model: nn.Module, config: LotteryConfig | None = None) -> None:
        self.model = model
        self.config = config or LotteryConfig()
        params = select_parameters(model, self.config.include, self.config.exclude, self.config.module_types)
        self._names: Sequence[str] = [p.name for p in params]
        self._keep = {p.name: torch.ones_like(p.parameter, dtype=torch.bool) for p in params}
        self._snapshot: dict[str, torch.Tensor] | None = None
        self.rounds = 0

    @property
    def masks(self) -> dict[str, Mask]:
        """A copy of the current keep-masks."""
        return {name: Mask(keep.clone()) for name, keep in self._keep.items()}

    @property
    def density(self) -> float:
        """Fraction of the chosen weights still kept."""
        return sum(int(k.sum()) for k in self._keep.values()) / sum(k.numel() for k in self._keep.values())

    @property
    def done(self) -> bool:
        """True once the density is at or below the target."""
        return self.density <= self.config.target_density + 1e-12

    def capture(self) -> None:
        """Record the rewind point (call at iteration ``k``)."""
        self._snapshot = capture_rewind_point(self.model)

    def prune_round(self) -> float:
        """Prune ``rate`` of the remaining weights (:func:`imp_round`); returns the new density."""
        weights = {name: self.model.get_parameter(name) for name in self._names}
        self._keep = imp_round(self._keep, weights, self.config.rate, self.config.scope)
        self.rounds += 1
        return self.density

    def rewind(self) -> None:
        """Reset to the rewind point with the current masks (:func:`rewind`)."""
        if self._snapshot is None:
            raise RuntimeError("no rewind point: call capture() at the rewinding iteration first")
        rewind(self.model, self._snapshot, self._keep)

    def apply_masks(self) -> None:
        """Zero the pruned weights (call after every optimizer step while training a round)."""
        apply_masks_(self.model, self._keep)
