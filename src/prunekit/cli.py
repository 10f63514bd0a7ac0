"""Command line: ``prunekit prune``, ``prunekit eval``, ``prunekit bench-speed``, ``prunekit structured``.

Every flag maps onto one field of :class:`prunekit.config.Recipe`; a YAML recipe (``--recipe``) gives the
starting values and flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from prunekit.config import Recipe
from prunekit.core.errors import PrunekitError
from prunekit.io.compressed import SAVE_FORMATS
from prunekit.scoring import METHODS

log = logging.getLogger("prunekit")

# flag destination -> (recipe section, field)
_PRUNE_FLAGS = {
    "method": ("prune", "method"),
    "sparsity": ("prune", "sparsity"),
    "pattern": ("prune", "pattern"),
    "scope": ("prune", "scope"),
    "include": ("prune", "include"),
    "exclude": ("prune", "exclude"),
    "batch_size": ("prune", "batch_size"),
    "device": ("prune", "device"),
    "sample_tokens": ("prune", "sample_tokens"),
    "offload_activations": ("prune", "offload_activations"),
    "propagation": ("prune", "propagation"),
    "dampening": ("prune", "dampening"),
    "block_size": ("prune", "block_size"),
    "hessian_dtype": ("prune", "hessian_dtype"),
    "refit_steps": ("prune", "refit_steps"),
    "dtype": ("model", "dtype"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "lazy": ("model", "lazy"),
    "calib": ("calibration", "path"),
    "calib_dataset": ("calibration", "dataset"),
    "nsamples": ("calibration", "nsamples"),
    "seqlen": ("calibration", "seqlen"),
    "seed": ("calibration", "seed"),
    "ppl": ("eval", "ppl"),
    "ppl_seqlen": ("eval", "seqlen"),
    "ppl_windows": ("eval", "max_windows"),
    "out": ("output", "dir"),
    "overwrite": ("output", "overwrite"),
    "report": ("output", "report_dir"),
    "save_format": ("output", "save_format"),
}


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model directory, .gguf file or hub id; omit for the bundled SmolLM2-135M-Instruct",
    )
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--trust-remote-code", action="store_true", default=None, help="run model code from the hub")


def _add_verbosity_flags(parser: argparse.ArgumentParser, default: object = False) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars, warnings only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune PyTorch models and measure the result.")
    _add_verbosity_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="one-shot prune a causal LM and save it")
    _add_verbosity_flags(p, argparse.SUPPRESS)  # accepted after the subcommand too
    _add_model_flags(p)
    p.add_argument("--recipe", help="YAML recipe; flags override its values")
    p.add_argument("--method", choices=sorted(METHODS), default=None, help="default: wanda")
    p.add_argument("--sparsity", type=float, default=None, help="fraction removed, in [0, 1); default 0.5")
    p.add_argument("--pattern", default=None, help="'unstructured' (default) or N:M such as 2:4")
    p.add_argument("--scope", choices=["row", "layer"], default=None, help="unstructured comparison group")
    p.add_argument("--include", action="append", default=None, help="regex of layer names to prune (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="regex of layer names to skip (repeatable)")
    p.add_argument("--calib", default=None, help="calibration text file (e.g. a validation split)")
    p.add_argument("--calib-dataset", default=None, help="Hugging Face dataset name instead of --calib")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=None, help="seed of the calibration draw (default 0)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward batch (default 1; all batches are in flight together, so larger batches only add transient memory)",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--sample-tokens", type=int, default=None, help="tokens per layer for the error report")
    p.add_argument("--offload-activations", action="store_true", default=None, help="keep activations on CPU")
    p.add_argument(
        "--propagation",
        choices=["auto", "sequential", "block", "dense"],
        default=None,
        help="inputs behind the statistics: sequential (1 pass), block (2 passes), dense (1 pass); auto (default): "
        "dense for unstructured Wanda, sequential otherwise",
    )
    p.add_argument(
        "--lazy",
        action="store_true",
        default=None,
        help="models larger than memory: read, prune and write one block at a time (needs --out, no --ppl)",
    )
    p.add_argument("--dampening", type=float, default=None, help="sparsegpt: fraction of mean diag(H) (default 0.01)")
    p.add_argument("--block-size", type=int, default=None, help="sparsegpt: columns per lazy update (default 128)")
    p.add_argument("--hessian-dtype", choices=["float32", "float64"], default=None, help="sparsegpt (default float32)")
    p.add_argument(
        "--refit-steps",
        type=int,
        default=None,
        help="conjugate-gradient steps refitting the kept weights to the dense output after masking (default 4 for "
        "sparsegpt, 0 otherwise; 0 = the paper's SparseGPT; any method with > 0 needs --calib)",
    )
    p.add_argument("--ppl", default=None, help="text file to measure perplexity on, before and after")
    p.add_argument("--ppl-seqlen", type=int, default=None, help="perplexity window length (default 2048)")
    p.add_argument("--ppl-windows", type=int, default=None, help="use only the first N perplexity windows")
    p.add_argument("--out", default=None, help="output directory for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out")
    p.add_argument("--report", default=None, help="report directory (default: <out>/prunekit-report)")
    p.add_argument(
        "--save-format",
        choices=list(SAVE_FORMATS),
        default=None,
        help="dense (default), compressed (sparse layers stored compressed: compressed-tensors' sparse-24-bitmask "
        "when 2:4, else sparse-bitmask), or a format by name",
    )
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")

    e = sub.add_parser("eval", help="measure a model's perplexity on a text file")
    _add_verbosity_flags(e, argparse.SUPPRESS)
    _add_model_flags(e)
    e.add_argument("--ppl", required=True, help="text file (e.g. wikitext2_test.txt)")
    e.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    e.add_argument("--windows", type=int, default=None, help="use only the first N windows")
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    b = sub.add_parser("bench-speed", help="measure prefill and decode tokens/s (and non-zeros) of a model")
    _add_verbosity_flags(b, argparse.SUPPRESS)
    _add_model_flags(b)
    b.add_argument("--baseline", default=None, help="dense model to compare with (directory, .gguf, hub id, smollm2)")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length P (default 128)")
    b.add_argument("--new-tokens", type=int, default=32, help="greedy tokens G generated per sequence (default 32)")
    b.add_argument("--batch-size", type=int, default=1, help="sequences per batch B (default 1)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per phase; the median is reported (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids (default 0)")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    b.add_argument(
        "--semi-structured",
        action="store_true",
        help="CUDA (compute capability >= 8.0), float16/bfloat16: also run 2:4 weights on sparse kernels",
    )
    b.add_argument(
        "--compile",
        action="store_true",
        help="time decoding on a static KV cache under torch.compile (the first warm-up run compiles)",
    )
    b.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser("structured", help="remove channels, heads or layers (structural pruning) and save")
    _add_verbosity_flags(s, argparse.SUPPRESS)
    _add_model_flags(s)
    s.add_argument("--torchvision", default=None, help="prune this torchvision classifier instead (e.g. resnet50)")
    s.add_argument("--weights", default=None, help="torchvision weights name (downloaded by torchvision)")
    s.add_argument("--input-size", type=int, default=224, help="torchvision example image size (default 224)")
    s.add_argument("--ratio", type=float, default=0.25, help="fraction to remove (default 0.25)")
    s.add_argument(
        "--target", choices=["params", "macs", "channels", "latency"], default="params", help="what --ratio counts"
    )
    s.add_argument(
        "--policy",
        choices=["uniform", "global", "latency"],
        default="uniform",
        help="--torchvision: where to cut: the same ratio per layer, one global ranking, or latency-aware (HALP: "
        "least importance per second saved, from operation times measured on this machine)",
    )
    s.add_argument("--mode", choices=["width", "depth"], default="width", help="LMs: channels/heads or whole layers")
    s.add_argument("--criterion", default=None, help="importance: l1, l2, bn_scale, taylor, activation (LM default)")
    s.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this (e.g. 8)")
    s.add_argument("--blocks", type=int, default=0, help="--torchvision: first remove this many residual blocks whole")
    s.add_argument(
        "--keep-streams",
        action="store_true",
        help="--torchvision: keep the residual streams whole, prune only the width inside blocks (MobileNets)",
    )
    s.add_argument("--prune-hidden", action="store_true", help="LMs, width: also shrink the hidden size (costlier)")
    s.add_argument(
        "--drop-attention",
        type=int,
        default=0,
        metavar="K",
        help="LMs, width: first drop the attention of the K layers that change their input least (He et al. "
        "2024), then prune the width to the rest of --ratio; faster decoding per parameter removed",
    )
    s.add_argument(
        "--no-reconstruct", action="store_true", help="LMs, width: slice only, no least-squares refit of the consumers"
    )
    s.add_argument("--calib", default=None, help="LMs: calibration text file")
    s.add_argument("--nsamples", type=int, default=32, help="LMs: calibration windows (default 32)")
    s.add_argument("--seqlen", type=int, default=512, help="LMs: calibration window length (default 512)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ppl", default=None, help="LMs: text file to report perplexity before and after on")
    s.add_argument("--ppl-windows", type=int, default=40, help="LMs: perplexity windows (default 40)")
    s.add_argument("--ppl-seqlen", type=int, default=2048, help="LMs: perplexity window length (default 2048)")
    s.add_argument("--onnx", action="store_true", help="torchvision: also export model.onnx (checked with onnxruntime)")
    s.add_argument("--out", required=True, help="new or empty output directory")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.add_argument("--device", default="auto", help="LMs: auto (default), cpu, cuda")
    return parser


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Start from ``--recipe`` (or defaults) and apply every flag that was given."""
    data: dict[str, Any] = Recipe.from_yaml(args.recipe).model_dump() if args.recipe else {}
    if args.model is not None:
        data.setdefault("model", {})["source"] = args.model
    for flag, (section, key) in _PRUNE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data.setdefault(section, {})[key] = value
    return Recipe.from_dict(data)


