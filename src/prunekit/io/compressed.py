"""Sparse checkpoints that are really smaller: compressed-tensors' ``sparse-bitmask`` and ``sparse-24-bitmask``.

A pruned layer saved densely costs as much disk as before pruning. These two formats store only the kept
values plus where they are, and record themselves in ``config.json`` the way compressed-tensors (the format
of llm-compressor and vLLM) does: a ``quantization_config`` with ``quant_method: compressed-tensors`` whose
``sparsity_config`` names the format, the targeted layers (``targets`` / ``ignore``) and the sparsity.

Per compressed weight ``P.weight`` of shape ``(rows, cols)`` the safetensors file holds instead:

* ``sparse-bitmask`` (any sparsity): ``P.compressed`` the kept values in row-major order (1-D, the
  weight's dtype), ``P.bitmask`` one bit per weight (``uint8``, ``rows x ceil(cols/8)``, bits little-endian
  within a byte), ``P.row_offsets`` where each row starts in ``P.compressed`` (``int64``) and ``P.shape``
  (``int64``, ``[rows, cols]``). About ``(1 - sparsity) * dtype bytes + 1/8`` byte per weight.
* ``sparse-24-bitmask`` (2:4 weights): exactly two values of every four along a row, ``P.compressed``
  ``rows x cols/2``; ``P.bitmask`` as above; ``P.shape`` ``[[rows], [cols]]``. Half the values, plus 1 bit.

The layouts are those of compressed-tensors' ``BitmaskCompressor`` / ``Sparse24BitMaskCompressor``, the
last release with them being 0.14 (the version written into the config); later releases (0.15 on) and
transformers' compressed-tensors loader no longer (de)compress sparse formats: plain
``AutoModelForCausalLM.from_pretrained`` reports these weights as missing and leaves them randomly
initialised. So prunekit writes and reads the formats itself (:func:`save_compressed`,
:func:`load_decompressed_state_dict`; :func:`prunekit.io.loading.load_model` decompresses) and needs
no compressed-tensors at run time.

The round trip is exact except for the sign of zero: zeros are not stored, and come back as ``+0.0``. A
pruned weight removed by multiplying with its mask is ``-0.0`` where the weight was negative; it reloads as
``+0.0`` (equal value, ``torch.equal`` holds; every other bit is identical).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from prunekit.core.errors import ConfigError, ModelLoadError
from prunekit.core.patterns import NM, Pattern
from prunekit.io.sparse_encoding import (
    bitmask_bytes,
    bitmask_compress,
    bitmask_decompress,
    count_nonzero,
    first_24_violation,
    sparse24_compress,
    sparse24_decompress,
)
from prunekit.models.targets import is_linear_map

log = logging.getLogger(__name__)

SaveFormat = Literal["dense", "compressed", "sparse-bitmask", "sparse-24", "sparse-24-bitmask"]
SAVE_FORMATS: tuple[str, ...] = ("dense", "compressed", "sparse-bitmask", "sparse-24", "sparse-24-bitmask")

DENSE = "dense"
BITMASK = "sparse-bitmask"  # compressed_tensors.config.CompressionFormat.sparse_bitmask
SPARSE_24 = "sparse-24-bitmask"  # compressed_tensors.config.CompressionFormat.sparse_24_bitmask
_ALIASES = {"sparse-24": SPARSE_24}

QUANTIZATION_CONFIG = "quantization_config"
SPARSITY_CONFIG = "sparsity_config"
QUANT_METHOD = "compressed-tensors"
FORMAT_VERSION = "0.14.0"  # the last compressed-tensors release whose compressors read and write these layouts
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_PARAMS = {BITMASK: ("compressed", "bitmask", "row_offsets", "shape"), SPARSE_24: ("compressed", "bitmask", "shape")}


# --- the model --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressionPlan:
    """Which on-disk format a model gets and which of its weights are compressed."""

    format: str  # DENSE, BITMASK or SPARSE_24
    modules: tuple[str, ...]  # names of the modules whose ``weight`` is compressed
    targets: tuple[str, ...]  # compressed-tensors ``targets``: module class names or module names
    ignore: tuple[str, ...]  # modules of a targeted class that stay dense
    global_sparsity: float  # zeros / weights over every parameter and buffer of the model (0 when dense)


def resolve_save_format(save_format: str) -> str:
    """``sparse-24`` -> ``sparse-24-bitmask``; other names as given (validated)."""
    if save_format not in SAVE_FORMATS:
        raise ConfigError(f"unknown save format {save_format!r}: choose one of {', '.join(SAVE_FORMATS)}")
    return _ALIASES.get(save_format, save_format)


def pattern_fits_24(pattern: Pattern) -> bool:
    """Whether every weight pruned with ``pattern`` has at most 2 non-zeros in each aligned group of 4."""
    if not isinstance(pattern, NM):
        return False
    if pattern.m % 4 == 0:
        return pattern.n <= 2
    return 4 % pattern.m == 0 and pattern.n * (4 // pattern.m) <= 2


def check_save_format(save_format: str, pattern: Pattern) -> None:
    """Before any work: refuse a 2:4 format for a pattern that cannot produce 2:4 weights."""
    if resolve_save_format(save_format) == SPARSE_24 and not pattern_fits_24(pattern):
        raise ConfigError(
            f"save format {save_format!r} stores 2:4 sparse weights, but pattern {pattern} does not produce "
            "them: prune with --pattern 2:4, or save with --save-format compressed (picks sparse-bitmask)"
        )


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear maps whose ``weight`` is a 2-D floating tensor of its own (tied weights stay dense)."""
    owners: dict[int, int] = defaultdict(int)
    for tensor in model.state_dict().values():
        owners[tensor.data_ptr()] += 1
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not (is_linear_map(module) and isinstance(weight, torch.Tensor)):
            continue
        if weight.dim() == 2 and weight.is_floating_point() and owners[weight.data_ptr()] == 1:
            found[name] = module
    return found


