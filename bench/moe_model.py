"""The benchmark's mixture-of-experts model: a Mixtral-style LM trained here, since no MoE checkpoint can be
downloaded (issue 20).

4 decoder layers, hidden 256, 8 experts of width 512 per layer, top-2 routing with Mixtral's load-balancing
loss, 4 attention heads, the SmolLM2 tokenizer (49,152 tokens, tied embeddings). Trained from seed 0 with
AdamW on random 256-token windows of ``wikitext2_valid.txt`` for a fixed number of steps, then saved with
``save_pretrained`` under ``bench/work/moe-mixtral`` (reused when present) with its dense perplexity on the
first windows of ``wikitext2_test.txt`` in ``training.json``.

    python bench/moe_model.py                 # train (about 20 minutes on 2 cores) or report the cached one
    python bench/moe_model.py --steps 20 --name moe-smoke                # a smoke run
    python bench/moe_model.py --layers 6 --expert-width 1024 --steps 1000 --name moe-mixtral-wide
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from prunekit.calibration.data import load_text_tokens
from prunekit.io.loading import load_model
from tiny_lm import record_training, train_causal_lm

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WORK = ROOT / "bench" / "work"
log = logging.getLogger("moe_model")


def build_config(vocab_size: int, bos: int | None, eos: int | None, layers: int = 4, expert_width: int = 512):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=expert_width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        bos_token_id=bos,
        eos_token_id=eos,
    )


def train(out: Path, steps: int, batch: int, seqlen: int, lr: float, layers: int, expert_width: int) -> dict:
    from transformers import MixtralForCausalLM

    tokenizer = load_model(None).tokenizer  # the bundled SmolLM2's tokenizer
    tokens = load_text_tokens(tokenizer, DATA / "wikitext2_valid.txt")
    torch.manual_seed(0)
    config = build_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, layers, expert_width)
    model = MixtralForCausalLM(config)
    losses, seconds = train_causal_lm(model, tokens, steps, batch, seqlen, lr)
    model.config.output_router_logits = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "layers": layers,
        "expert_width": expert_width,
        "steps": steps,
        "batch": batch,
        "seqlen": seqlen,
        "lr": lr,
        "train_seconds": seconds,
        "final_loss_mean_last_25": sum(losses[-25:]) / len(losses[-25:]),
        "train_tokens": tokens.numel(),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--expert-width", type=int, default=512)
    parser.add_argument("--name", default="moe-mixtral", help="folder under bench/work")
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = WORK / args.name
    record = out / "training.json"
    if record.is_file():
        print(record.read_text())
        return 0
    info = train(out, args.steps, args.batch, args.seqlen, args.lr, args.layers, args.expert_width)
    record_training(out, info, DATA / "wikitext2_test.txt", args.ppl_seqlen, args.ppl_windows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
