"""What a decoder layer can be cut to, and what each cut costs: the vocabulary of the width search.

- a layer's choice is ``(attention units kept, MLP channels kept)`` (:data:`LayerChoice`; ``(0, c)`` drops the
  attention, ``(0, 0)`` removes the layer) and a :data:`Genome` holds one per layer;
- :class:`LayerLayout` (from :func:`layer_layout`) counts a choice's parameters exactly, as
  ``model.parameters()`` would after the cut;
- a :class:`Ladder` lists the widths one layer may take in one iteration of the search, and
  :func:`ladder_weights` is the uniform distribution over its legal choices (the weights of the supernet's
  expected outputs: Týr-the-Pruner's expectation error accumulation, Li et al. 2025, Sec. 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunekit.core.errors import StructuralPruningError
from prunekit.models.dropped_attention import ATTENTION_NAME
from prunekit.structured.llm.attention_drop import INPUT_NORM_NAME, POST_ATTENTION_NORM_NAME, check_layer

#: ``(attention units kept, MLP channels kept)`` of one decoder layer; ``(0, 0)`` is the layer removed.
LayerChoice = tuple[int, int]
#: One choice per decoder layer.
Genome = tuple[LayerChoice, ...]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerLayout:
    """What one decoder layer is made of and what each of its units costs in parameters."""

    units: int  # attention units: key/value groups, or query heads under multi-query attention
    unit_heads: int  # query heads per unit
    head_dim: int
    kv_per_unit: int  # key/value heads that leave with a unit (0 under multi-query attention)
    channels: int  # MLP channels
    unit_params: int
    channel_params: int
    attention_fixed: int  # what the attention keeps while it has a unit: input norm, o_proj bias, shared k/v
    mlp_fixed: int  # post-attention norm, down_proj bias

    def params(self, choice: LayerChoice) -> int:
        """Parameters of the layer with ``choice``."""
        units, channels = choice
        attention = self.attention_fixed + units * self.unit_params if units else 0
        mlp = self.mlp_fixed + channels * self.channel_params if channels or units else 0
        return attention + mlp

    @property
    def dense(self) -> LayerChoice:
        return (self.units, self.channels)


def parameter_count(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def layer_layout(block: nn.Module, index: int) -> LayerLayout:
    """The :class:`LayerLayout` of a pre-norm decoder layer with ``q/k/v/o_proj`` attention and a
    ``gate/up/down_proj`` MLP; anything else is refused with the reason."""
    instead = "prune_causal_lm_width (uniform widths) or prune_causal_lm_depth"
    check_layer(block, index, method="the width search", instead=instead)
    attention, mlp = getattr(block, ATTENTION_NAME), block.mlp
    missing = [n for n in _PROJECTIONS if not isinstance(getattr(attention, n, None), nn.Linear)]
    missing += [f"mlp.{n}" for n in _MLP if not isinstance(getattr(mlp, n, None), nn.Linear)]
    head_dim = getattr(attention, "head_dim", None)
    if missing or not isinstance(head_dim, int):
        raise StructuralPruningError(
            f"decoder layer {index} ({type(block).__name__}) lacks {missing or ['head_dim']}: the width search "
            f"supports attention with separate q/k/v/o projections and gated MLPs (Llama, Mistral, Qwen2/3...): use "
            f"{instead}"
        )
    heads = attention.q_proj.out_features // head_dim
    kv_heads = attention.k_proj.out_features // head_dim
    if heads % kv_heads:
        raise StructuralPruningError(f"layer {index}: {heads} query heads do not split into {kv_heads} groups")
    q, k, v, o = (getattr(attention, n) for n in _PROJECTIONS)

    def rows(linear: nn.Linear, count: int) -> int:
        return count * (linear.in_features + (linear.bias is not None))

    if kv_heads > 1:
        units, unit_heads, kv_per_unit = kv_heads, heads // kv_heads, 1
        shared = 0
    else:
        units, unit_heads, kv_per_unit = heads, 1, 0
        shared = parameter_count(k, v)
    unit_params = rows(q, unit_heads * head_dim) + 2 * rows(k, kv_per_unit * head_dim)
    unit_params += o.out_features * unit_heads * head_dim
    o_bias = o.bias.numel() if o.bias is not None else 0
    gate, up, down = (getattr(mlp, n) for n in _MLP)
    channel_params = rows(gate, 1) + rows(up, 1) + down.out_features
    down_bias = down.bias.numel() if down.bias is not None else 0
    layout = LayerLayout(
        units=units,
        unit_heads=unit_heads,
        head_dim=head_dim,
        kv_per_unit=kv_per_unit,
        channels=gate.out_features,
        unit_params=unit_params,
        channel_params=channel_params,
        attention_fixed=parameter_count(getattr(block, INPUT_NORM_NAME)) + o_bias + shared,
        mlp_fixed=parameter_count(getattr(block, POST_ATTENTION_NORM_NAME)) + down_bias,
    )
    if layout.params(layout.dense) != parameter_count(block):
        raise StructuralPruningError(
            f"decoder layer {index} holds {parameter_count(block)} parameters, the width search accounts for "
            f"{layout.params(layout.dense)}: it has parameters outside its attention and MLP projections and norms "
            f"that the search cannot count: use {instead}"
        )
    return layout


@dataclass(frozen=True)
class Ladder:
    """The widths one decoder layer may take: attention units kept, MLP channels kept (``0`` with no
    attention: the layer removed)."""

    attention: tuple[int, ...]
    mlp: tuple[int, ...]


def ladder_weights(ladder: Ladder) -> tuple[dict[int, float], float, dict[int, float]]:
    """The probabilities of the uniform distribution over a ladder's legal choices ``(units, channels)`` (an MLP
    removed only with its attention: the layer removed): of each attention width kept, of the attention dropped
    *with* the MLP kept (whose mean output stands in for it; a removed layer adds nothing), and of each MLP
    width. The supernet's expected outputs weight the widths by these."""
    choices = [(a, m) for a in ladder.attention for m in ladder.mlp if m or not a]
    share = 1.0 / len(choices)
    attention = {a: share * sum(1 for u, m in choices if u == a) for a in ladder.attention if a}
    dropped = share * sum(1 for u, m in choices if u == 0 and m)
    mlp = {m: share * sum(1 for _, c in choices if c == m) for m in ladder.mlp if m}
    return attention, dropped, mlp