def plan_compression(model: nn.Module, save_format: str) -> CompressionPlan:
    """Choose the format and the weights to compress.

    A linear map is compressed when that makes it smaller (its zeros pay for the bitmask: more than 1/32 of
    a float32 weight, 1/16 of a 16-bit one); the rest of the model (embeddings, norms, dense heads) stays
    as is. ``compressed`` picks ``sparse-24-bitmask`` when every such weight is 2:4, else ``sparse-bitmask``.
    An explicit ``sparse-24`` on weights that are not 2:4 is a :class:`ConfigError`. With nothing sparse
    the plan is ``dense`` (with a warning).
    """
    wanted = resolve_save_format(save_format)
    if wanted == DENSE:
        return CompressionPlan(DENSE, (), (), (), 0.0)
    tensors = _unique(model.state_dict().values())
    zeros = sum(t.numel() - count_nonzero(t) for t in tensors if t.is_floating_point())
    global_sparsity = zeros / max(1, sum(t.numel() for t in tensors))
    candidates = _candidates(model)
    stacked = [
        n
        for n, t in model.state_dict().items()
        if t.dim() > 2 and t.is_floating_point() and count_nonzero(t) < t.numel()
    ]
    if stacked:
        log.warning(
            "%d stacked (3-D, fused expert) tensors with zeros are stored dense: compressed-tensors' sparse formats "
            "cover 2-D linear weights only (%s%s)",
            len(stacked),
            ", ".join(stacked[:2]),
            ", ..." if len(stacked) > 2 else "",
        )
    sparse = [n for n, m in candidates.items() if bitmask_bytes(m.weight) < m.weight.numel() * m.weight.element_size()]
    if not sparse:
        if wanted == SPARSE_24:
            raise ConfigError(
                f"save format {save_format!r} needs 2:4 sparse layers, but no linear layer has enough zeros: "
                "prune with --pattern 2:4 first, or save with --save-format dense"
            )
        log.warning("no sparse linear layer to compress: saving a dense checkpoint (prune first to save space)")
        return CompressionPlan(DENSE, (), (), (), global_sparsity)
    not_24 = {}
    for name in sparse:
        where = first_24_violation(candidates[name].weight)
        if where is not None:
            not_24[name] = where
    if wanted == SPARSE_24 and not_24:
        name, (row, col) = next(iter(not_24.items()))
        stored = (
            " (a Conv1D stores its weight transposed, in x out)" if not isinstance(candidates[name], nn.Linear) else ""
        )
        raise ConfigError(
            f"save format {save_format!r} needs 2:4 sparse weights, but {name!r}{stored} is not 2:4 (more than 2 "
            f"non-zeros in the group of 4 at row {row}, column {col}; {len(not_24)} of {len(sparse)} sparse layers "
            "are not 2:4): prune with --pattern 2:4, or save with --save-format compressed or sparse-bitmask"
        )
    fmt = wanted if wanted != "compressed" else (SPARSE_24 if not not_24 else BITMASK)
    targets, ignore = _targets_and_ignore(model, set(sparse))
    return CompressionPlan(fmt, tuple(sparse), targets, ignore, global_sparsity)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(t)
    return out


