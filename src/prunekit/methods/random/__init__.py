"""Random pruning: the control every criterion must beat."""

from prunekit.methods.random.method import Random
from prunekit.methods.random.scores import random_scores

__all__ = ["Random", "random_scores"]
