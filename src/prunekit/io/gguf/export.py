"""Write a causal LM, dense or structurally pruned, as a GGUF file that llama.cpp runs
(``prunekit export MODEL --gguf OUT.gguf``).

Tensors are named and oriented as llama.cpp's converter names them (``blk.N.attn_q.weight``...), with the
query and key rows reordered for its RoPE (:func:`~prunekit.io.gguf.layout.rope_rows`). Per-layer widths and
dropped attention go to the ``deci`` architecture (:mod:`prunekit.io.gguf.layout`). Every parameter of the
model is written or the export is refused: nothing is left out silently. The file is written through a
temporary sibling and renamed, one tensor in memory at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.core.errors import ConfigError, OutputError
from prunekit.io.atomic import write_file_atomically
from prunekit.io.gguf.layout import GgufLayout, gguf_layout, rope_rows
from prunekit.io.gguf.vocab import GgufVocab, vocab_from_gguf, vocab_from_tokenizer, write_vocab
from prunekit.models.blocks import find_decoder_blocks

log = logging.getLogger(__name__)

#: ``--outtype`` choices: 1-D tensors (norms, biases) stay float32 in every one, as llama.cpp's converter keeps them
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: below this share of zero weights a model is called dense
_SPARSE_SHARE = 0.05


@dataclass
class GgufExport:
    """What :func:`export_gguf` wrote."""

    path: str
    arch: str
    outtype: str
    #: per decoder layer: query heads (0: attention dropped), key/value heads, MLP channels
    layers: list[dict[str, int]]
    tensors: int
    bytes: int
    parameters: int
    tokenizer: str
    #: tensors written as f16 under ``q8_0`` because their rows are not whole blocks of 32
    kept_f16: list[str] = field(default_factory=list)
    #: decoder layers whose dropped attention's constant went into the previous layer's ffn_down bias
    folded: list[int] = field(default_factory=list)
    zero_share: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _linear(module: nn.Linear, name: str, used: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    used.add(id(module.weight))
    yield f"{name}.weight", module.weight.detach()
    if module.bias is not None:
        used.add(id(module.bias))
        yield f"{name}.bias", module.bias.detach()


def _norm(module: nn.Module, name: str, used: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    used.add(id(module.weight))
    yield name, module.weight.detach()


def _block_tensors(block: nn.Module, i: int, layout: GgufLayout, used: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    layer = layout.layers[i]
    attention, mlp = block.self_attn, block.mlp
    if layer.heads:
        yield from _norm(block.input_layernorm, f"blk.{i}.attn_norm.weight", used)
        for name, tensor in _linear(attention.q_proj, f"blk.{i}.attn_q", used):
            yield name, rope_rows(tensor, layer.heads)
        for name, tensor in _linear(attention.k_proj, f"blk.{i}.attn_k", used):
            yield name, rope_rows(tensor, layer.kv_heads)
        yield from _linear(attention.v_proj, f"blk.{i}.attn_v", used)
        yield from _linear(attention.o_proj, f"blk.{i}.attn_output", used)
    else:  # the norm (if any is left) feeds nothing once the attention is gone
        used.update(id(p) for p in block.input_layernorm.parameters())
    yield from _norm(block.post_attention_layernorm, f"blk.{i}.ffn_norm.weight", used)
    if layer.zero_channel:
        for part in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            used.update(id(p) for p in part.parameters())
        yield f"blk.{i}.ffn_gate.weight", torch.zeros(1, layout.hidden)
        yield f"blk.{i}.ffn_up.weight", torch.zeros(1, layout.hidden)
        yield f"blk.{i}.ffn_down.weight", torch.zeros(layout.hidden, 1)
    else:
        yield from _linear(mlp.gate_proj, f"blk.{i}.ffn_gate", used)
        yield from _linear(mlp.up_proj, f"blk.{i}.ffn_up", used)
        used.add(id(mlp.down_proj.weight))
        yield f"blk.{i}.ffn_down.weight", mlp.down_proj.weight.detach()
    bias = mlp.down_proj.bias.detach().float() if mlp.down_proj.bias is not None else None
    if bias is not None:
        used.add(id(mlp.down_proj.bias))
    if i + 1 in layout.folded:  # the next layer's dropped attention adds its constant here
        constant = layout.folded[i + 1].to(bias.device) if bias is not None else layout.folded[i + 1]
        bias = constant if bias is None else bias + constant
    if bias is not None:
        yield f"blk.{i}.ffn_down.bias", bias


def gguf_tensors(model: nn.Module, layout: GgufLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the GGUF file, named as llama.cpp names it, in transformers' (out, in) orientation;
    raises :class:`ConfigError` after the last one if any parameter of ``model`` was not written."""
    used: set[int] = set()
    embed = model.get_input_embeddings()
    used.add(id(embed.weight))
    yield "token_embd.weight", embed.weight.detach()
    _, blocks = find_decoder_blocks(model)
    for i, block in enumerate(blocks):
        yield from _block_tensors(block, i, layout, used)
    yield from _norm(model.model.norm, "output_norm.weight", used)
    if not layout.tied:
        yield from _linear(model.get_output_embeddings(), "output", used)
    left = [name for name, parameter in model.named_parameters() if id(parameter) not in used]
    if left:
        raise ConfigError(
            f"the GGUF layout has no place for {len(left)} parameter(s) of this model ({', '.join(left[:4])}"
            f"{', ...' if len(left) > 4 else ''}): llama.cpp would run a different model, so nothing is written"
        )


