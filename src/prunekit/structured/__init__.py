"""Structural pruning of any PyTorch model: trace, couple, score, plan, cut.

    result = prune_structurally(model, (example,), ratio=0.5)     # all of the below, with retries

or step by step::

    graph = build_dependency_graph(model, (example,))
    scores = unit_importance(graph, model, "l2")
    plan = plan_pruning(graph, scores, ratio=0.5, round_to=8)
    logging.getLogger(__name__).info(plan.describe())   # what will be cut, space by space
    pruned = apply_plan(model, plan, (example,))
"""

from prunekit.io.pruned import load_pruned, save_pruned
from prunekit.structured.graph import DependencyGraph, Space, build_dependency_graph
from prunekit.structured.graph.fold_bn import fold_batch_norms
from prunekit.structured.graph.surgery import apply_plan
from prunekit.structured.importance import unit_importance
from prunekit.structured.knapsack import plan_latency_aware
from prunekit.structured.latency import BATCH_NORM_OPS, LatencyTable, planned_latency
from prunekit.structured.plan import StructuralPlan, plan_pruning, plan_removing, units_to_keep
from prunekit.structured.prune import StructuralResult, prune_iteratively, prune_structurally

__all__ = [
    "BATCH_NORM_OPS",
    "DependencyGraph",
    "LatencyTable",
    "Space",
    "StructuralPlan",
    "StructuralResult",
    "apply_plan",
    "build_dependency_graph",
    "fold_batch_norms",
    "load_pruned",
    "plan_latency_aware",
    "plan_pruning",
    "plan_removing",
    "planned_latency",
    "prune_iteratively",
    "prune_structurally",
    "save_pruned",
    "unit_importance",
    "units_to_keep",
]
