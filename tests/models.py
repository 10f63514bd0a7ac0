"""Tiny models and a tiny tokenizer, built offline from configs, for exact tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

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

#: Mixture-of-experts families (fused 3-D experts in current transformers), 4 experts of width 32, top-2
#: (DeepSeek-V3: 8 experts in 2 routing groups, one group per token, and a first dense layer).
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
        n_routed_experts=8,
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


def tiny_llama(layers: int = 4, seed: int = 0, **fields: object) -> transformers.LlamaForCausalLM:
    """The tiny Llama of :data:`CONFIGS` with ``layers`` decoder layers and any other config ``fields`` set
    (``num_key_value_heads=1``, ``attention_bias=True``...), eval mode."""
    config = CONFIGS["llama"]()
    config.num_hidden_layers = layers
    for name, value in fields.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


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


def tiny_tokenizer(text: str | None = None, vocab: int = VOCAB) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``vocab`` entries (at least the 256 bytes and 2 specials) trained on
    ``text`` in well under a second."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text or sample_text(20_000)], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tiny_checkpoint(directory: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny model and tokenizer as an ordinary HF directory; returns it."""
    model = tiny_model(family, seed)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


#: The hand-checkable MoE layer: hidden 8, experts of width 6, 3 experts, a 32-token vocabulary.
HIDDEN, WIDTH, EXPERTS, TOY_VOCAB = 8, 6, 3, 32


class MoeOnly(nn.Module):
    """Embedding -> one block holding only a Mixtral MoE layer (router + fused experts), nothing else, so the
    experts' inputs are the embeddings themselves."""

    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        config = transformers.MixtralConfig(
            hidden_size=HIDDEN,
            intermediate_size=WIDTH,
            num_local_experts=EXPERTS,
            num_experts_per_tok=top_k,
            num_attention_heads=2,
            num_hidden_layers=1,
            router_jitter_noise=0.0,
        )
        config._experts_implementation = "eager"
        self.config = config
        self.embed = nn.Embedding(TOY_VOCAB, HIDDEN)
        self.layers = nn.ModuleList([Block(config)])

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.layers[0](self.embed(input_ids))


class Block(nn.Module):
    def __init__(self, config: transformers.MixtralConfig) -> None:
        super().__init__()
        self.mlp = MixtralSparseMoeBlock(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden)


def moe_only(seed: int = 0, top_k: int = 2) -> MoeOnly:
    torch.manual_seed(seed)
    model = MoeOnly(top_k)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


def never_routed_to_last_expert(model: MoeOnly) -> None:
    """Embeddings with first coordinate 1 and a router that scores the last expert -10 and the others +10 on
    it: the last expert is never among the top 2."""
    with torch.no_grad():
        model.embed.weight[:, 0] = 1.0
        router = model.layers[0].mlp.gate.weight
        router.mul_(0.01)
        router[:, 0] = 10.0
        router[EXPERTS - 1, 0] = -10.0
