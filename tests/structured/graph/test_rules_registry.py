"""The dependency rules are found through an explicit registry filled by the ``@rule`` decorator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.structured.graph.rules import RULES, build_rule_table, rule, rule_for
from prunekit.structured.graph.rules.compute import rule_linear
from prunekit.structured.graph.rules.views import rule_reshape

aten = torch.ops.aten


@pytest.fixture
def registry():
    """The registry as it was before the test, restored after it."""
    saved = dict(RULES)
    yield RULES
    RULES.clear()
    RULES.update(saved)


def test_a_rule_registered_in_a_test_is_found(registry):
    assert rule_for(aten.cumprod.default, build_rule_table()).__name__ == "rule_unknown"

    @rule("cumprod", "no_such_aten_op")
    def rule_cumprod(ctx, args, kwargs):
        return args[0]

    assert registry["cumprod"] is rule_cumprod
    table = build_rule_table()
    assert rule_for(aten.cumprod.default, table) is rule_cumprod
    assert rule_for(aten.cumprod.out, table) is rule_cumprod  # any overload of the packet
    assert all(getattr(packet, "__name__", "") != "no_such_aten_op" for packet in table)  # unknown names skipped


def test_an_operation_has_one_rule(registry):
    with pytest.raises(ValueError, match="already has the rule rule_reshape"):

        @rule("view")
        def rule_other_view(ctx, args, kwargs):
            return args[0]


def test_the_registered_rules_cover_views_and_contractions():
    table = build_rule_table()
    assert rule_for(aten.view.default, table) is rule_reshape
    assert rule_for(aten.linear.default, table) is rule_linear
    assert rule_for(aten.mul.Tensor, table).__name__ == "rule_pointwise"  # by torch's pointwise tag
    assert np.all([callable(f) for f in RULES.values()])
