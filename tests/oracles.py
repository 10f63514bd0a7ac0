"""Independent, slow reference implementations of the engine (many passes, no greenlets)."""

import torch

from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import find_targets, weight_matrix


def first_block_inputs(model, blocks, calibration):
    """Each window's hidden states entering block 0, and the block's other arguments (one window a call)."""
    grabbed = {}

    def grab(module, args, kwargs):
        grabbed["args"], grabbed["kwargs"] = args, kwargs
        raise StopIteration

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    hidden, rest = [], []
    for row in calibration:
        try:
            model(input_ids=row[None], use_cache=False)
        except StopIteration:
            hidden.append(grabbed["args"][0])
            rest.append((grabbed["args"][1:], grabbed["kwargs"]))
    handle.remove()
    return hidden, rest


def true_sequential_oracle(model, calibration, prune):
    """Independent reference: for each target in forward order, run the whole block over all windows
    (with the layers pruned so far) to collect that layer's inputs ``x_all`` (tokens x in), then set its
    weight to ``prune(weight, x_all)``. O(layers) passes."""
    blocks_name, blocks = find_decoder_blocks(model)
    targets = find_targets(model, blocks_name)
    hidden, rest = first_block_inputs(model, blocks, calibration)
    for index, block in enumerate(blocks):
        for target in [t for t in targets if t.block_index == index]:
            seen = []
            h = target.module.register_forward_pre_hook(
                lambda m, a, seen=seen: seen.append(a[0].reshape(-1, a[0].shape[-1]))
            )
            with torch.no_grad():
                for x, (args, kwargs) in zip(hidden, rest, strict=True):
                    block(x, *args, **kwargs)
            h.remove()
            x_all = torch.cat(seen)
            w = weight_matrix(target.module)
            with torch.no_grad():
                w.copy_(prune(w.clone(), x_all))
        with torch.no_grad():
            outs = [block(x, *args, **kwargs) for x, (args, kwargs) in zip(hidden, rest, strict=True)]
        hidden = [o if isinstance(o, torch.Tensor) else o[0] for o in outs]
    return model


def keep_mask_by_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference implementation of :func:`drop_lowest_k` by stable sort (used in tests)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep.scatter_(-1, order[..., scores.shape[-1] - k :], False)
    return keep