def _targets_and_ignore(model: nn.Module, compressed: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Per linear-map class, as llm-compressor writes them: the class name plus its dense members (a tied
    head included) as ``ignore`` when most members are compressed, else the compressed module names."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        if is_linear_map(module):
            by_class[type(module).__name__].append(name)
    targets: list[str] = []
    ignore: list[str] = []
    for cls, names in sorted(by_class.items()):
        hit = [n for n in names if n in compressed]
        miss = [n for n in names if n not in compressed]
        if not hit:
            continue
        if len(hit) >= len(miss):
            targets.append(cls)
            ignore.extend(miss)
        else:
            targets.extend(hit)
    return tuple(targets), tuple(ignore)


def compressed_state_dict(model: nn.Module, plan: CompressionPlan) -> dict[str, torch.Tensor]:
    """The model's state dict with each planned ``P.weight`` replaced by its compressed parts (new tensors;
    the model is not modified)."""
    compress = sparse24_compress if plan.format == SPARSE_24 else bitmask_compress
    chosen = {f"{name}.weight": name for name in plan.modules}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key in chosen:
            out.update({f"{chosen[key]}.{part}": value for part, value in compress(tensor).items()})
        else:
            out[key] = tensor
    return out


def sparsity_config(plan: CompressionPlan) -> dict[str, object]:
    """The ``quantization_config`` entry of ``config.json`` for a compressed plan (compressed-tensors schema)."""
    return {
        "version": FORMAT_VERSION,
        "quant_method": QUANT_METHOD,
        SPARSITY_CONFIG: {
            "format": plan.format,
            "targets": list(plan.targets),
            "ignore": list(plan.ignore),
            "global_sparsity": plan.global_sparsity,
            "sparsity_structure": "2:4" if plan.format == SPARSE_24 else "unstructured",
        },
        "transform_config": {},
    }


def save_compressed(model: nn.Module, directory: Path, plan: CompressionPlan) -> None:
    """``model.save_pretrained`` into ``directory`` (an empty temporary dir: see
    :func:`prunekit.io.saving.save_pretrained`) with the planned weights compressed, and the format recorded
    in ``config.json``."""
    state = compressed_state_dict(model, plan)
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config[QUANTIZATION_CONFIG] = sparsity_config(plan)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("saved %d of %d linear layers as %s", len(plan.modules), len(_candidates(model)), plan.format)


# --- reading back -----------------------------------------------------------------------------------------


def checkpoint_format(directory: str | Path) -> str:
    """The on-disk format of a saved checkpoint: ``sparse-bitmask``, ``sparse-24-bitmask`` or ``dense``.

    Any other compressed-tensors format (quantized) counts as ``dense`` here: transformers loads those.
    """
    config_file = Path(directory) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return DENSE
    entry = config.get(QUANTIZATION_CONFIG) if isinstance(config, dict) else None
    if not isinstance(entry, dict) or entry.get("quant_method") != QUANT_METHOD:
        return DENSE
    sparsity = entry.get(SPARSITY_CONFIG) or {}
    fmt = sparsity.get("format") if isinstance(sparsity, dict) else None
    return fmt if fmt in _PARAMS else DENSE


def checkpoint_size_bytes(directory: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ...) at the top of a checkpoint directory."""
    return sum(
        p.stat().st_size for p in Path(directory).iterdir() if p.is_file() and p.name.endswith(WEIGHT_FILE_SUFFIXES)
    )


def decompress_state_dict(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Rebuild ``P.weight`` from every group of compressed parts ``P.compressed``, ``P.bitmask``, ... in a
    state dict (in ``fmt``); other entries pass through."""
    params = _PARAMS[fmt]
    decompress = sparse24_decompress if fmt == SPARSE_24 else bitmask_decompress
    prefixes = [key[: -len(".compressed")] for key in state if key.endswith(".compressed")]
    out = dict(state)
    for prefix in prefixes:
        missing = [p for p in params if f"{prefix}.{p}" not in state]
        if missing:
            raise ModelLoadError(
                f"compressed weight {prefix!r} ({fmt}) lacks {', '.join(missing)}: the checkpoint is incomplete; "
                "re-save it"
            )
        parts = {p: out.pop(f"{prefix}.{p}") for p in params}
        out[f"{prefix}.weight"] = decompress(parts)
    return out


def load_decompressed_state_dict(directory: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read every safetensors file of a compressed checkpoint and return the dense state dict and format."""
    from safetensors.torch import load_file

    fmt = checkpoint_format(directory)
    if fmt == DENSE:
        raise ModelLoadError(f"{str(directory)!r} is not a sparse compressed-tensors checkpoint")
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{str(directory)!r} declares {fmt} but holds no .safetensors file: re-save it")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return decompress_state_dict(state, fmt), fmt
