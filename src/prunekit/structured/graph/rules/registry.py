"""The registry of dependency rules: which rule handles which ATen operation.

A rule is registered for the operations it handles by the :func:`rule` decorator, by ATen name (an
``OpOverloadPacket`` of ``torch.ops.aten``; names this torch lacks are skipped when the table is built),
as Torch-Pruning keeps an explicit registry of its operations. :data:`RULES` is the only mutable state
of the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx

from prunekit.structured.graph.atoms import AtomTable

Dims = list[np.ndarray]


@dataclass
class RuleContext:
    """What a rule can read and where it records what surgery needs beyond parameter shapes."""

    table: AtomTable
    node: torch.fx.Node
    #: ``id(group atoms array)`` per grouped convolution / group norm node: the atoms of their groups.
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    #: Operations that froze dimensions because no rule knows them (name -> count).
    unknown: dict[str, int] = field(default_factory=dict)
    #: Dimensions that an addition joined from two tensors of different origin (residual connections).
    summed: list[np.ndarray] = field(default_factory=list)


Rule = Callable[[RuleContext, list[Any], dict[str, Any]], Any]

#: ATen operation name (``"view"``) -> the rule that handles it; filled by :func:`rule`.
RULES: dict[str, Rule] = {}


def rule(*op_names: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of the ATen operations ``op_names`` (``"view"`` for
    ``torch.ops.aten.view``, any overload). A name registered twice is an error: one rule per operation."""

    def register(function: Rule) -> Rule:
        for name in op_names:
            if name in RULES and RULES[name] is not function:
                raise ValueError(f"aten.{name} already has the rule {RULES[name].__name__}")
            RULES[name] = function
        return function

    return register
