"""The one-shot solvers benchmark's second family (issue 22): a Qwen2-style LM trained here, since no Qwen2
checkpoint can be downloaded. Qwen2 differs from SmolLM2's Llama where it matters to pruning: biases on the
query, key and value maps, and other widths.

4 decoder layers, hidden 256, MLP width 1024, 4 query heads sharing 2 key/value heads, the SmolLM2 tokenizer
(49,152 tokens, tied embeddings). Trained from seed 0 on random 256-token windows of ``wikitext2_valid.txt``
(:func:`tiny_lm.train_causal_lm`), saved with ``save_pretrained`` under ``bench/work/qwen2-tiny`` (reused when
present) with its dense perplexity on the first 40 x 512 tokens of ``wikitext2_test.txt`` in ``training.json``.

    python bench/qwen2_model.py               # train (about 10 minutes on 2 cores) or report the cached one
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
log = logging.getLogger("qwen2_model")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--name", default="qwen2-tiny", help="folder under bench/work")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = WORK / args.name
    record = out / "training.json"
    if record.is_file():
        print(record.read_text())
        return 0
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_model(None).tokenizer  # the bundled SmolLM2's tokenizer
    tokens = load_text_tokens(tokenizer, DATA / "wikitext2_valid.txt")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    losses, seconds = train_causal_lm(model, tokens, args.steps, args.batch, args.seqlen, args.lr)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        **{k: v for k, v in vars(args).items() if k != "name"},
        "train_seconds": seconds,
        "final_loss_mean_last_25": sum(losses[-25:]) / len(losses[-25:]),
        "params": sum(p.numel() for p in model.parameters()),
    }
    record_training(out, info, DATA / "wikitext2_test.txt", 512, 40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
