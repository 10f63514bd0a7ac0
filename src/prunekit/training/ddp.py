"""Masks decided identically on every rank of a ``torch.distributed`` job.

Data-parallel ranks see different batches, so any statistic a pruning decision reads from one rank (the last
gradient, for GraNet's regrowth) differs between ranks, and floating-point non-determinism can make even the
weights differ slightly. A mask that differs between ranks silently breaks data parallelism (each rank would
train a different network). The :class:`~prunekit.training.sparsifier.Sparsifier` therefore

1. averages the gradient statistics over ranks before deciding (:func:`all_reduce_mean_`), the gradient that
   ``DistributedDataParallel`` itself would apply (Evci et al. 2020, RigL, use the all-reduced dense gradient), and
2. takes rank 0's decision: after every mask update the masks are broadcast from rank 0
   (:func:`broadcast_masks_`), so all ranks hold bit-identical masks whatever their local state.

All functions are no-ops when ``torch.distributed`` is not initialised. Masks travel as ``uint8`` (the gloo
backend has no ``bool``), packed into one buffer per call.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch

from prunekit.core.distributed import is_distributed


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over all ranks in place (one packed ``all_reduce``); same order on every rank."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= torch.distributed.get_world_size()
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.reshape(tensor.shape))


def broadcast_masks_(masks: MutableMapping[str, torch.Tensor], src: int = 0) -> None:
    """Replace every rank's boolean masks by rank ``src``'s (one packed ``broadcast``), in place.

    Names are taken in insertion order, which is the model's parameter order on every rank.
    """
    if not is_distributed() or not masks:
        return
    names = list(masks)
    flat = torch.cat([masks[name].reshape(-1).to(torch.uint8) for name in names])
    torch.distributed.broadcast(flat, src=src)
    for name, part in zip(names, flat.split([masks[name].numel() for name in names]), strict=True):
        masks[name] = part.reshape(masks[name].shape).bool()
