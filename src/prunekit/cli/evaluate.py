"""``prunekit eval`` (perplexity, cloze accuracy, lm-eval task accuracy) and ``prunekit bench-speed`` (prefill and decode speed, non-zeros)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prunekit.calibration.data import read_text
from prunekit.cli.common import _add_model_flags, _add_verbosity_flags
from prunekit.core.devices import resolve_device, resolve_dtype
from prunekit.core.errors import ConfigError
from prunekit.eval.cloze import build_cloze, cloze_accuracy
from prunekit.eval.perplexity import perplexity
from prunekit.eval.speed import check_speed_args, compare_results, measure_speed, semi_structured_unsupported
from prunekit.eval.tasks import evaluate_tasks
from prunekit.io.loading import load_model


def add_parsers(sub: Any) -> None:
    e = sub.add_parser("eval", help="measure a model's perplexity on a text file (and next-sentence cloze accuracy)")
    _add_verbosity_flags(e, argparse.SUPPRESS)
    _add_model_flags(e)
    e.add_argument("--ppl", default=None, help="text file (e.g. wikitext2_test.txt)")
    e.add_argument(
        "--cloze",
        default=None,
        help="text file to build the 4-way next-sentence cloze task from (e.g. wikitext2_test.txt); scored by "
        "log-likelihood like lm-eval's multiple-choice tasks",
    )
    e.add_argument("--cloze-items", type=int, default=200, help="cloze questions (default 200, seed 0)")
    e.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-evaluation-harness tasks (e.g. arc_easy,hellaswag; needs prunekit[eval] and their "
        "datasets from the hub, or tasks defined in --tasks-path)",
    )
    e.add_argument("--tasks-path", default=None, help="a folder of lm-eval task YAML files (local datasets)")
    e.add_argument("--tasks-limit", type=int, default=None, help="score only the first N documents of each task")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (task default)")
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
    b.add_argument(
        "--runtime",
        choices=["pytorch", "llamacpp"],
        default="pytorch",
        help="pytorch (default: eager, or --compile) or llamacpp (MODEL and --baseline are .gguf files; needs "
        "prunekit[llamacpp]): batch 1, models timed in interleaved rounds",
    )
    b.add_argument("--threads", type=int, default=None, help="llama.cpp CPU threads (default: all cores)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")


def run_eval(args: argparse.Namespace) -> int:
    if args.ppl is None and args.cloze is None and args.tasks is None:
        raise ConfigError(
            "prunekit eval needs --ppl FILE (perplexity), --cloze FILE (cloze accuracy), --tasks NAMES (lm-eval "
            "accuracy) or several of them"
        )
    items = build_cloze(read_text(args.cloze, what="cloze"), args.cloze_items) if args.cloze else None
    loaded = load_model(
        args.model, dtype=args.dtype or "auto", device=args.device, trust_remote_code=bool(args.trust_remote_code)
    )
    out: dict[str, Any] = {}
    if args.ppl is not None:
        result = perplexity(
            loaded.model, loaded.tokenizer, args.ppl, args.seqlen, args.windows, progress=not args.quiet
        )
        out.update(result.__dict__)
        if not args.json:
            print(
                f"perplexity {result.perplexity:.3f} on {result.windows} windows x {result.seqlen} tokens of {args.ppl}"
            )
    if items is not None:
        cloze = cloze_accuracy(loaded.model, loaded.tokenizer, items, progress=not args.quiet)
        out["cloze"] = cloze.__dict__
        if not args.json:
            print(
                f"cloze accuracy {cloze.accuracy:.3f} (per character {cloze.accuracy_norm:.3f}; chance {cloze.chance:.2f}) "
                f"on {cloze.items} next-sentence questions from {args.cloze}"
            )
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        scores = evaluate_tasks(
            loaded.model,
            loaded.tokenizer,
            tasks,
            include_path=args.tasks_path,
            limit=args.tasks_limit,
            num_fewshot=args.num_fewshot,
        )
        out["tasks"] = scores
        if not args.json:
            for task, metrics in scores.items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("stderr"))
                print(f"{task}: {shown}")
    if args.json:
        print(json.dumps(out))
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


def _bench_llamacpp(args: argparse.Namespace) -> int:
    """``bench-speed --runtime llamacpp``: prefill and decode tokens/s of GGUF files in llama.cpp."""
    from prunekit.eval.speed.llamacpp import measure_llamacpp

    paths = [p for p in (args.baseline, args.model) if p is not None]
    if any(not str(p).lower().endswith(".gguf") for p in paths):
        raise ConfigError(
            "--runtime llamacpp times GGUF files: pass MODEL (and --baseline) as .gguf files, written by "
            "prunekit export MODEL_DIR --gguf OUT.gguf"
        )
    if args.batch_size != 1 or args.compile or args.semi_structured:
        raise ConfigError(
            "--runtime llamacpp times batch 1 as llama.cpp runs it: drop --batch-size, --compile, --semi-structured"
        )
    results = measure_llamacpp(
        paths,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
    )
    base = results[0] if args.baseline is not None else None
    ratios = (
        {
            "prefill_speedup": base.prefill.median_s / results[-1].prefill.median_s,
            "decode_speedup": base.decode.median_s / results[-1].decode.median_s,
            "size_ratio": results[-1].bytes / base.bytes,
        }
        if base
        else None
    )
    if args.json:
        data = {"runtime": "llamacpp", "model": results[-1].to_dict(), "baseline": base.to_dict() if base else None}
        print(json.dumps({**data, **(ratios or {})}, indent=2))
        return 0
    first = results[-1]
    print(
        f"llama.cpp, {first.threads} threads: batch 1, prompt {first.prompt_tokens} tokens, {first.new_tokens} "
        f"new tokens; median of {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )
    print(f"{'':<26}{'prefill tok/s (range)':>24}{'decode tok/s (range)':>24}{'file MiB':>12}")
    for label, result in (("baseline", base), ("model", first)):
        if result is not None:
            cells = [f"{t.tokens_per_s:,.1f} ({t.spread:.0%})" for t in (result.prefill, result.decode)]
            print(f"{label:<26}{cells[0]:>24}{cells[1]:>24}{result.bytes / 2**20:>12.1f}")
    if ratios:
        print(
            f"{'ratio model / baseline':<26}{ratios['prefill_speedup']:>23.2f}x{ratios['decode_speedup']:>23.2f}x"
            f"{ratios['size_ratio']:>11.2f}x"
        )
    return 0


def run_bench_speed(args: argparse.Namespace) -> int:
    from collections import Counter

    import torch

    if args.runtime == "llamacpp":
        return _bench_llamacpp(args)

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
