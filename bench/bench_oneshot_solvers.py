"""Benchmark (issue 22): better one-shot solvers than SparseGPT at the same calibration budget, beside
llm-compressor's SparseGPT in the same run.

SmolLM2-135M-Instruct float32; calibration 32 x 512 tokens of ``wikitext2_valid.txt`` (seed 0; the same ids for
every run and the peer); perplexity on the first 40 x 2048 tokens of ``wikitext2_test.txt``. Each prunekit run
prunes a fresh copy of the dense model in this process (``prunekit.prune``), timed; the peer runs in its own
virtual environment (``bench/peer_llmcompressor.py``) on the same ids and is scored by the same perplexity code.

A run is ``METHOD:PATTERN[:owl][:KEY=VALUE]...``, PATTERN a sparsity (``0.7``) or ``N:M``; ``owl`` adds OWL
layer budgets (M = 5, lambda = 0.08 unless ``--owl-max-deviation``), and each ``KEY=VALUE`` one more
:class:`prunekit.PruneConfig` key (``reconstruct=block``, ``max_iterations=100``). A recipe (``--recipes``)
runs through the command line as a user would (``prunekit prune smollm2 --recipe FILE --calib
wikitext2_valid.txt --nsamples 32 --seqlen 512 --seed 0 --out DIR``, timed whole) and its output is loaded
with plain ``transformers`` for the perplexity::

    python bench/bench_oneshot_solvers.py --runs sparsegpt:0.7 sparsegpt:0.7:owl alps:0.7 alps:0.7:owl \\
        sparsegpt:2:4 alps:2:4 --peer-python .venv-peer/bin/python --peer-runs sparsegpt:0.7
    python bench/bench_oneshot_solvers.py --recipes bench/recipes/best-50.yaml bench/recipes/best-2of4.yaml \\
        bench/recipes/best-70.yaml

The second family (``--model bench/work/qwen2-tiny --ppl-seqlen 512``, trained by ``bench/qwen2_model.py``)
checks that the gains are not tuned to SmolLM2.

Writes ``bench/results/oneshot_solvers.json`` (each run as it finishes).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
log = logging.getLogger("bench_oneshot_solvers")


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_run(text: str) -> tuple[str, dict, bool]:
    """``METHOD:PATTERN[:owl][:KEY=VALUE]...`` -> (method, PruneConfig keys, owl). PATTERN is a sparsity
    (``0.7``) or ``N:M``; each ``KEY=VALUE`` is one more PruneConfig key (``reconstruct=block``,
    ``max_iterations=100``)."""
    method, *parts = text.split(":")
    if len(parts) > 1 and parts[0].isdigit() and parts[1].isdigit():
        keys: dict = {"pattern": f"{parts[0]}:{parts[1]}"}
        parts = parts[2:]
    else:
        keys = {"sparsity": float(parts[0])}
        parts = parts[1:]
    owl = "owl" in parts
    for part in parts:
        if part != "owl":
            key, _, value = part.partition("=")
            keys[key] = _value(value)
    return method, keys, owl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=[])
    parser.add_argument("--recipes", nargs="*", default=[], help="recipe files, run through `prunekit prune`")
    parser.add_argument("--peer-python", default=None)
    parser.add_argument("--peer-runs", nargs="*", default=[])
    parser.add_argument("--owl-max-deviation", type=float, default=0.08)
    parser.add_argument("--model", default="smollm2", help="the dense model: smollm2 (bundled) or a directory")
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--ppl-seqlen", type=int, default=2048)
    parser.add_argument("--work", default=str(ROOT / "bench/work/solvers"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/oneshot_solvers.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    import transformers
    from safetensors.torch import save_file

    import prunekit
    from prunekit.core.measure import versions
    from prunekit.io.loading import prepare_bundled_model

    dense = prunekit.load_model(args.model, dtype="float32")
    calib = prunekit.calibration_windows(dense.tokenizer, str(DATA / "wikitext2_valid.txt"), 32, 512, seed=0)
    test = str(DATA / "wikitext2_test.txt")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result: dict = {"versions": versions(), "settings": vars(args), "runs": []}
    if out.is_file():  # extend an earlier run of the same settings
        result["runs"] = json.loads(out.read_text()).get("runs", [])

    def score(model: torch.nn.Module) -> float:
        return prunekit.perplexity(
            model, dense.tokenizer, test, args.ppl_seqlen, args.ppl_windows, progress=False
        ).perplexity

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    for text in args.runs:
        method, keys, owl = parse_run(text)
        budget = {"layer_budget": "owl", "owl_max_deviation": args.owl_max_deviation} if owl else {}
        config = prunekit.PruneConfig(method=method, **keys, **budget)
        started = time.perf_counter()
        pruned = prunekit.prune(dense.model, config, calib, progress=False)
        seconds = time.perf_counter() - started
        ppl = score(pruned.model)
        record = {
            "tool": "prunekit",
            "run": text,
            "perplexity": ppl,
            "prune_seconds": seconds,
            "sparsity": pruned.overall_sparsity,
            "block_sparsity": pruned.block_sparsity,
            "mean_relative_error": sum(r.relative_error or 0 for r in pruned.layers) / len(pruned.layers),
        }
        log.info("%s", record)
        result["runs"].append(record)
        save()
        del pruned
    for recipe in args.recipes:
        name = Path(recipe).stem
        target = work / f"recipe-{name}"
        command = [sys.executable, "-m", "prunekit", "-q", "prune", args.model, "--recipe", recipe, "--overwrite"]
        command += ["--calib", str(DATA / "wikitext2_valid.txt"), "--nsamples", "32", "--seqlen", "512"]
        command += ["--seed", "0", "--out", str(target)]
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        model = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)  # plain transformers
        weights = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        report = json.loads((target / "prunekit-report" / "report.json").read_text())
        record = {
            "tool": "prunekit",
            "run": f"recipe {recipe}",
            "perplexity": score(model),
            "prune_seconds": report["summary"]["prune_seconds"],  # the pruning itself, as the API runs time it
            "command_seconds": seconds,  # the whole command: start-up, loading, pruning, saving
            "sparsity": zeros,
            "command": " ".join(command[1:]),
        }
        log.info("%s", record)
        result["runs"].append(record)
        save()
    if args.peer_runs and args.peer_python:
        calib_file = work / "calib.safetensors"
        save_file({"input_ids": calib.contiguous()}, str(calib_file))
        for text in args.peer_runs:
            method, keys, _ = parse_run(text)
            name = f"peer-{method}-{text.split(':', 1)[1].replace(':', 'of')}"
            flags = ["--pattern", keys["pattern"]] if "pattern" in keys else ["--sparsity", str(keys["sparsity"])]
            command = [
                args.peer_python,
                str(ROOT / "bench/peer_llmcompressor.py"),
                "--model",
                str(prepare_bundled_model() if args.model == "smollm2" else Path(args.model).resolve()),
                "--calib-ids",
                str(calib_file),
                "--method",
                method,
                *flags,
                "--out",
                str(work / name),
                "--result",
                str(work / f"{name}.json"),
            ]
            subprocess.run(command, check=True, cwd=ROOT)
            peer = json.loads((work / f"{name}.json").read_text())
            model = prunekit.load_model(str(work / name), dtype="float32").model
            record = {
                "tool": "llm-compressor",
                "run": text,
                "version": peer.get("version"),
                "perplexity": score(model),
                "prune_seconds": peer.get("prune_seconds"),
                "sparsity": peer.get("measured_sparsity_of_targets"),
            }
            log.info("%s", record)
            result["runs"].append(record)
            save()
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
