"""Per-layer sparsity budgets for one-shot pruning: the same sparsity everywhere (``uniform``), or OWL's
outlier-weighed layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret
Sauce for Pruning LLMs to High Sparsity", Sec. 3).

OWL counts, in every decoder block, the share of Wanda scores ``|W_ij| * ||X_j||_2`` above ``M`` times the
block's mean score (its layerwise outlier distribution, LOD, Eq. 2), and gives blocks with more outliers more
weights to keep: the LODs are scaled linearly to ``[0, 2 * lambda]``, centred, and added to the kept share
``1 - s`` (the reference code's normalisation). prunekit centres them on the *parameter-weighted* mean, so the
budgets keep exactly ``1 - s`` of the pruned weights whatever the blocks' sizes (equal blocks: the same as OWL).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prunekit.calibration.engine import run_sequential
from prunekit.calibration.statistics import LayerStatistics
from prunekit.core.errors import ConfigError
from prunekit.models.targets import Target, weight_matrix


def outlier_share(scores: Sequence[torch.Tensor], multiple: float) -> float:
    """The share of all entries of ``scores`` (one block's score matrices) above ``multiple`` times their mean
    (OWL's layerwise outlier distribution, as a fraction rather than a percentage)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > multiple * flat.mean()).sum()) / flat.numel()


def owl_sparsities(
    outliers: Mapping[int, float], sizes: Mapping[int, int], sparsity: float, max_deviation: float
) -> dict[int, float]:
    """Per-block sparsities from the blocks' outlier shares: ``1 - (1 - sparsity + d_b - sum_c w_c d_c)`` with
    ``d_b`` the outlier shares scaled to ``[0, 2 * max_deviation]`` and ``w_c`` each block's share of the pruned
    weights (``sizes``), so that the weighted mean sparsity is exactly ``sparsity``. All blocks alike: uniform."""
    blocks = sorted(outliers)
    values = torch.tensor([outliers[b] for b in blocks], dtype=torch.float64)
    spread = float(values.max() - values.min())
    scaled = (values - values.min()) / spread * 2 * max_deviation if spread > 0 else torch.zeros_like(values)
    weights = torch.tensor([sizes[b] for b in blocks], dtype=torch.float64)
    centred = scaled - (scaled * weights).sum() / weights.sum()
    result = {b: float(sparsity - c) for b, c in zip(blocks, centred.tolist(), strict=True)}
    bad = {b: s for b, s in result.items() if not 0.0 <= s < 1.0}
    if bad:
        raise ConfigError(
            f"OWL budgets at sparsity {sparsity} with owl_max_deviation {max_deviation} give blocks sparsities "
            f"outside [0, 1) ({', '.join(f'{b}: {s:.3f}' for b, s in sorted(bad.items()))}): lower owl_max_deviation"
        )
    return result


def block_outlier_shares(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    targets: Sequence[Target],
    calibration: torch.Tensor,
    multiple: float,
    *,
    device: torch.device,
    batch_size: int = 1,
    progress: bool = True,
) -> tuple[dict[int, float], dict[int, int]]:
    """One pass of the calibration windows through the dense model (nothing is pruned): every block's outlier
    share of Wanda scores (:func:`outlier_share`) and its number of target weights. A block's scores are held
    only until its last target has been scored."""
    expected = Counter(t.block_index for t in targets)
    scores: dict[int, list[torch.Tensor]] = {}
    shares: dict[int, float] = {}
    sizes: dict[int, int] = {}

    def record(target: Target, inputs: LayerStatistics) -> None:
        weight = weight_matrix(target.module).detach().float()
        if inputs.sq_norms is None:
            return
        norms = inputs.sq_norms.to(weight.device).float().sqrt()
        block = int(target.block_index)  # type: ignore[arg-type]
        scores.setdefault(block, []).append(weight.abs() * norms)
        sizes[block] = sizes.get(block, 0) + weight.numel()
        if len(scores[block]) == expected[block]:
            shares[block] = outlier_share(scores.pop(block), multiple)

    run_sequential(
        model,
        blocks_name,
        blocks,
        targets,
        calibration,
        record,
        device=device,
        batch_size=batch_size,
        sample_tokens=0,
        propagation="dense",
        progress=progress,
    )
    missing = sorted(set(expected) - set(shares))
    if missing:
        raise ConfigError(
            f"no calibration token reached every target of blocks {missing}: OWL budgets need every block's "
            "activations (more or longer calibration windows)"
        )
    return shares, sizes
