"""2:4 semi-structured sparse kernels (torch.sparse), where the device supports them: which layers convert, and
their speed against the dense ones."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.eval.speed.decode import _prefill, measure_decode, measure_prefill, random_prompt
from prunekit.eval.speed.timing import PhaseTiming

log = logging.getLogger(__name__)


SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


# (row multiple, column multiple) of a weight that both semi-structured backends accept, per dtype.
SEMI_STRUCTURED_TILE = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}


MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class SemiStructuredResult:
    """Which linear layers were converted to 2:4 semi-structured tensors, why others were not, new timings."""

    converted: tuple[str, ...]
    skipped: dict[str, str]
    """Layer name -> the reason it stayed dense."""
    prefill: PhaseTiming | None
    decode: PhaseTiming | None
    max_abs_logit_diff: float | None
    """Largest difference of the prompt's next-token logits, converted vs dense storage (a sanity check)."""


def semi_structured_unsupported(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why 2:4 semi-structured kernels cannot run here (problem and fix), or ``None`` when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (
            f"semi-structured (2:4) sparse kernels need a CUDA GPU of compute capability >= 8.0, and the model "
            f"is on {device.type}: run on such a GPU (--device cuda) or drop --semi-structured"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (
            f"semi-structured (2:4) sparse kernels need compute capability >= 8.0 (Ampere or newer), this GPU "
            f"has {capability[0]}.{capability[1]}: use a newer GPU or drop --semi-structured"
        )
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return (
            f"semi-structured (2:4) sparse kernels take float16 or bfloat16 weights, the model is "
            f"{str(dtype).removeprefix('torch.')}: load it with --dtype float16 or --dtype bfloat16"
        )
    return None


def _is_two_of_four(weight: torch.Tensor) -> bool:
    out_features, in_features = weight.shape
    groups = (weight != 0).reshape(out_features, in_features // 4, 4)
    return bool(groups.sum(dim=-1).max() <= 2)


def semi_structured_plan(model: nn.Module) -> dict[str, str | None]:
    """For every linear map of the model: ``None`` if its weight can be converted to a 2:4 semi-structured
    tensor, else the reason it cannot (dtype, shape, not 2:4, Conv1D, tied). Checks only the weights, not
    the device (see :func:`semi_structured_unsupported`)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    plan: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            plan[name] = "GPT-2-style Conv1D stores its weight transposed: only nn.Linear weights are converted"
            continue
        else:
            continue
        rows, cols = weight.shape
        if weight.dtype not in SEMI_STRUCTURED_TILE:
            plan[name] = f"dtype {str(weight.dtype).removeprefix('torch.')}: only float16/bfloat16 are converted"
        elif owners.get(id(module.weight), 0) > 1:
            plan[name] = "its weight is shared with another module (tied embeddings)"
        elif rows % SEMI_STRUCTURED_TILE[weight.dtype][0] or cols % SEMI_STRUCTURED_TILE[weight.dtype][1]:
            row_tile, col_tile = SEMI_STRUCTURED_TILE[weight.dtype]
            plan[name] = f"shape ({rows}, {cols}) is not a multiple of ({row_tile}, {col_tile})"
        elif not _is_two_of_four(weight):
            plan[name] = "weight is not 2:4 sparse (a group of 4 inputs keeps more than 2): prune with --pattern 2:4"
        else:
            plan[name] = None
    return plan


def _convert_semi_structured(
    model: nn.Module, plan: dict[str, str | None]
) -> tuple[list[str], dict[str, str], dict[str, nn.Parameter]]:
    """Swap eligible weights for semi-structured tensors in place; returns converted, skipped, originals."""
    from torch.sparse import to_sparse_semi_structured

    converted: list[str] = []
    skipped = {name: reason for name, reason in plan.items() if reason is not None}
    originals: dict[str, nn.Parameter] = {}
    for name, reason in plan.items():
        if reason is not None:
            continue
        module = model.get_submodule(name)
        try:
            sparse = to_sparse_semi_structured(module.weight.detach().contiguous())
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            skipped[name] = f"to_sparse_semi_structured refused it: {exc}"
            continue
        originals[name] = module.weight
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return converted, skipped, originals


def _restore(model: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    for name, weight in originals.items():
        model.get_submodule(name).weight = weight


def measure_semi_structured(
    model: nn.Module, batch_size: int, prompt_tokens: int, new_tokens: int, phases: dict[str, int]
) -> SemiStructuredResult:
    plan = semi_structured_plan(model)
    probe = random_prompt(model, 1, prompt_tokens, phases["seed"])
    with torch.inference_mode():
        reference = _prefill(model, probe)[1].float()
    converted, skipped, originals = _convert_semi_structured(model, plan)
    log.info("semi-structured: %d linear layers converted, %d left dense", len(converted), len(skipped))
    if not converted:
        log.warning("no linear layer could be converted to 2:4 semi-structured: %s", skipped)
        return SemiStructuredResult((), skipped, None, None, None)
    try:
        with torch.inference_mode():
            diff = float((_prefill(model, probe)[1].float() - reference).abs().max())
        prefill = measure_prefill(model, batch_size, prompt_tokens, **phases)
        decode = measure_decode(model, batch_size, prompt_tokens, new_tokens, **phases)
    finally:
        _restore(model, originals)
    return SemiStructuredResult(tuple(converted), skipped, prefill, decode, diff)
