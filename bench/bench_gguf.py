"""Benchmark: do prunekit's structurally pruned SmolLM2 models run faster in llama.cpp, where people run them?

Each model (a directory prunekit wrote, or ``smollm2`` for the dense original) is exported with
:func:`prunekit.io.gguf.export.export_gguf` in every ``--outtypes`` type, its tokenizer carried over from the
bundled GGUF. Each float32 export is checked against PyTorch: the logits of 64 seeded random tokens in
llama.cpp and in PyTorch (max difference relative to the largest logit, and argmax agreement). Then, per type,
all files are timed in llama.cpp (llama-cpp-python, all cores) at batch 1 in interleaved rounds: prefill of
a 128-token prompt and 64 single-token decode steps on the cache, median over ``--rounds`` timed rounds after
one warm-up. For reference the same models are timed in PyTorch eager float32 in the same run
(:func:`prunekit.eval.speed.measure_speed`, batch 1, same prompt and new tokens).

    python bench/bench_gguf.py --model dense=smollm2 --model width25=bench/work/recipe-width25 \\
        --model attn9=bench/work/attn9-width25 --model search25=bench/work/recipe-search25 \\
        --model search25x32=bench/work/recipe-search25-32        # ~25 min on 2 CPU cores

(the models: ``prunekit structured --recipe bench/recipes/structured-25-width.yaml`` with and without
``--drop-attention 9``, ``structured-25.yaml`` and ``structured-25-llamacpp.yaml``, all with
``--calib ../shared/data/wikitext2_valid.txt``). A model's perplexity (40 x 2048 tokens of
``wikitext2_test.txt``) is taken from its report where the run measured it (``--ppl``), else measured here.

Writes ``bench/results/gguf_llamacpp.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_gguf")


def _stored_perplexity(source: str) -> tuple[float | None, float | None]:
    """(before, after) perplexity from the report prunekit wrote beside a model (40 x 2048 windows), if any."""
    report = Path(source) / "prunekit-report" / "report.json"
    if not report.is_file():
        return None, None
    found = json.loads(report.read_text()).get("perplexity") or {}
    return found.get("before"), found.get("after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR (the first is the baseline)")
    parser.add_argument("--outtypes", nargs="+", default=["f32", "f16", "q8_0"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pytorch-repeats", type=int, default=7, help="0: skip the PyTorch reference")
    parser.add_argument(
        "--ppl-windows",
        type=int,
        default=40,
        help="perplexity windows of 2048 tokens of wikitext2_test.txt, measured for a model whose report has none",
    )
    parser.add_argument("--work", default=str(ROOT / "bench/work/gguf"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/gguf_llamacpp.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import llama_cpp
    import torch

    from prunekit.core.measure import versions
    from prunekit.eval.gguf_check import compare_with_llamacpp
    from prunekit.eval.perplexity import perplexity
    from prunekit.eval.speed import measure_speed
    from prunekit.eval.speed.llamacpp import measure_llamacpp
    from prunekit.io.gguf.export import export_gguf
    from prunekit.io.loading import bundled_gguf_path, load_model

    models = dict(item.split("=", 1) for item in args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {**versions(), "llama_cpp_python": llama_cpp.__version__},
        "settings": vars(args),
        "load_before": os.getloadavg(),
        "models": {},
        "llamacpp": {},
        "pytorch": {},
    }
    files: dict[str, dict[str, Path]] = {outtype: {} for outtype in args.outtypes}
    stored = {name: _stored_perplexity(source) for name, source in models.items()}
    dense_ppl = next((p[0] for p in stored.values() if p[0] is not None), None)
    for name, source in models.items():
        loaded = load_model(source, dtype="float32")
        entry = {"source": loaded.source, "parameters": sum(p.numel() for p in loaded.model.parameters())}
        ppl = stored[name][1] if name != next(iter(models)) else dense_ppl
        if ppl is None and args.ppl_windows:
            test = ROOT.parent / "shared/data/wikitext2_test.txt"
            ppl = perplexity(loaded.model, loaded.tokenizer, test, 2048, args.ppl_windows, progress=False).perplexity
            entry["perplexity_measured_here"] = True
        entry["perplexity"] = ppl
        for outtype in args.outtypes:
            path = work / f"{name}-{outtype}.gguf"
            export = export_gguf(
                loaded.model,
                loaded.tokenizer,
                path,
                outtype=outtype,
                tokenizer_gguf=bundled_gguf_path(),
                overwrite=True,
                progress=False,
            )
            files[outtype][name] = path
            entry[outtype] = {"bytes": export.bytes, "arch": export.arch, "kept_f16": len(export.kept_f16)}
            if outtype == "f32":
                entry["check_f32"] = compare_with_llamacpp(loaded.model, path).to_dict()
                entry["layers"] = export.layers
        if args.pytorch_repeats:
            speed = measure_speed(
                loaded.model,
                batch_size=1,
                prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens,
                warmup=1,
                repeats=args.pytorch_repeats,
            )
            result["pytorch"][name] = {
                "prefill_tokens_per_s": speed.prefill.tokens_per_s,
                "decode_tokens_per_s": speed.decode.tokens_per_s,
                "decode_spread": speed.decode.spread,
            }
        result["models"][name] = entry
        log.info("%s: exported %s", name, entry)
        del loaded
    baseline = next(iter(models))
    for outtype, paths in files.items():
        timed = measure_llamacpp(
            list(paths.values()),
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            repeats=args.rounds,
            warmup=1,
        )
        rows = {name: speed.to_dict() for name, speed in zip(paths, timed, strict=True)}
        for row in rows.values():
            base = rows[baseline]
            row["prefill_speedup"] = base["prefill"]["median_s"] / row["prefill"]["median_s"]
            row["decode_speedup"] = base["decode"]["median_s"] / row["decode"]["median_s"]
            row["size_ratio"] = row["bytes"] / base["bytes"]
        result["llamacpp"][outtype] = rows
        log.info(
            "%s: %s",
            outtype,
            {n: (round(r["decode_speedup"], 3), round(r["prefill_speedup"], 3)) for n, r in rows.items()},
        )
    if result["pytorch"]:
        base = result["pytorch"][baseline]
        for row in result["pytorch"].values():
            row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["prefill_speedup"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    result["load_after"] = os.getloadavg()
    result["torch_threads"] = torch.get_num_threads()
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