def _cmd_prune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    recipe = recipe_from_args(args)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    from prunekit.api import run_recipe

    command = shlex.join(["prunekit", *argv])
    run = run_recipe(recipe, command=command, progress=not args.quiet)
    s = run.report["summary"]
    print(f"pruned {s['layers']} layers: sparsity {s['overall_sparsity']:.2%} in {s['prune_seconds']:.1f} s")
    if run.ppl_before:
        print(
            f"perplexity before: {run.ppl_before.perplexity:.3f} ({run.ppl_before.windows} x {run.ppl_before.seqlen})"
        )
    if run.ppl_after:
        print(f"perplexity after:  {run.ppl_after.perplexity:.3f} ({run.ppl_after.windows} x {run.ppl_after.seqlen})")
    if run.output_dir:
        out = run.report["output"]
        print(f"checkpoint: {run.output_dir} ({out['written_format']}, {out['size_bytes'] / 2**20:.1f} MiB of weights)")
    if run.report_dir:
        print(f"report: {run.report_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from prunekit.eval.perplexity import perplexity
    from prunekit.io.loading import load_model

    loaded = load_model(
        args.model, dtype=args.dtype or "auto", device=args.device, trust_remote_code=bool(args.trust_remote_code)
    )
    result = perplexity(loaded.model, loaded.tokenizer, args.ppl, args.seqlen, args.windows, progress=not args.quiet)
    if args.json:
        print(json.dumps(result.__dict__))
    else:
        print(f"perplexity {result.perplexity:.3f} on {result.windows} windows x {result.seqlen} tokens of {args.ppl}")
    return 0


def _count(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _print_speed(rows: list[tuple[str, Any, Any, Any]], ratio: tuple[str, str, str] | None) -> None:
    """Rows of (label, prefill timing, decode timing, size stats or None)."""
    print(f"{'':<26}{'prefill tok/s (range)':>24}{'decode tok/s (range)':>24}{'non-zero params':>26}")
    for label, prefill, decode, size in rows:
        cells = [f"{t.tokens_per_s:,.1f} ({t.spread:.0%})" for t in (prefill, decode)]
        nz = f"{_count(size.nonzero_parameters)} of {_count(size.parameters)}" if size else ""
        print(f"{label:<26}{cells[0]:>24}{cells[1]:>24}{nz:>26}")
    if ratio:
        print(f"{'ratio model / baseline':<26}{ratio[0]:>24}{ratio[1]:>24}{ratio[2]:>26}")


def _cmd_bench_speed(args: argparse.Namespace) -> int:
    from collections import Counter

    import torch

    from prunekit.core.devices import resolve_device, resolve_dtype
    from prunekit.core.errors import ConfigError
    from prunekit.eval.speed import check_speed_args, compare_results, measure_speed, semi_structured_unsupported
    from prunekit.io.loading import load_model

    settings = {
        "batch_size": args.batch_size,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    check_speed_args(None, **{k: v for k, v in settings.items() if k != "seed"})
    if args.compile and args.warmup < 1:
        raise ConfigError("--compile needs --warmup >= 1: the first run compiles the model")
    if args.new_tokens < 1:
        raise ConfigError(f"--new-tokens must be >= 1 to measure decoding, got {args.new_tokens}")
    device = resolve_device(args.device)
    dtype = args.dtype or "auto"
    if args.semi_structured:  # fail before loading; the model's own dtype is checked again once loaded
        reason = semi_structured_unsupported(device, resolve_dtype(dtype) if dtype != "auto" else torch.float16)
        if reason:
            raise ConfigError(reason)

    def measure(source: str | None, semi: bool) -> tuple[str, Any]:
        loaded = load_model(source, dtype=dtype, device=device, trust_remote_code=bool(args.trust_remote_code))
        result = measure_speed(loaded.model, **settings, semi_structured=semi, compiled_decode=args.compile)
        return loaded.source, result

    baseline = measure(args.baseline, False) if args.baseline is not None else None
    source, result = measure(args.model, args.semi_structured)
    comparison = compare_results(baseline[1], result) if baseline else None
    if args.json:
        data = comparison.to_dict() if comparison else result.to_dict()
        print(json.dumps({"model": source, "baseline": baseline[0] if baseline else None, **data}, indent=2))
        return 0

    print(
        f"{result.device} ({result.threads} threads), {result.dtype}: batch {result.batch_size}, prompt "
        f"{result.prompt_tokens} tokens, {result.new_tokens} new tokens; median of {args.repeats} runs after "
        f"{args.warmup} warm-up" + ("; decode compiled on a static KV cache" if args.compile else "")
    )
    rows = [("model", result.prefill, result.decode, result.size)]
    if baseline:
        rows.insert(0, ("baseline", baseline[1].prefill, baseline[1].decode, baseline[1].size))
    semi = result.semi_structured
    if semi and semi.prefill and semi.decode:
        rows.append(("model, 2:4 sparse kernels", semi.prefill, semi.decode, None))
    ratio = None
    if comparison:
        c = comparison
        ratio = (f"{c.prefill_speedup:.2f}x", f"{c.decode_speedup:.2f}x", f"{c.nonzero_ratio:.2f}x")
    _print_speed(rows, ratio)
    if comparison and comparison.semi_structured_prefill_speedup is not None:
        print(
            f"ratio with 2:4 sparse kernels: prefill {comparison.semi_structured_prefill_speedup:.2f}x, "
            f"decode {comparison.semi_structured_decode_speedup:.2f}x"
        )
    if semi:
        print(f"converted to 2:4 semi-structured: {len(semi.converted)} linear layers")
        for reason, n in Counter(semi.skipped.values()).most_common():
            print(f"  left dense: {n} layer(s): {reason}")
    print(f"model: {source}" + (f"; baseline: {baseline[0]}" if baseline else ""))
    print(f"note: {result.note}")
    return 0


def _cmd_structured(args: argparse.Namespace) -> int:
    from prunekit.structured.job import StructuredJob, run_structured_job

    job = StructuredJob(
        out=args.out,
        ratio=args.ratio,
        target=args.target,
        mode=args.mode,
        criterion=args.criterion,
        model=args.model,
        torchvision=args.torchvision,
        weights=args.weights,
        input_size=args.input_size,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        ppl=args.ppl,
        ppl_windows=args.ppl_windows,
        ppl_seqlen=args.ppl_seqlen,
        round_to=args.round_to,
        blocks=args.blocks,
        keep_streams=args.keep_streams,
        policy=args.policy,
        prune_hidden=args.prune_hidden,
        drop_attention=args.drop_attention,
        reconstruct=not args.no_reconstruct,
        onnx=args.onnx,
        overwrite=args.overwrite,
        dtype=args.dtype or "auto",
        device=args.device,
    )
    report = run_structured_job(job)
    s = report["summary"]
    print(f"parameters {s['params_before']:,} -> {s['params_after']:,} ({s['params_after'] / s['params_before']:.3f})")
    if s.get("macs_before"):
        print(f"MACs {s['macs_before']:,} -> {s['macs_after']:,} ({s['macs_after'] / s['macs_before']:.3f})")
    print(f"latency x{s['speedup']:.2f} faster; bytes on disk {s['bytes_after'] / s['bytes_before']:.3f} of before")
    if "perplexity" in report:
        print(f"perplexity {report['perplexity']['before']:.3f} -> {report['perplexity']['after']:.3f}")
    if report.get("removed_layers"):
        print(f"removed layers: {report['removed_layers']}")
    print(f"saved to {args.out} (report: {args.out}/prunekit-report)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunekit`` command; returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "prune":
            return _cmd_prune(args, argv)
        commands = {"eval": _cmd_eval, "bench-speed": _cmd_bench_speed, "structured": _cmd_structured}
        return commands[args.command](args)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
