"""The dependency graph of a model: what must shrink together when a channel, a head or a group goes.

- :mod:`.trace`: the model traced to ATen operations (``torch.export``);
- :mod:`.atoms`: indices of tensor dimensions, unified when coupled (a union-find);
- :mod:`.rules`: which indices each operation couples, one registered rule per ATen operation;
- :mod:`.dependency`: the graph itself (:class:`DependencyGraph`), its prunable spaces and units;
- :mod:`.surgery`: a plan applied to the model's modules; :mod:`.verify`: the pruned model checked
  against the plan, size attributes repaired;
- :mod:`.fold_bn`: BatchNorms folded into the convolutions before them, for deployment.
"""

from prunekit.structured.graph.dependency import DependencyGraph, Space, build_dependency_graph, tie_widths

__all__ = ["DependencyGraph", "Space", "build_dependency_graph", "tie_widths"]