def _encode(name: str, tensor: torch.Tensor, outtype: str, kept_f16: list[str]) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    data = tensor.detach().to("cpu", torch.float32).numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, GGMLQuantizationType.F32
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    if outtype == "bf16":
        return quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if outtype == "q8_0":
        kept_f16.append(name)
    return data.astype(np.float16), GGMLQuantizationType.F16


def _write_metadata(writer: Any, layout: GgufLayout, name: str, outtype: str) -> None:
    from gguf import LlamaFileType

    def per_layer(values: list[int]) -> int | list[int]:
        return values[0] if layout.arch == "llama" else values

    writer.add_name(name)
    writer.add_block_count(len(layout.layers))
    writer.add_context_length(layout.context)
    writer.add_embedding_length(layout.hidden)
    writer.add_feed_forward_length(per_layer([layer.channels for layer in layout.layers]))
    writer.add_head_count(per_layer([layer.heads for layer in layout.layers]))
    writer.add_head_count_kv(per_layer([layer.kv_heads for layer in layout.layers]))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(layout.rope_theta)
    writer.add_layer_norm_rms_eps(layout.rms_eps)
    writer.add_vocab_size(layout.vocab)
    file_types = {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(2)


def _zero_share(model: nn.Module) -> float:
    _, blocks = find_decoder_blocks(model)
    total = zeros = 0
    for parameter in blocks.parameters():
        if parameter.dim() == 2:
            total += parameter.numel()
            zeros += int((parameter == 0).sum())
    return zeros / max(total, 1)


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike[str],
    *,
    outtype: str = "f16",
    tokenizer_pre: str | None = None,
    tokenizer_gguf: str | os.PathLike[str] | None = None,
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> GgufExport:
    """Write ``model`` (a Llama, Mistral or Qwen2 causal LM, dense or pruned by prunekit) and its tokenizer to
    the GGUF file ``path`` for llama.cpp.

    Args:
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the 2-D weights (``q8_0`` keeps as ``f16`` a tensor
            whose rows are not whole blocks of 32, and says which); norms and biases are always ``f32``.
        tokenizer_pre: llama.cpp's name of the tokenizer's pre-tokenizer, when it is not recognised.
        tokenizer_gguf: carry the tokenizer over from this GGUF file (the model's source) instead of deriving
            it from ``tokenizer``.
        name: ``general.name``; the model's ``name_or_path`` by default.
        overwrite: replace an existing file at ``path``.

    Every check (family, layout, tokenizer, output path) runs before anything is written; ``model`` is not
    modified. Raises :class:`~prunekit.core.errors.ConfigError` for what llama.cpp could not run.
    """
    from gguf import GGUFWriter

    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise OutputError(f"{str(out)!r} exists: choose another path or pass --overwrite")
    if out.is_dir():
        raise OutputError(f"{str(out)!r} is a directory: give a file path ending in .gguf")
    layout = gguf_layout(model)
    vocab: GgufVocab = (
        vocab_from_gguf(tokenizer_gguf, layout.vocab)
        if tokenizer_gguf is not None
        else vocab_from_tokenizer(tokenizer, layout.vocab, tokenizer_pre)
    )
    title = name or str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "model")
    kept_f16: list[str] = []
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        writer = GGUFWriter(tmp, layout.arch, use_temp_file=True)
        _write_metadata(writer, layout, title, outtype)
        write_vocab(writer, vocab)
        tensors = tqdm(gguf_tensors(model, layout), desc="gguf", unit="tensor", disable=not progress)
        for tensor_name, tensor in tensors:
            data, qtype = _encode(tensor_name, tensor, outtype, kept_f16)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    with torch.no_grad():
        write_file_atomically(out, write)
    zero_share = _zero_share(model)
    notes = []
    if kept_f16:
        notes.append(f"{len(kept_f16)} tensor(s) kept as f16 under q8_0: rows not whole blocks of 32")
    if zero_share > _SPARSE_SHARE:
        notes.append(
            f"{zero_share:.1%} of the layers' weights are zero: llama.cpp stores and multiplies them densely, "
            "so the zeros buy neither size nor speed there (structured pruning does)"
        )
    if layout.family == "mistral" and getattr(model.config, "sliding_window", None):
        notes.append("llama.cpp's llama graph attends over the whole context, not Mistral's sliding window")
    for note in notes:
        log.warning("gguf: %s", note)
    return GgufExport(
        path=str(out),
        arch=layout.arch,
        outtype=outtype,
        layers=[
            {"heads": layer.heads, "kv_heads": layer.kv_heads, "channels": layer.channels} for layer in layout.layers
        ],
        tensors=count,
        bytes=out.stat().st_size,
        parameters=sum(p.numel() for p in model.parameters()),
        tokenizer=f"{vocab.source} (pre-tokenizer {vocab.pre})",
        kept_f16=kept_f16,
        folded=sorted(layout.folded),
        zero_share=zero_share,
        notes=notes,
    )
