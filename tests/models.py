"""Tiny models and a tiny tokenizer, built offline from configs, for exact tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 256

_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **_COMMON, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256
    ),
    "mistral": lambda: transformers.MistralConfig(
        **_COMMON, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **_COMMON, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256
    ),
    "gemma": lambda: transformers.GemmaConfig(
        **_COMMON, intermediate_size=64, num_key_value_heads=1, head_dim=8, max_position_embeddings=256
    ),
    "phi": lambda: transformers.PhiConfig(**_COMMON, intermediate_size=64, max_position_embeddings=256),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=1
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
    ),
}
FAMILIES = sorted(CONFIGS)

_MOE = {**_COMMON, "num_key_value_heads": 2, "max_position_embeddings": 256, "num_experts_per_tok": 2}

#: Mixture-of-experts families (fused 3-D experts in current transformers), 4 experts of width 32, top-2.
MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_MOE, intermediate_size=32, num_local_experts=4),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_MOE, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4, head_dim=8
    ),
    "olmoe": lambda: transformers.OlmoeConfig(**_MOE, intermediate_size=32, num_experts=4),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**_MOE, "num_key_value_heads": 4},
        intermediate_size=64,
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    ),
    "gpt_oss": lambda: transformers.GptOssConfig(
        **_MOE, intermediate_size=32, num_local_experts=4, head_dim=8, sliding_window=16
    ),
    "granitemoe": lambda: transformers.GraniteMoeConfig(**_MOE, intermediate_size=32, num_local_experts=4),
}
MOE_FAMILIES = sorted(MOE_CONFIGS)


def tiny_model(family: str = "llama", seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised 2-block model of ``family`` (eval mode, float32)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config({**CONFIGS, **MOE_CONFIGS}[family]())
    return model.eval()


def sample_text(chars: int = 60_000) -> str:
    """Real English text for calibration: the start of tiny-shakespeare (or a fallback)."""
    file = SHARED / "tinyshakespeare.txt"
    if file.is_file():
        return file.read_text()[:chars]
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "and",
        "runs",
        "far",
        "away",
        "into",
        "the",
        "night",
    ]
    return " ".join(words[i % len(words)] for i in range(chars // 5))


def tiny_tokenizer(text: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``VOCAB`` entries trained on ``text`` in well under a second."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text or sample_text(20_000)], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tiny_checkpoint(directory: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny model and tokenizer as an ordinary HF directory; returns it."""
    model = tiny_model(family, seed)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
