"""Mixture-of-experts pruning of whole experts: score every layer's experts on calibration tokens (REAP,
frequency, STUN's behavioural clusters, NAEE's subset search), remove the same number from every layer (or
merge them into the kept ones), and save a model plain transformers reloads. Pruning *inside* experts is
one-shot pruning (:mod:`prunekit.oneshot`), where every expert's matrices are targets."""

from prunekit.moe.config import ExpertPruneConfig
from prunekit.moe.criteria import criterion_names
from prunekit.moe.remove import ExpertPruneResult, LayerExperts, prune_experts

__all__ = ["ExpertPruneConfig", "ExpertPruneResult", "LayerExperts", "criterion_names", "prune_experts"]
