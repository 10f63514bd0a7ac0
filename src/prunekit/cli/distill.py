"""``prunekit distill``: recover a pruned causal LM by logit distillation from its dense original."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from prunekit.cli.common import _add_verbosity_flags
from prunekit.training.lm_distill import LMDistillConfig
from prunekit.training.lm_distill_job import checkpoint_folder, run_distill

_CONFIG_FLAGS = ("tokens", "seqlen", "batch_size", "lr", "temperature", "alpha", "checkpoint_every", "seed", "device")


def add_parser(sub: Any) -> None:
    d = sub.add_parser("distill", help="recover a pruned LM by distillation from its dense original")
    _add_verbosity_flags(d, argparse.SUPPRESS)
    d.add_argument("model", help="the pruned student (a directory prunekit wrote, or any model prunekit loads)")
    d.add_argument("--teacher", required=True, help="the dense original (directory, hub id, or smollm2)")
    d.add_argument("--text", required=True, help="training text file (e.g. wikitext2_valid.txt)")
    d.add_argument("--out", required=True, help="output directory for the distilled model")
    d.add_argument("--tokens", type=int, default=None, help="training tokens (default 2,000,000)")
    d.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512)")
    d.add_argument("--batch-size", type=int, default=None, help="windows per step (default 4)")
    d.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 5e-5)")
    d.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 1)")
    d.add_argument("--alpha", type=float, default=None, help="weight of the KL term; the rest is next-token loss")
    d.add_argument("--checkpoint-every", type=int, default=None, help="steps between resumable checkpoints (100)")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    d.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    d.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out (<out>.checkpoint)")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    config = LMDistillConfig(**{k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None})
    report = run_distill(
        args.model,
        args.teacher,
        args.text,
        args.out,
        config,
        overwrite=args.overwrite,
        resume=args.resume,
        dtype=args.dtype,
        progress=not args.quiet,
        command=shlex.join(["prunekit", *argv]),
    )
    r = report.result
    print(f"distilled {r.steps} steps ({r.tokens:,} tokens): held-out KL {r.kl_before:.4f} -> {r.kl_after:.4f}")
    print(f"model: {args.out} (progress was checkpointed in {checkpoint_folder(args.out)})")
    return 0
