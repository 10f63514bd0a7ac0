"""Expert criteria against hand computations on the toy MoE layer (3 experts, top-2, hidden 8, width 6)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from models import EXPERTS, HIDDEN, TOY_VOCAB, WIDTH, MoeOnly, moe_only
from prunekit.moe import ExpertPruneConfig, prune_experts
from prunekit.moe.criteria import SelectionContext, criterion_names, keep_best, stun
from prunekit.moe.statistics import LayerRouting


def calibration() -> torch.Tensor:
    return torch.randint(0, TOY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))


def by_hand(model: MoeOnly, ids: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer by hand with only the experts ``keep``: each token goes to the best two of them (softmax over
    the kept logits, top-2, renormalised) and the output is the weighted sum of ``down(silu(gate x) * up x)``.
    Returns the output, the routing weights ``(tokens, E)`` and the per-expert output norms ``(tokens, E)``."""
    mlp = model.layers[0].mlp
    with torch.no_grad():
        x = model.embed(ids).reshape(-1, HIDDEN)
        logits = (x @ mlp.gate.weight.t())[:, keep]
        top_w, top_i = torch.softmax(logits, -1).topk(2, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        weights = torch.zeros(x.shape[0], EXPERTS)
        weights.scatter_(1, torch.tensor(keep)[top_i], top_w)
        out = torch.zeros_like(x)
        norms = torch.zeros(x.shape[0], EXPERTS)
        for e in keep:
            gate_up = mlp.experts.gate_up_proj[e]
            f = (F.silu(x @ gate_up[:WIDTH].t()) * (x @ gate_up[WIDTH:].t())) @ mlp.experts.down_proj[e].t()
            norms[:, e] = f.norm(dim=-1)
            out += weights[:, e : e + 1] * f
    return out, weights, norms


def test_frequency_and_reap_match_the_hand_computation() -> None:
    model, ids = moe_only(), calibration()
    result = prune_experts(model, ExpertPruneConfig(remove=0.34, criterion="reap"), ids, progress=False)
    _, weights, norms = by_hand(model, ids, list(range(EXPERTS)))
    routed = weights > 0
    assert result.layers[0].counts == routed.sum(0).tolist()
    reap = (weights * norms).sum(0) / routed.sum(0)
    assert result.layers[0].reap == pytest.approx(reap.tolist(), rel=1e-5)
    assert result.layers[0].removed == [int(reap.argmin())]
    frequency = prune_experts(model, ExpertPruneConfig(remove=0.34, criterion="frequency"), ids, progress=False)
    assert frequency.layers[0].scores == pytest.approx((routed.sum(0) / ids.numel()).tolist())


@pytest.mark.parametrize("exhaustive_limit", [5000, 1])  # every subset / greedy
def test_reconstruct_keeps_the_subset_with_the_least_output_error(exhaustive_limit: int) -> None:
    model, ids = moe_only(), calibration()
    dense, _, _ = by_hand(model, ids, list(range(EXPERTS)))
    errors = {}
    for keep in itertools.combinations(range(EXPERTS), EXPERTS - 1):
        out, _, _ = by_hand(model, ids, list(keep))
        errors[keep] = float((out - dense).pow(2).sum() / dense.pow(2).sum())
    best = min(errors, key=errors.__getitem__)
    config = ExpertPruneConfig(
        remove=0.34, criterion="reconstruct", sample_tokens=1000, exhaustive_limit=exhaustive_limit
    )
    result = prune_experts(model, config, ids, progress=False)
    assert tuple(result.layers[0].kept) == best
    assert result.layers[0].relative_error == pytest.approx(errors[best], rel=1e-4)
    assert all(result.layers[0].relative_error <= error + 1e-7 for error in errors.values())


def routing(counts: list[float], coactivation: list[list[float]] | None = None, tokens: int = 10) -> LayerRouting:
    stats = LayerRouting.empty(len(counts))
    stats.counts = torch.tensor(counts, dtype=torch.float64)
    if coactivation is not None:
        stats.coactivation = torch.tensor(coactivation, dtype=torch.float64)
    stats.tokens = tokens
    return stats


def context(
    router: list[list[float]], remove: int, weights: list[float], coactivation: float = 0.0
) -> SelectionContext:
    return SelectionContext(
        remove=remove,
        groups=1,
        router_weight=torch.tensor(router),
        loss=lambda keep: 0.0,
        expert_tensors=lambda e: [torch.tensor([weights[e]])],
        coactivation_weight=coactivation,
    )


ROUTER = [[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [0.0, 1.2]]
# router-row distances: |r0 - r1| = 1 and |r2 - r4| = 0.2 are the closest pairs, then |r0 - r2| = 1.41


def test_stun_merges_the_closest_router_rows_and_keeps_the_member_nearest_the_mean() -> None:
    weights = [0.0, 1.0, 5.0, 7.0, 9.0]
    assert stun(routing([1] * 5), context(ROUTER, remove=1, weights=weights)).keep == [0, 1, 2, 3]  # {2, 4} -> 2
    # two merges: {2, 4} then {0, 1}; each pair keeps its first member (both are as near their mean)
    assert stun(routing([1] * 5), context(ROUTER, remove=2, weights=weights)).keep == [0, 2, 3]
    # three: {0, 1} joins {2, 4} (|r0 - r2| = 1.41 < |r0 - r3| = 2.24): the member nearest the mean of 0, 1, 5, 9
    # (3.75) is expert 2 (weight 5)
    assert stun(routing([1] * 5), context(ROUTER, remove=3, weights=weights)).keep == [2, 3]


def test_stun_coactivation_pulls_experts_together() -> None:
    coact = [[0.0] * 5 for _ in range(5)]
    coact[0][3] = coact[3][0] = 10.0  # 0 and 3 always fire together: distance 2.24/3.07 - 1 * 10/10 < 0
    weights = [0.0, 1.0, 5.0, 7.0, 9.0]
    assert stun(routing([1] * 5, coact), context(ROUTER, remove=1, weights=weights, coactivation=1.0)).keep == [
        0,
        1,
        2,
        4,
    ]


def test_keep_best_ties_and_groups() -> None:
    assert keep_best(torch.tensor([3.0, 1.0, 2.0, 1.0]), 1) == [0, 1, 2]  # of a tie, the later index goes
    assert keep_best(torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]), 2, groups=2) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="multiple of the 2"):
        keep_best(torch.zeros(8), 3, groups=2)


def test_criteria_are_named() -> None:
    assert criterion_names() == ["frequency", "reap", "reconstruct", "stun"]
