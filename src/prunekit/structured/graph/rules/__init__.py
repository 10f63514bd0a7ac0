"""Which tensor indices each traced operation couples: one rule per ATen operation (or family of them).

A rule receives the atoms of its tensor arguments (one numpy array per dimension, see
:mod:`prunekit.structured.graph.atoms`), unifies what the operation forces to shrink together, and returns
the atoms of its outputs. Rules are registered by ATen name with :func:`~.registry.rule`
(:mod:`.views`: operations that move or select; :mod:`.compute`: operations that compute); an operation
without one is handled by torch's ``pointwise`` tag, or else frozen (:func:`~.shapes.rule_unknown`).
"""

from __future__ import annotations

from typing import Any

import torch

from prunekit.structured.graph.atoms import FROZEN
from prunekit.structured.graph.rules import compute, views
from prunekit.structured.graph.rules.compute import rule_pointwise
from prunekit.structured.graph.rules.registry import RULES, Dims, Rule, RuleContext, rule
from prunekit.structured.graph.rules.shapes import freeze_dims, frozen_dims, reshape_dims, rule_unknown, shape_of

aten = torch.ops.aten

#: The modules whose import registers their rules.
RULE_MODULES = (views, compute)


def build_rule_table() -> dict[Any, Rule]:
    """Rules keyed by ATen overload packet (``aten.view``): any overload of the packet uses the rule."""
    table: dict[Any, Rule] = {}
    for name, function in RULES.items():
        packet = getattr(aten, name, None)
        if packet is not None:
            table[packet] = function
    return table


def rule_for(target: Any, table: dict[Any, Rule]) -> Rule:
    """The rule for an ATen overload: by packet, then any pointwise op, else :func:`rule_unknown`."""
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in table:
        return table[packet]
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags:
        return rule_pointwise
    return rule_unknown


__all__ = [
    "FROZEN",
    "RULES",
    "Dims",
    "Rule",
    "RuleContext",
    "build_rule_table",
    "freeze_dims",
    "frozen_dims",
    "reshape_dims",
    "rule",
    "rule_for",
    "shape_of",
]
