"""``prunekit adapt``: structural pruning in small increments with distillation between them (Adapt-Pruner)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from prunekit.cli.common import _add_verbosity_flags
from prunekit.incremental.job import run_incremental
from prunekit.incremental.prune import IncrementalConfig
from prunekit.training.lm_distill import LMDistillConfig


def add_parser(sub: Any) -> None:
    a = sub.add_parser(
        "adapt", help="prune an LM's width a few percent at a time, distilling from the dense model in between"
    )
    _add_verbosity_flags(a, argparse.SUPPRESS)
    a.add_argument("model", nargs="?", default=None, help="HF directory, .gguf, hub id; empty: bundled SmolLM2")
    a.add_argument("--ratio", type=float, default=0.25, help="fraction of the parameters to remove (default 0.25)")
    a.add_argument("--step", type=float, default=0.05, help="fraction removed per step (default 0.05)")
    a.add_argument("--amplitude", type=float, default=0.02, help="spread of layer sparsities by importance (0.02)")
    a.add_argument("--calib", required=True, help="calibration text file (importances and local prunings)")
    a.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    a.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    a.add_argument("--text", default=None, help="the text recovery distills on (e.g. wikitext2_valid.txt)")
    a.add_argument("--tokens-per-step", type=int, default=65_536, help="distillation tokens after each step")
    a.add_argument("--lr", type=float, default=5e-5, help="distillation learning rate (default 5e-5)")
    a.add_argument("--no-recover", action="store_true", help="no distillation: pruning in increments alone")
    a.add_argument("--ppl", default=None, help="text file to report perplexity before and after on")
    a.add_argument("--ppl-windows", type=int, default=40, help="perplexity windows (default 40)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True, help="new or empty output directory")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    a.add_argument("--device", default="auto", help="auto (default), cpu, cuda")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    config = IncrementalConfig(
        ratio=args.ratio,
        step=args.step,
        amplitude=args.amplitude,
        recover=not args.no_recover,
        distill=LMDistillConfig(tokens=args.tokens_per_step, lr=args.lr, seed=args.seed, device=args.device),
    )
    report = run_incremental(
        args.model,
        args.calib,
        args.out,
        config,
        text=args.text,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        ppl=args.ppl,
        ppl_windows=args.ppl_windows,
        overwrite=args.overwrite,
        dtype=args.dtype,
        device=args.device,
        progress=not args.quiet,
        command=shlex.join(["prunekit", *argv]),
    )
    print(
        f"parameters {report.dense_params:,} -> {report.params:,} ({report.params / report.dense_params:.3f}) in {len(report.steps)} steps"
    )
    if report.perplexity:
        print(f"perplexity {report.perplexity['before']:.3f} -> {report.perplexity['after']:.3f}")
    print(f"saved to {args.out} (report: {args.out}/prunekit-report)")
    return 0
