"""The supernet of Týr-the-Pruner: every decoder layer's attention and MLP pruned locally at a ladder of widths.

Li et al. (2025), "Týr-the-Pruner: Structural Pruning LLMs via Global Sparsity Distribution Optimization"
(NeurIPS 2025), Sec. 3.2. For every decoder layer of a pre-norm transformer (``x + attn(ln1(x))`` then
``x + mlp(ln2(x))``: Llama, Mistral, Qwen2/3 and alike) and every width on the layer's ladder, a local pruning:

- **attention**: whole key/value groups with their query heads (single query heads under multi-query
  attention) leave ``q/k/v_proj`` and the ``head_dim`` columns of ``o_proj`` that they feed; no attention at
  all is the attention drop (He et al. 2024), the sublayer replaced by its mean output;
- **MLP**: channels leave ``gate/up_proj`` (rows) and ``down_proj`` (columns); no MLP (with no attention) is
  the layer removed.

Which units go is the greedy second-order (OBS) order of ZipLM / SlimGPT on the reader's input Gram
``H = X^T X`` (:mod:`prunekit.reconstruction.structured_obs`), and the reader (``o_proj``, ``down_proj``) is
refitted on the kept units by least squares, which is the OBS update of the removal
(:func:`~prunekit.reconstruction.least_squares.least_squares_refit`). Every width of a sublayer is a prefix of
the one order, so a layer's ladder costs one greedy pass and one refit per width used.

**Error propagation by expectation** (Týr's expectation error accumulation): the statistics of layer ``l``
are gathered on the hidden states that the supernet's layers ``< l`` produce on average over their ladder
(their outputs weighted by the uniform distribution over each ladder's legal choices,
:func:`~prunekit.structured.llm.layer_widths.ladder_weights`; attention then MLP), so each local pruning sees the
error its predecessors are expected to leave without fixing their widths before the search has chosen them.
With a narrow ladder (the fine iterations of the search) the expectation approaches the chosen model.

Widths used by a search are built on demand from the stored order and Gram (:meth:`Supernet.block`) and cached
within a byte budget, so memory stays bounded whatever the search visits.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibration.capture import BlockCall, capture_block_inputs
from prunekit.calibration.hooks import first_input, observe
from prunekit.calibration.statistics import gram_of
from prunekit.core.errors import StructuralPruningError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.dropped_attention import ATTENTION_NAME, DroppedAttention
from prunekit.reconstruction.least_squares import least_squares_refit
from prunekit.reconstruction.structured_obs import column_removal_order, remove_groups
from prunekit.structured.depth import shorten_module_list
from prunekit.structured.llm.attention_drop import INPUT_NORM_NAME, POST_ATTENTION_NORM_NAME
from prunekit.structured.llm.hf_config import update_config
from prunekit.structured.llm.layer_widths import (
    Genome,
    Ladder,
    LayerChoice,
    LayerLayout,
    ladder_weights,
    layer_layout,
    parameter_count,
)

log = logging.getLogger(__name__)


@dataclass
class SublayerFit:
    """One sublayer's local pruning problem: the reader's dense weight and input Gram, the reader's input
    columns of every unit, and the order in which the units go."""

    weight: torch.Tensor  # (out, in), the dense reader (o_proj, down_proj)
    gram: torch.Tensor  # (in, in) float32, on the supernet's expected inputs
    columns: torch.Tensor  # (units, columns per unit)
    order: list[int]  # order[:n] are the units removed when n go

    def kept(self, keep: int) -> torch.Tensor:
        """The units kept when ``keep`` of them stay, ascending."""
        total = self.columns.shape[0]
        if not 0 < keep <= total or total - keep > len(self.order):
            raise ValueError(f"no local pruning keeps {keep} of {total} units (ordered {len(self.order)})")
        removed = set(self.order[: total - keep])
        return torch.tensor([u for u in range(total) if u not in removed], dtype=torch.long)

    def refit(self, units: torch.Tensor, dampening: float) -> torch.Tensor:
        """The reader's weight on the columns of ``units``, refitted (the OBS update of the removal)."""
        return least_squares_refit(self.weight, self.gram, self.columns[units].flatten(), dampening)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias`` as they are (no copy, no random initialisation), its
    parameters trainable where those of ``like`` (the dense layer it replaces) are."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=like.weight.requires_grad)
    if bias is not None:
        assert like.bias is not None
        linear.bias = nn.Parameter(bias.detach(), requires_grad=like.bias.requires_grad)
    return linear


