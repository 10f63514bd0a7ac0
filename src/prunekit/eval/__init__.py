"""Measurement of pruned models: perplexity (more to come: accuracy, latency, FLOPs)."""

from prunekit.eval.perplexity import PerplexityResult, perplexity, perplexity_of_tokens

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_tokens"]
