"""Exported GGUF files run in llama.cpp itself (llama-cpp-python) and give PyTorch's logits; the export and
bench-speed commands. Skipped, saying why, where llama-cpp-python is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from models import CONFIGS, tiny_tokenizer
from prunekit.cli import main
from prunekit.eval.gguf_check import compare_with_llamacpp
from prunekit.eval.speed.llamacpp import llama_cpp_available
from prunekit.io.gguf.export import export_gguf
from prunekit.structured.llm.supernet import prune_to_widths

pytestmark = pytest.mark.skipif(
    not llama_cpp_available(), reason="llama-cpp-python is not installed: pip install 'prunekit[llamacpp]'"
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(vocab=320)


def _model(family: str, tokenizer, layers: int = 3, **fields) -> transformers.PreTrainedModel:
    config = CONFIGS[family]()
    config.vocab_size, config.num_hidden_layers = len(tokenizer), layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * layers
    for name, value in fields.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llamacpp_logits_match_pytorch(tmp_path: Path, tokenizer, family: str) -> None:
    model = _model(family, tokenizer)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", outtype="f32", progress=False)
    check = compare_with_llamacpp(model, tmp_path / "m.gguf", tokens=32)
    assert check.relative < 1e-4 and check.argmax_agreement == 1.0


def test_llamacpp_runs_heterogeneous_widths_and_an_attention_free_layer(tmp_path: Path, tokenizer) -> None:
    model = _model("llama", tokenizer, layers=4, attention_bias=True)
    calib = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(1))
    pruned = prune_to_widths(model, calib, [(2, 64), (1, 40), (0, 48), (2, 24)], progress=False)
    result = export_gguf(pruned, tokenizer, tmp_path / "p.gguf", outtype="f32", progress=False)
    assert result.arch == "deci" and result.folded == [2]
    check = compare_with_llamacpp(pruned, tmp_path / "p.gguf", tokens=32)
    assert check.relative < 1e-4 and check.argmax_agreement == 1.0
    # the folded constant matters: without it llama.cpp would compute another function
    assert pruned.model.layers[2].self_attn.bias.abs().max() > 10 * check.max_abs_diff


def test_export_and_bench_speed_commands(tmp_path: Path, tokenizer, capsys) -> None:
    model = _model("llama", tokenizer)
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    gguf = tmp_path / "dense.gguf"
    assert (
        main(["export", str(tmp_path / "dense"), "--gguf", str(gguf), "--outtype", "f32", "--check", "--json", "-q"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["arch"] == "llama" and data["check"]["relative"] < 1e-4 and data["check"]["argmax_agreement"] == 1.0
    assert main(["export", str(tmp_path / "dense"), "--gguf", str(gguf), "-q"]) == 2  # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
    args = ["bench-speed", str(gguf), "--baseline", str(gguf), "--runtime", "llamacpp", "--repeats", "2"]
    assert main([*args, "--prompt-tokens", "8", "--new-tokens", "4", "--threads", "1", "--json"]) == 0
    speed = json.loads(capsys.readouterr().out)
    assert speed["model"]["threads"] == 1 and speed["model"]["decode"]["repeats"] == 2
    assert speed["model"]["prefill"]["tokens"] == 8 and speed["size_ratio"] == 1.0
    assert main(["bench-speed", str(tmp_path / "dense"), "--runtime", "llamacpp"]) == 2
    assert ".gguf files" in capsys.readouterr().err
