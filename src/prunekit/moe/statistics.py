"""What calibration says about each expert of one MoE layer: how often it is routed to, with how much routing
weight, how large its weighted output is (REAP), which experts fire together, and a sample of the layer's
inputs and dense outputs to measure the error of a kept subset on. Accumulated batch by batch from the calls
of the layer and of its experts module; pure tensor arithmetic."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunekit.calibration.statistics import sample_rows
from prunekit.models.moe_layers import MoeLayer, expert_output


@dataclass
class LayerRouting:
    """Per-expert calibration statistics of one MoE layer (``E`` experts)."""

    #: tokens routed to each expert (each token counts once per expert among its top-k)
    counts: torch.Tensor
    #: sum over routed tokens of the routing weight ``g_e(x)``
    gate_mass: torch.Tensor
    #: sum over routed tokens of ``g_e(x) * ||f_e(x)||_2`` (REAP's numerator)
    weighted_output_norm: torch.Tensor
    #: ``coactivation[i, j]``: tokens routed to both ``i`` and ``j``
    coactivation: torch.Tensor
    #: tokens seen by the layer
    tokens: int = 0
    #: sample rows of the layer's input and of its dense output, for the reconstruction criterion
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, experts: int) -> LayerRouting:
        zeros = torch.zeros(experts, dtype=torch.float64)
        return cls(zeros.clone(), zeros.clone(), zeros.clone(), torch.zeros(experts, experts, dtype=torch.float64))

    def add_routing(
        self, layer: MoeLayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> None:
        """Fold one call of the experts module (``hidden`` ``(tokens, H)``, the top-k indices and weights)."""
        experts = self.counts.shape[0]
        index = top_k_index.reshape(hidden.shape[0], -1)
        weights = top_k_weights.reshape(hidden.shape[0], -1).double()
        one_hot = torch.zeros(hidden.shape[0], experts, dtype=torch.float64, device=hidden.device)
        one_hot.scatter_(1, index, 1.0)
        gate = torch.zeros_like(one_hot).scatter_(1, index, weights)
        self.counts += one_hot.sum(0).cpu()
        self.gate_mass += gate.sum(0).cpu()
        self.coactivation += (one_hot.t() @ one_hot).cpu()
        self.tokens += hidden.shape[0]
        for e in range(experts):
            rows = one_hot[:, e] > 0
            if rows.any():
                norms = expert_output(layer, e, hidden[rows]).double().norm(dim=-1)
                self.weighted_output_norm[e] += float((gate[rows, e] * norms).sum())

    def add_sample(self, hidden: torch.Tensor, output: torch.Tensor, rows: int) -> None:
        """Keep ``rows`` evenly spaced tokens of one batch's layer input and dense output."""
        self.inputs.append(sample_rows(hidden.detach().reshape(-1, hidden.shape[-1]), rows))
        self.outputs.append(sample_rows(output.detach().reshape(-1, output.shape[-1]), rows))  # the same rows

    @property
    def frequency(self) -> torch.Tensor:
        """Fraction of the layer's tokens routed to each expert."""
        return self.counts / max(self.tokens, 1)

    @property
    def reap(self) -> torch.Tensor:
        """REAP saliency (Lasby et al. 2025, Eq. 9): mean over an expert's routed tokens of
        ``g_e(x) * ||f_e(x)||_2``; 0 for an expert no token reached."""
        return torch.where(self.counts > 0, self.weighted_output_norm / self.counts.clamp_min(1), torch.zeros(()))
