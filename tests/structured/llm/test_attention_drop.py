"""Attention drop (He et al. 2024): exact results on tiny Llamas whose attention output is known."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import prunekit
from models import VOCAB, sample_text, tiny_llama, tiny_model, tiny_tokenizer
from prunekit.core.errors import StructuralPruningError
from prunekit.models.dropped_attention import DroppedAttention, dropped_attention_layers
from prunekit.structured.llm import prune_causal_lm_width
from prunekit.structured.llm.attention_drop import (
    attention_statistics,
    drop_attention,
    least_influential_attention,
    prune_causal_lm_attention,
)


def silence_attention(model: transformers.LlamaForCausalLM, layer: int, output: torch.Tensor | None = None) -> None:
    """Make layer ``layer``'s attention output ``output`` (zeros by default) for every token: o_proj's weight
    zeroed, its bias (where the model has one) set to ``output``."""
    o_proj = model.model.layers[layer].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight.zero_()
        if o_proj.bias is not None:
            o_proj.bias.copy_(output if output is not None else torch.zeros_like(o_proj.bias))


def hand_counted_macs(model: torch.nn.Module, tokens: int) -> int:
    """Multiply-accumulates of one pass over ``tokens`` tokens: each Linear's weight once per token, and the
    two attention products (scores, weighted values) over every pair of tokens, per kept query channel."""
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = sum(2 * tokens * tokens * m.q_proj.out_features for m in model.modules() if hasattr(m, "q_proj"))
    return tokens * linear + attention


def ids(rows: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_dropping_a_silent_attention_leaves_logits_unchanged_and_input_untouched() -> None:
    model = tiny_llama()
    silence_attention(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = drop_attention(model, [2])
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x).logits, model(x).logits, rtol=0, atol=1e-6)
    assert isinstance(dropped.model.layers[2].self_attn, DroppedAttention)
    assert isinstance(dropped.model.layers[2].input_layernorm, torch.nn.Identity)
    assert dropped_attention_layers(dropped) == [2]
    assert dropped_attention_layers(model) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is intact


def test_a_silent_attention_has_zero_influence_and_is_dropped_first() -> None:
    model = tiny_llama()
    silence_attention(model, 3)
    scores, means = attention_statistics(model, ids(3, 16))
    assert scores[3] == pytest.approx(0.0, abs=1e-6)
    assert min(scores[1:3]) > 1e-3
    torch.testing.assert_close(means[3], torch.zeros(32), rtol=0, atol=0)
    pruned, layers = prune_causal_lm_attention(model, ids(3, 16), 1)
    assert layers == [3]
    assert dropped_attention_layers(pruned) == [3]


def test_compensation_replaces_a_constant_attention_exactly() -> None:
    model = tiny_llama(attention_bias=True)
    constant = torch.linspace(-1.0, 1.0, 32)
    silence_attention(model, 1, constant)  # attention output = constant for every token
    _, means = attention_statistics(model, ids(2, 10))
    torch.testing.assert_close(means[1], constant, rtol=0, atol=1e-6)
    compensated = drop_attention(model, [1], biases=means)
    plain = drop_attention(model, [1])
    x = ids(2, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(compensated(x).logits, model(x).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(plain(x).logits, model(x).logits, atol=1e-3)


def test_least_influential_attention_never_picks_kept_layers() -> None:
    scores = [0.0, 0.5, 0.1, 0.3, 0.05]
    assert least_influential_attention(scores, 2) == [2, 4]
    assert least_influential_attention(scores, 2, keep=[0, 4]) == [2, 3]
    assert least_influential_attention(scores, 0) == []
    with pytest.raises(StructuralPruningError, match="cannot drop the attention of 5 layers"):
        least_influential_attention(scores, 5)


def test_refusals_name_the_problem() -> None:
    model = tiny_llama()
    with pytest.raises(StructuralPruningError, match="layer 0 keeps its attention"):
        drop_attention(model, [0])
    with pytest.raises(StructuralPruningError, match="out of range"):
        drop_attention(model, [4])
    for family in ("gpt2", "phi"):
        with pytest.raises(StructuralPruningError, match="prune_causal_lm_depth"):
            attention_statistics(tiny_model(family), ids())


def test_cached_greedy_decoding_matches_full_recomputation() -> None:
    """Layer 0 keeps its KV cache, so positions stay right when later layers have none."""
    model = drop_attention(tiny_llama(), [1, 3])
    prompt = ids(1, 6)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        sequence = prompt
        for _ in range(6):
            step = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    assert torch.equal(cached, sequence)


def test_save_pruned_then_load_model_rebuilds_the_dropped_attention(tmp_path) -> None:
    model = tiny_llama(attention_bias=True)
    _, means = attention_statistics(model, ids())
    dropped = drop_attention(model, [2], biases=means)
    prunekit.save_pruned(dropped, tmp_path / "out")
    tiny_tokenizer().save_pretrained(tmp_path / "out")
    loaded = prunekit.load_model(tmp_path / "out").model
    assert isinstance(loaded.model.layers[2].self_attn, DroppedAttention)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, dropped(x).logits, rtol=0, atol=0)
    # save_pretrained would write a checkpoint that loads with random attention in layer 2: refused
    for broken in (dropped, loaded, copy.deepcopy(dropped)):
        with pytest.raises(StructuralPruningError, match=r"prunekit\.save_pruned"):
            broken.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    model.save_pretrained(tmp_path / "dense")  # the input model keeps its own


def test_width_pruning_after_attention_drop_meets_the_whole_target() -> None:
    model = tiny_llama(layers=6)
    total = sum(p.numel() for p in model.parameters())
    calibration = ids(4, 16)
    result = prune_causal_lm_width(model, calibration, 0.3, target="params", drop_attention=2, reconstruct=False)
    kept = sum(p.numel() for p in result.model.parameters())
    assert kept <= 0.7 * total
    assert len(dropped_attention_layers(result.model)) == 2
    assert 0 not in dropped_attention_layers(result.model)
    assert result.model.config.intermediate_size == result.model.model.layers[1].mlp.up_proj.out_features
    copy.deepcopy(result.model)(calibration)  # runs
    with pytest.raises(StructuralPruningError, match="drop fewer"):
        prune_causal_lm_width(model, calibration, 0.01, target="params", drop_attention=3, reconstruct=False)
    with pytest.raises(StructuralPruningError, match="'params' or 'macs' target"):
        prune_causal_lm_width(model, calibration, 0.3, target="channels", drop_attention=1)


def test_structured_command_drops_attention_then_prunes_width(tmp_path) -> None:
    import json

    from prunekit.cli import main

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "calib.txt").write_text(sample_text())
    out = tmp_path / "out"
    argv = ["-q", "structured", str(model_dir), "--ratio", "0.3", "--drop-attention", "2"]
    argv += ["--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    summary = report["summary"]
    assert summary["params_after"] <= 0.7 * summary["params_before"]
    assert len(report["dropped_attention"]) == 2 and 0 not in report["dropped_attention"]
    reloaded = prunekit.load_model(out).model  # rebuilt from the saved config and structure
    assert sum(p.numel() for p in reloaded.parameters()) == summary["params_after"]
    # MACs of one 32-token window, before and after on the same window: every Linear once per token, and
    # q.k and attention.v over all 32 x 32 pairs in each layer that kept its attention
    assert summary["macs_tokens"] == 32
    assert summary["macs_before"] == hand_counted_macs(tiny_llama(), 32)
    assert summary["macs_after"] == hand_counted_macs(reloaded, 32)
    assert dropped_attention_layers(reloaded) == report["dropped_attention"]
    depth = [*argv[:3], "--mode", "depth", *argv[3:-1], str(tmp_path / "depth")]
    assert main(depth) == 2  # --drop-attention is for width: refused before anything is written
    assert not (tmp_path / "depth").exists()