def _rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    bias = None if linear.bias is None else linear.bias.detach()[rows]
    return _linear(linear.weight.detach()[rows], bias, linear)


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its tensors and attributes but has its own child table."""
    clone = copy.copy(module)
    clone._modules = OrderedDict(module._modules)
    return clone


class Supernet:
    """The local prunings of every decoder layer (see the module docstring): build with
    :func:`build_supernet`, then :meth:`applied` (a model running a genome, for the search) and
    :meth:`materialise` (the pruned model)."""

    def __init__(
        self,
        model: nn.Module,
        layouts: list[LayerLayout],
        ladders: list[Ladder],
        attention: list[SublayerFit],
        mlp: list[SublayerFit],
        attention_means: list[torch.Tensor],
        *,
        dampening: float,
        cache_bytes: int,
    ) -> None:
        self.model = model
        self.block_name, self.blocks = find_decoder_blocks(model)
        self.layouts = layouts
        self.ladders = ladders
        self.attention = attention
        self.mlp = mlp
        self.attention_means = attention_means
        self.dampening = dampening
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, int, int], tuple[nn.Module, int]] = OrderedDict()
        self._cached_bytes = 0
        self.fixed_params = parameter_count(model) - sum(parameter_count(b) for b in self.blocks)

    def params(self, genome: Genome) -> int:
        """Parameters of the model that ``genome`` makes (tied tensors once, as ``model.parameters()``)."""
        return self.fixed_params + sum(layout.params(c) for layout, c in zip(self.layouts, genome, strict=True))

    def check(self, genome: Genome) -> None:
        """Refuse a genome that no model can take: wrong length, widths out of range, an MLP removed from a
        layer that keeps attention, layer 0 without attention (transformers reads the KV cache length there)."""
        if len(genome) != len(self.layouts):
            raise StructuralPruningError(f"a genome has {len(genome)} layers, the model {len(self.layouts)}")
        for index, ((units, channels), layout) in enumerate(zip(genome, self.layouts, strict=True)):
            if not (0 <= units <= layout.units and 0 <= channels <= layout.channels):
                raise StructuralPruningError(f"layer {index}: widths {(units, channels)} outside {layout.dense}")
            if channels == 0 and units:
                raise StructuralPruningError(f"layer {index}: an MLP goes only with its attention (layer removed)")
            if index == 0 and units == 0:
                raise StructuralPruningError("layer 0 keeps its attention: transformers reads the KV cache from it")

    # -- the pruned sublayers, built on demand and cached -------------------------------------------------

    def _cached(self, key: tuple[str, int, int], build: Callable[[], nn.Module]) -> nn.Module:
        """The module under ``key``, built once and kept while the cache stays within ``cache_bytes`` (the
        least recently used go first)."""
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[0]
        module = build()
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        self._cache[key] = (module, size)
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, (_, dropped) = self._cache.popitem(last=False)
            self._cached_bytes -= dropped
        return module

    def _attention(self, index: int, keep: int) -> nn.Module:
        block, layout = self.blocks[index], self.layouts[index]
        dense = getattr(block, ATTENTION_NAME)
        if keep == layout.units:
            return dense

        def build() -> nn.Module:
            fit = self.attention[index]
            units = fit.kept(keep)
            heads = (units[:, None] * layout.unit_heads + torch.arange(layout.unit_heads)).flatten()
            q_rows = (heads[:, None] * layout.head_dim + torch.arange(layout.head_dim)).flatten()
            pruned = _shallow(dense)
            pruned.q_proj = _rows(dense.q_proj, q_rows)
            if layout.kv_per_unit:
                kv_rows = (units[:, None] * layout.head_dim + torch.arange(layout.head_dim)).flatten()
                pruned.k_proj = _rows(dense.k_proj, kv_rows)
                pruned.v_proj = _rows(dense.v_proj, kv_rows)
            else:  # multi-query: the one key/value head stays, fewer query heads share it
                pruned.num_key_value_groups = keep
            o = dense.o_proj
            weight = fit.refit(units, self.dampening)
            pruned.o_proj = _linear(weight, o.bias, o)
            for name, value in (("num_heads", len(heads)), ("num_key_value_heads", len(units) * layout.kv_per_unit)):
                if isinstance(getattr(pruned, name, None), int) and (name != "num_key_value_heads" or value):
                    setattr(pruned, name, value)
            return pruned

        return self._cached(("attention", index, keep), build)

    def _mlp(self, index: int, keep: int) -> nn.Module:
        dense = self.blocks[index].mlp
        if keep == self.layouts[index].channels:
            return dense

        def build() -> nn.Module:
            fit = self.mlp[index]
            channels = fit.kept(keep)
            pruned = _shallow(dense)
            pruned.gate_proj = _rows(dense.gate_proj, channels)
            pruned.up_proj = _rows(dense.up_proj, channels)
            down = dense.down_proj
            pruned.down_proj = _linear(fit.refit(channels, self.dampening), down.bias, down)
            if isinstance(getattr(pruned, "intermediate_size", None), int):
                pruned.intermediate_size = keep
            return pruned

        return self._cached(("mlp", index, keep), build)

    def block(self, index: int, choice: LayerChoice) -> nn.Module | None:
        """Decoder layer ``index`` at ``choice`` (sharing the dense model's tensors where it keeps them), or
        ``None`` for the layer removed."""
        units, channels = choice
        layout, dense = self.layouts[index], self.blocks[index]
        if choice == layout.dense:
            return dense
        if units == 0 and channels == 0:
            return None
        block = _shallow(dense)
        if units:
            setattr(block, ATTENTION_NAME, self._attention(index, units))
        else:
            dropped = DroppedAttention(self.attention_means[index].numel())
            mean = self.attention_means[index]
            dropped.bias = mean.to(dtype=dense.mlp.down_proj.weight.dtype, device=mean.device).clone()
            setattr(block, ATTENTION_NAME, dropped)
            setattr(block, INPUT_NORM_NAME, nn.Identity())
        block.mlp = self._mlp(index, channels)
        return block

    @contextmanager
    def applied(self, genome: Genome) -> Iterator[nn.Module]:
        """The supernet's model running ``genome`` for the length of the ``with`` block, then restored. The
        kept layers keep their indices into the KV cache (holes where layers went, which a dynamic cache
        tolerates); the config's ``layer_types`` (sliding-window layers) follow the kept layers meanwhile."""
        self.check(genome)
        parent_name, _, attr = self.block_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layers = [self.block(i, c) for i, c in enumerate(genome)]
        config = getattr(self.model, "config", None)
        types = getattr(config, "layer_types", None)
        setattr(parent, attr, nn.ModuleList([b for b in layers if b is not None]))
        if types is not None:
            config.layer_types = [t for t, b in zip(types, layers, strict=True) if b is not None]
        try:
            yield self.model
        finally:
            setattr(parent, attr, self.blocks)
            if types is not None:
                config.layer_types = types

    def materialise(self, genome: Genome) -> nn.Module:
        """A new model with ``genome``'s widths, its own tensors, layers renumbered and config updated
        (heterogeneous widths: :func:`~prunekit.structured.llm.hf_config.update_config`). The supernet's model
        is not modified."""
        removed = {i for i, (units, channels) in enumerate(genome) if units == 0 and channels == 0}
        with self.applied(genome) as running:
            pruned = copy.deepcopy(running)
        # the copy holds the kept layers only: put placeholders where the removed ones were, then take them
        # out the way depth pruning does (kept layers renumbered, the config's layer count and types updated)
        parent_name, _, attr = self.block_name.rpartition(".")
        parent = pruned.get_submodule(parent_name) if parent_name else pruned
        kept = iter(getattr(parent, attr))
        setattr(
            parent, attr, nn.ModuleList([nn.Identity() if i in removed else next(kept) for i in range(len(genome))])
        )
        if removed:
            shorten_module_list(pruned, self.block_name, removed)
        update_config(pruned)
        return pruned


def _units_columns(layout: LayerLayout) -> torch.Tensor:
    """``o_proj`` input columns of every attention unit: ``(units, unit_heads x head_dim)``."""
    width = layout.unit_heads * layout.head_dim
    return torch.arange(layout.units * width).reshape(layout.units, width)


def _with_inputs_of(
    linear: nn.Module, runs: Sequence[Callable[[], torch.Tensor]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The inputs ``linear`` receives while each of ``runs`` is called, and what the calls return, in order."""
    seen: list[torch.Tensor] = []

    def keep(_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(first_input(args, kwargs, "input").detach())

    with observe({"linear": linear}, on_input=keep):
        outputs = [run() for run in runs]
    return seen, outputs


def _expected_weight(fit: SublayerFit, weights: dict[int, float], dampening: float) -> torch.Tensor:
    """The reader's refitted weight at each width (zero on the columns it removes), summed with ``weights``:
    applied to the sublayer's dense inputs it gives the expected output over the widths (one product)."""
    total = torch.zeros_like(fit.weight, dtype=torch.float64)
    units = fit.columns.shape[0]
    for keep, weight in weights.items():
        if keep == units:
            total += weight * fit.weight.double()
        else:
            kept = fit.kept(keep)
            total[:, fit.columns[kept].flatten()] += weight * fit.refit(kept, dampening).double()
    return total.to(fit.weight.dtype)


def _fit_attention(
    block: nn.Module,
    layout: LayerLayout,
    ladder: Ladder,
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    dampening: float,
) -> tuple[SublayerFit, torch.Tensor, list[torch.Tensor]]:
    """The attention's local pruning problem on the expected inputs ``hidden`` (one tensor per batch), its mean
    output (what a dropped attention returns), and the hidden states after it, expected over the ladder."""
    attention = getattr(block, ATTENTION_NAME)
    norm = getattr(block, INPUT_NORM_NAME)
    o = attention.o_proj
    inputs, dense_out = _with_inputs_of(
        o,
        [
            lambda x=x, call=call: attention(hidden_states=norm(x), **call.kwargs)[0]
            for x, call in zip(hidden, calls, strict=True)
        ],
    )
    gram = sum(gram_of(z.reshape(-1, z.shape[-1])) for z in inputs)
    tokens = sum(z.numel() // z.shape[-1] for z in inputs)
    mean = (sum(y.reshape(-1, y.shape[-1]).double().sum(0) for y in dense_out) / tokens).float()
    columns = _units_columns(layout)
    deepest = layout.units - min([k for k in ladder.attention if k] or [layout.units])
    order = remove_groups(o.weight.detach(), gram, columns.tolist(), deepest, dampening=dampening).removed
    fit = SublayerFit(o.weight.detach(), gram, columns, order)
    kept, dropped, _ = ladder_weights(ladder)
    weight = _expected_weight(fit, kept, dampening)
    kept_share = sum(kept.values())
    shift = dropped * mean + (kept_share * o.bias.float() if o.bias is not None else 0.0)
    middle = [x + nn.functional.linear(z, weight) + shift.to(x.dtype) for x, z in zip(hidden, inputs, strict=True)]
    return fit, mean, middle


def _fit_mlp(
    block: nn.Module, layout: LayerLayout, ladder: Ladder, hidden: list[torch.Tensor], dampening: float
) -> tuple[SublayerFit, list[torch.Tensor]]:
    """The MLP's local pruning problem on the expected inputs ``hidden``, and the hidden states after it,
    expected over the ladder (no MLP adds nothing)."""
    mlp, down = block.mlp, block.mlp.down_proj
    norm = getattr(block, POST_ATTENTION_NORM_NAME)
    activations, _ = _with_inputs_of(down, [lambda x=x: mlp(norm(x)) for x in hidden])
    gram = sum(gram_of(a.reshape(-1, a.shape[-1])) for a in activations)
    deepest = layout.channels - min([k for k in ladder.mlp if k] or [layout.channels])
    order = column_removal_order(down.weight.detach(), gram, deepest, dampening=dampening)
    fit = SublayerFit(down.weight.detach(), gram, torch.arange(layout.channels)[:, None], order)
    _, _, kept = ladder_weights(ladder)
    weight = _expected_weight(fit, kept, dampening)
    kept_share = sum(kept.values())
    bias = kept_share * down.bias if down.bias is not None else None
    return fit, [x + nn.functional.linear(a, weight, bias) for x, a in zip(hidden, activations, strict=True)]


def build_supernet(
    model: nn.Module,
    calibration: torch.Tensor,
    ladders: Sequence[Ladder],
    *,
    batch_size: int = 1,
    dampening: float = 0.01,
    cache_bytes: int = 1 << 30,
    progress: bool = True,
) -> Supernet:
    """Build the :class:`Supernet` of ``model`` on the ``(n, seqlen)`` ``calibration`` windows, one ladder per
    decoder layer, layer by layer on the expected outputs of the layers before (see the module docstring).
    ``model`` is not modified (the supernet shares its tensors and swaps its decoder layers only inside
    :meth:`Supernet.applied`)."""
    _, blocks = find_decoder_blocks(model)
    if len(ladders) != len(blocks):
        raise StructuralPruningError(f"{len(ladders)} ladders for {len(blocks)} decoder layers")
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        raise StructuralPruningError(
            "the model runs under accelerate hooks (device_map offload or several devices): the width search "
            "assembles layers from the model's own tensors and needs them in memory on one device; load the model "
            "without device_map (prunekit.load_model(..., device='cuda' or 'cpu'))"
        )
    layouts = [layer_layout(block, i) for i, block in enumerate(blocks)]
    device = next(model.parameters()).device
    captured = capture_block_inputs(model, blocks, calibration, batch_size, device)
    hidden = [h.detach() for h in captured.hidden]
    attention_fits: list[SublayerFit] = []
    mlp_fits: list[SublayerFit] = []
    means: list[torch.Tensor] = []
    with torch.no_grad():
        for index, block in enumerate(tqdm(blocks, desc="supernet", unit="layer", disable=not progress)):
            calls = captured.calls[index]
            if any(call.args for call in calls):
                raise StructuralPruningError(f"decoder layer {index} takes positional arguments the search cannot pass")
            fit, mean, hidden = _fit_attention(block, layouts[index], ladders[index], hidden, calls, dampening)
            attention_fits.append(fit)
            means.append(mean)
            fit, hidden = _fit_mlp(block, layouts[index], ladders[index], hidden, dampening)
            mlp_fits.append(fit)
    return Supernet(
        model, layouts, list(ladders), attention_fits, mlp_fits, means, dampening=dampening, cache_bytes=cache_bytes
    )


def prune_to_widths(
    model: nn.Module,
    calibration: torch.Tensor,
    genome: Genome,
    *,
    batch_size: int = 1,
    dampening: float = 0.01,
    progress: bool = True,
) -> nn.Module:
    """``model`` pruned to the widths of ``genome``, layer by layer: each layer's local pruning (second-order
    order, least-squares refit) fitted on the outputs of the already-pruned layers before it (a supernet whose
    ladders hold that one choice, so the expectation is the pruned model itself: sequential pruning with the
    error propagated exactly). ``model`` is not modified."""
    ladders = [Ladder((units,), (channels,)) for units, channels in genome]
    supernet = build_supernet(
        model, calibration, ladders, batch_size=batch_size, dampening=dampening, progress=progress
    )
    return supernet.materialise(genome)
