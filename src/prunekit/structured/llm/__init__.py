"""Structural pruning of Hugging Face causal LMs, with a config that plain ``transformers`` loads.

- :mod:`.width`: hidden size, MLP width and attention heads (in whole key/value groups), through the
  generic machinery of :mod:`prunekit.structured`, refitted by least squares;
- :mod:`.attention_drop`: the attention sublayers of the least influential layers dropped (He et al. 2024);
- :mod:`.depth`: whole decoder layers removed by ShortGPT's Block Influence (Men et al. 2024);
- :mod:`.hf_config`: the pruned sizes written into the model's config, and checked by rebuilding a layer;
- :mod:`.layer_widths`, :mod:`.supernet`, :mod:`.search_space`, :mod:`.search`, :mod:`.decode_latency`:
  per-layer widths searched (Týr-the-Pruner): a layer's choices and their parameter counts, local
  second-order prunings at a ladder of widths, the genome operations, the evolutionary search on the KL from
  the dense model, and the measured batch-1 decode latency model of its speed constraint;
- :mod:`.windows`: calibration windows as model calls.
"""

from prunekit.structured.llm.attention_drop import (
    attention_statistics,
    drop_attention,
    least_influential_attention,
    prune_causal_lm_attention,
)
from prunekit.structured.llm.depth import layer_influence, prune_causal_lm_depth
from prunekit.structured.llm.hf_config import (
    ATTENTION_SIZED_BY_HIDDEN,
    EMBEDDINGS_SCALED_BY_HIDDEN,
    MLP_WIDTH_FIELD,
    check_config_reload,
    update_config,
)
from prunekit.structured.llm.layer_widths import Ladder
from prunekit.structured.llm.search import SearchResult, WidthSearchConfig, WidthSearchSettings, search_widths
from prunekit.structured.llm.supernet import Supernet, build_supernet, prune_to_widths
from prunekit.structured.llm.width import prune_causal_lm_width

__all__ = [
    "ATTENTION_SIZED_BY_HIDDEN",
    "EMBEDDINGS_SCALED_BY_HIDDEN",
    "MLP_WIDTH_FIELD",
    "Ladder",
    "SearchResult",
    "Supernet",
    "WidthSearchConfig",
    "WidthSearchSettings",
    "attention_statistics",
    "build_supernet",
    "check_config_reload",
    "drop_attention",
    "layer_influence",
    "least_influential_attention",
    "prune_causal_lm_attention",
    "prune_causal_lm_depth",
    "prune_causal_lm_width",
    "prune_to_widths",
    "search_widths",
    "update_config",
]
