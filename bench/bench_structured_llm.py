"""Benchmark: structural pruning of SmolLM2-135M-Instruct, 25% of the parameters removed (issue 5, benchmark 3).

Three pruned models, each made in its own process:

- ``prunekit-width``: MLP width and attention heads (whole KV groups), L2 magnitude weighted by calibration
  activations (``criterion="activation"``), 25% of the parameters, the layers that lost inputs (``down_proj``,
  ``o_proj``) refitted by least squares on the calibration windows (the defaults);
- ``prunekit-width_obs``: the same, units scored by their second-order removal cost (``criterion="obs"``);
- ``prunekit-width_hidden``: the same with the hidden size pruned too (``prune_hidden=True``);
- ``prunekit-attention<k>``, one per ``--drop-attention`` count ``k``: the attention sublayers of the ``k``
  layers of lowest attention influence dropped first (He et al. 2024), each replaced by its mean output on
  the calibration windows, then the MLP width and heads pruned to the same 25% in all (``drop_attention=k``); saved with
  ``prunekit.save_pruned`` (a transformers config cannot say that a layer has no attention) and loaded back
  with ``prunekit.load_model``;
- ``prunekit-depth``: whole decoder layers of lowest Block Influence (ShortGPT) until >= 25% of parameters;
- ``prunekit-search``: per-layer widths searched (Týr-the-Pruner, :mod:`prunekit.structured.llm.search`, its
  default settings): 4 more calibration windows are drawn with the 32 and held apart to score genomes on;
  saved with ``prunekit.save_pruned`` (a Llama config cannot say that layers differ) and the search's history
  (best KL against time) recorded; ``SEARCH_DECODE_SPEEDUP=1.3`` in the environment adds the search's decode
  constraint (``decode_speedup``: a latency model measured in the child);
- ``torch-pruning``: Torch-Pruning 1.6.1 following its own LLM example (``examples/LLMs/prune_llm.py``:
  MetaPruner, GroupMagnitudeImportance(p=2) (1.6.1 name of the example's GroupNormImportance), heads pruned,
  head dims kept, ``lm_head`` ignored, round_to 4; where pruning heads fails, as on SmolLM2's grouped-query
  attention, heads are kept and the failure recorded), its ratio bisected to the same 25% of parameters;

then scored in this process by the same code: perplexity on 40 x 2048 windows of ``wikitext2_test.txt`` (no
fine-tuning) and greedy decode speed (batch 1, 128-token prompt, 64 new tokens; dense and pruned
interleaved, median of the repeats; ``decode_gain_paired`` is the median of the per-round ratios). With
``--compiled-decode`` every model is also timed the way transformers recommends for fast generation (static
KV cache, the decode step under ``torch.compile``: ``measure_decode(compiled=True)``), in rounds of their own
after the eager ones, as ``compiled_decode_*``. ``--ppl-windows 0`` skips the perplexities and ``--tools``
runs some of the models (a decode-only rerun, say).

    bash bench/setup_structured.sh   # .venv-tv (prunekit) and .venv-tp (Torch-Pruning, transformers)
    .venv-tv/bin/python bench/bench_structured_llm.py --peer-python .venv-tp/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "structured_llm.json"
DATA = ROOT.parent / "shared" / "data"
#: Attention sublayers that the ``prunekit-attention<k>`` models drop (of SmolLM2's 30): the counts tried on
#: validation perplexity (see BENCHMARKS.md), not on the test windows the benchmark scores.
DROP_ATTENTION = (9, 12)


def child_prunekit(kind: str, source: Path, out: Path, ratio: float, nsamples: int, seqlen: int) -> dict:
    import torch

    import prunekit
    from prunekit.models.dropped_attention import dropped_attention_layers, save_pretrained_refusal
    from prunekit.structured.llm import prune_causal_lm_depth, prune_causal_lm_width

    loaded = prunekit.load_model(str(source))
    model = loaded.model.eval()
    calib = prunekit.calibration_windows(loaded.tokenizer, DATA / "wikitext2_valid.txt", nsamples, seqlen, seed=0)
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    if kind in ("width", "width_hidden", "width_obs") or kind.startswith("attention"):
        hidden = kind == "width_hidden"
        drop = int(kind.removeprefix("attention")) if kind.startswith("attention") else 0
        criterion = "obs" if kind == "width_obs" else "activation"
        result = prune_causal_lm_width(
            model, calib, ratio, target="params", prune_hidden=hidden, drop_attention=drop, criterion=criterion
        )
        pruned = result.model
        c = pruned.config
        extra: dict = {
            "prune_hidden": hidden,
            "dropped_attention": dropped_attention_layers(pruned),
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
        }
    elif kind == "search":
        from prunekit.structured.llm.search import WidthSearchConfig, search_widths

        config = WidthSearchConfig(
            ratio=ratio, decode_speedup=float(os.environ.get("SEARCH_DECODE_SPEEDUP", 0)) or None
        )
        # the calibration windows, and the search's own held-apart windows drawn with them
        calib = prunekit.calibration_windows(
            loaded.tokenizer, DATA / "wikitext2_valid.txt", nsamples + config.search_windows, seqlen, seed=0
        )
        searched = search_widths(model, calib, config, progress=False)
        pruned = searched.model
        extra = {
            "search": config.model_dump(),
            "genome": [list(choice) for choice in searched.genome],
            "widths": searched.widths(),
            "kl": searched.kl,
            "uniform_kl": searched.uniform_kl,
            "refit_kl": searched.refit_kl,
            "decode_speedup_predicted": searched.decode_speedup,
            "latency_fit_error": searched.latency_fit_error,
            "decode_latency": searched.decode_latency,
            "evaluations": searched.evaluations,
            "history": [vars(step) for step in searched.history],
            "dropped_attention": dropped_attention_layers(pruned),
        }
    else:
        pruned, removed = prune_causal_lm_depth(model, calib, ratio)
        extra = {"removed_layers": removed}
    seconds = time.perf_counter() - start
    with torch.no_grad():
        if save_pretrained_refusal(pruned) is not None or dropped_attention_layers(pruned):
            prunekit.save_pruned(pruned, out)
        else:
            pruned.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return {"params": before, "pruned_params": sum(p.numel() for p in pruned.parameters()), "prune_s": seconds, **extra}


def child_torch_pruning(source: Path, ratio: float, ppl_windows: int, repeats: int, compiled: bool = False) -> dict:
    import copy

    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    inputs = torch.tensor(tokenizer.encode("Hello world.")).unsqueeze(0)
    before = sum(p.numel() for p in base.parameters())

    def prune(pruning_ratio: float, heads: bool) -> torch.nn.Module:
        model = copy.deepcopy(base)
        num_heads = {}
        attention = []
        for name, m in model.named_modules():
            if name.endswith("self_attn"):
                num_heads[m.q_proj] = model.config.num_attention_heads
                num_heads[m.k_proj] = model.config.num_key_value_heads
                num_heads[m.v_proj] = model.config.num_key_value_heads
                attention += [m.q_proj, m.k_proj, m.v_proj]
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False,
            pruning_ratio=pruning_ratio,
            ignored_layers=[model.lm_head] + ([] if heads else attention),
            num_heads=num_heads,
            prune_num_heads=heads,
            prune_head_dims=False,
            head_pruning_ratio=pruning_ratio if heads else 0.0,
            round_to=4,
            forward_fn=lambda m, x: m(x, use_cache=False),
            output_transform=lambda out: out.logits,
        )
        for group in pruner.step(interactive=True):
            group.prune()
        # attribute updates as in the example
        model.config.hidden_size = model.lm_head.in_features
        for name, m in model.named_modules():
            if name.endswith("self_attn"):
                m.hidden_size = m.q_proj.out_features
                m.num_heads = m.hidden_size // m.head_dim
                model.config.num_attention_heads = m.num_heads
                m.num_key_value_heads = m.k_proj.out_features // m.head_dim
                model.config.num_key_value_heads = m.num_key_value_heads
                m.num_key_value_groups = m.num_heads // m.num_key_value_heads
            elif name.endswith("mlp"):
                model.config.intermediate_size = m.gate_proj.out_features
        return model

    # The example's setting (heads pruned) first; if Torch-Pruning fails on it, the closest that runs: heads kept
    heads, failure = True, None
    try:
        prune(0.2, heads=True)
    except Exception as error:
        heads, failure = False, f"{type(error).__name__}: {error}"

    start = time.perf_counter()
    low, high, best = 0.0, 0.9, None
    for _ in range(8):
        middle = (low + high) / 2
        candidate = prune(middle, heads)
        if sum(p.numel() for p in candidate.parameters()) <= before * (1 - ratio):
            high, best = middle, candidate
        else:
            low = middle
    model = best if best is not None else prune(high, heads)
    seconds = time.perf_counter() - start
    result = {
        "params": before,
        "pruned_params": sum(p.numel() for p in model.parameters()),
        "prune_s": seconds,
        "pruning_ratio": high,
        "heads_pruned": heads,
        "example_setting_failure": failure,
        "hidden_size": model.lm_head.in_features,
        "intermediate_size": model.model.layers[0].mlp.gate_proj.out_features,
        "num_attention_heads": model.config.num_attention_heads,
    }
    # transformers refuses to save a config whose hidden size is not a multiple of the heads (Torch-Pruning's
    # result here): score it in this process, with prunekit's evaluation code on the path (PYTHONPATH)
    runs = {"dense": {"ok": True}, "torch-pruning": {"ok": True}}
    scores = measure({"dense": base, "torch-pruning": model.eval()}, tokenizer, ppl_windows, repeats, compiled)
    for name in runs:
        runs[name].update(scores[name])
    result.update({k: v for k, v in runs["torch-pruning"].items() if k != "ok"})
    result["dense_in_this_process"] = runs["dense"]
    return result


def decode_rounds(models: dict, repeats: int, compiled: bool) -> dict[str, dict]:
    """Decode tokens/s of each model, ``repeats`` interleaved rounds (drift hits every model alike); the gain
    over ``dense`` as the ratio of medians and as the median of the same rounds' ratios. A model that cannot
    be timed (a config the static cache cannot read) gets its error instead."""
    from prunekit.eval.speed import measure_decode

    prefix = "compiled_" if compiled else ""
    timings: dict[str, list[float]] = {name: [] for name in models}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        for name, model in models.items():
            if name in errors:
                continue
            try:
                timing = measure_decode(model, 1, 128, 64, warmup=1, repeats=1, compiled=compiled)
            except Exception as error:  # recorded per model: one failure should not void the others' rounds
                errors[name] = f"{type(error).__name__}: {error}"[:400]
                continue
            timings[name].append(timing.tokens_per_s)
    out: dict[str, dict] = {name: {} for name in models}
    for name, values in timings.items():
        if name in errors:
            out[name][f"{prefix}decode_error"] = errors[name]
            continue
        out[name][f"{prefix}decode_tok_s"] = sorted(values)[len(values) // 2]
        out[name][f"{prefix}decode_tok_s_all"] = values
    dense = timings.get("dense") if "dense" not in errors else None
    for name in models:
        if name == "dense" or not dense or name in errors:
            continue
        out[name][f"{prefix}decode_gain"] = out[name][f"{prefix}decode_tok_s"] / out["dense"][f"{prefix}decode_tok_s"]
        # the same rounds' dense and pruned runs are adjacent in time: their ratio cancels the machine's drift
        paired = sorted(p / d for p, d in zip(timings[name], dense, strict=True))
        out[name][f"{prefix}decode_gain_paired"] = paired[len(paired) // 2]
    return out


def measure(models: dict, tokenizer, ppl_windows: int, repeats: int, compiled: bool = False) -> dict[str, dict]:
    """Perplexity (unless ``ppl_windows`` is 0) and decode speed of each model, eager and, with ``compiled``,
    compiled."""
    import torch

    import prunekit

    torch.set_num_threads(2)
    out: dict[str, dict] = {name: {} for name in models}
    for name, model in models.items():
        if ppl_windows <= 0:
            break
        result = prunekit.perplexity(model, tokenizer, DATA / "wikitext2_test.txt", 2048, ppl_windows, progress=False)
        out[name]["perplexity"] = result.perplexity
        print(f"{name:16s} perplexity {result.perplexity:.3f}", file=sys.stderr, flush=True)
    for mode in [False, True] if compiled else [False]:
        for name, scores in decode_rounds(models, repeats, mode).items():
            out[name].update(scores)
    return out


def evaluate(dense_dir: Path, runs: dict[str, dict], ppl_windows: int, repeats: int, compiled: bool = False) -> None:
    import prunekit

    dense = prunekit.load_model(str(dense_dir))
    models = {"dense": dense.model.eval()}
    for name, run in runs.items():
        if run.get("ok") and "dir" in run:
            models[name] = prunekit.load_model(run["dir"]).model.eval()
    for name, scores in measure(models, dense.tokenizer, ppl_windows, repeats, compiled).items():
        runs.setdefault(name, {"ok": True}).update(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--child", help="internal: prune one model (prunekit-width, prunekit-attention9, torch-pruning...)"
    )
    parser.add_argument("--source", type=Path)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--peer-python")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument(
        "--drop-attention",
        type=int,
        nargs="*",
        default=list(DROP_ATTENTION),
        help="one prunekit-attention<k> model per count k of attention sublayers to drop",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiled-decode", action="store_true", help="also time decoding compiled (static cache)")
    parser.add_argument("--tools", nargs="*", help="run only these models (prunekit-width, prunekit-depth...)")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "structured_llm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        if args.child == "torch-pruning":
            result = child_torch_pruning(args.source, args.ratio, args.ppl_windows, args.repeats, args.compiled_decode)
        else:
            kind = args.child.split("-", 1)[1]
            result = child_prunekit(kind, args.source, args.dir, args.ratio, args.nsamples, args.seqlen)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from prunekit.io.loading import prepare_bundled_model

    source = prepare_bundled_model()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    runs: dict[str, dict] = {}
    kinds = ["width", "width_obs", "width_hidden", *(f"attention{k}" for k in args.drop_attention), "depth", "search"]
    jobs = [(f"prunekit-{kind}", sys.executable) for kind in kinds]
    if args.peer_python:
        jobs.append(("torch-pruning", args.peer_python))
    jobs = [job for job in jobs if not args.tools or job[0] in args.tools]
    for name, python in jobs:
        out = args.work / name
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # the peer scores with prunekit's evaluation code
        cmd = [
            python,
            str(Path(__file__).resolve()),
            "--child",
            name,
            "--source",
            str(source),
            "--dir",
            str(out),
            "--ratio",
            str(args.ratio),
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--ppl-windows",
            str(args.ppl_windows),
            "--repeats",
            str(args.repeats),
            *(["--compiled-decode"] if args.compiled_decode else []),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            runs[name] = {"ok": False, "error": " | ".join(proc.stderr.strip().splitlines()[-4:])[-800:]}
            print(f"{name}: FAIL {runs[name]['error']}", flush=True)
            continue
        runs[name] = {"ok": True, **({"dir": str(out)} if out.exists() else {}), **json.loads(lines[-1][7:])}
        run = runs[name]
        print(f"{name}: params {run['pruned_params'] / run['params']:.3f} in {run['prune_s']:.1f} s", flush=True)
    evaluate(source, runs, args.ppl_windows, args.repeats, args.compiled_decode)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"ratio": args.ratio, "repeats": args.repeats, "compiled_decode": args.compiled_decode}
    args.out.write_text(json.dumps({**settings, "runs": runs}, indent=1))
    keys = ("perplexity", "decode_gain_paired", "compiled_decode_gain_paired")
    print(json.dumps({k: {x: v.get(x) for x in keys} for k, v in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
