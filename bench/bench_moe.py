"""Benchmark: pruning a mixture-of-experts LM at one expert-parameter budget (issue 20).

The model is a folder under ``bench/work`` (``--model``) trained by ``bench/moe_model.py``: Mixtral-style, 8
experts per layer, top-2, on ``wikitext2_valid.txt``; ``moe-mixtral`` (4 layers, experts of width 512) by
default, ``moe-mixtral-wide`` (6 layers, width 1024) for the main table of BENCHMARKS.md. Calibration: 32 windows x 512 tokens drawn with
seed 0 from ``wikitext2_valid.txt``; perplexity on the first 40 windows x 512 tokens of
``wikitext2_test.txt``; this machine's CPU.

At the same budget, 50% of the routed experts' parameters removed:

* unstructured Wanda and SparseGPT (with its refit) inside every expert (the experts' matrices only);
* STUN: 25% of the experts removed by each criterion (frequency, reap, stun, reconstruct), then Wanda or
  SparseGPT inside the kept experts to the budget;
* experts only: 50% of the experts removed by each criterion;

and, on their own, 25% of the experts removed by each criterion. Every run reports perplexity, the size of
its safetensors checkpoint (dense format) and batch-1 greedy decode tokens/s (64-token prompt, 64 new
tokens, median of 5). With ``--peer-python``, llm-compressor's REAP modifier removes 25% and 50% of the
experts of the same model with the same calibration windows, in its own venv; its checkpoints are scored by
the same perplexity code. Also: Wanda 50% on the tiny random Mixtral of the test suite (the held-out family
check), and the measured per-expert costs behind BENCHMARKS.md's estimate for Qwen3-30B-A3B.

    python bench/moe_model.py --layers 6 --expert-width 1024 --steps 1000 --name moe-mixtral-wide  # ~47 min
    python bench/bench_moe.py --model moe-mixtral-wide --peer-python .venv-peer/bin/python

Writes ``bench/results/<model>.json`` (``moe_mixtral.json`` for the default ``--model moe-mixtral``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model of the held-out family check

import prunekit  # noqa: E402
from prunekit.core.measure import versions  # noqa: E402
from prunekit.eval.perplexity import perplexity_of_tokens  # noqa: E402
from prunekit.eval.speed.decode import measure_decode  # noqa: E402
from prunekit.io.compressed import checkpoint_size_bytes  # noqa: E402
from prunekit.io.loading import load_model  # noqa: E402
from prunekit.io.saving import save_pretrained  # noqa: E402
from prunekit.models.moe_layers import find_moe_layers  # noqa: E402
from prunekit.moe import ExpertPruneConfig, prune_experts  # noqa: E402
from prunekit.moe.job import EXPERT_TARGETS, expert_zeros, oneshot_sparsity, routed_expert_parameters  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
WORK = ROOT / "bench" / "work"
CRITERIA = ("frequency", "reap", "stun", "reconstruct")
log = logging.getLogger("bench_moe")


def inside_config(method: str, sparsity: float) -> prunekit.PruneConfig:
    return prunekit.PruneConfig(method=method, sparsity=sparsity, include=[EXPERT_TARGETS])


def score(
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    tokens: torch.Tensor,
    args: argparse.Namespace,
    extra: dict[str, Any],
    expert_params_before: int,
) -> dict[str, Any]:
    """Perplexity, checkpoint size, decode speed and the expert-parameter budget reached, of one pruned model."""
    ppl = perplexity_of_tokens(model, tokens, args.ppl_seqlen, args.ppl_windows, "cpu", False, "wikitext2_test.txt")
    out = WORK / "moe-runs" / name
    if out.exists():
        shutil.rmtree(out)
    save_pretrained(model, tokenizer, out)
    decode = measure_decode(model, batch_size=1, prompt_tokens=64, new_tokens=64, warmup=1, repeats=5)
    kept_params = routed_expert_parameters(model)
    zeros = expert_zeros(model)
    record = {
        "run": name,
        "perplexity": ppl.perplexity,
        "checkpoint_bytes": checkpoint_size_bytes(out),
        "decode_tokens_per_s": decode.tokens_per_s,
        "decode_seconds": list(decode.seconds),
        "experts_per_layer": find_moe_layers(model)[0].num_experts,
        "expert_params_removed_fraction": (expert_params_before - kept_params + zeros) / expert_params_before,
        **extra,
    }
    log.info("%-32s ppl %.3f  removed %.4f  %s", name, ppl.perplexity, record["expert_params_removed_fraction"], extra)
    shutil.rmtree(out)
    return record


def held_out_family_check(tokens: torch.Tensor) -> dict[str, Any]:
    """Wanda 50% on the test suite's tiny random Mixtral: the least-zero expert tensor."""
    from models import tiny_model

    model = tiny_model("mixtral")
    calibration = tokens[: 4 * 32].reshape(4, 32) % model.config.vocab_size
    pruned = prunekit.prune(
        model, prunekit.PruneConfig(method="wanda", sparsity=0.5), calibration, progress=False
    ).model
    fractions = {n: float((p == 0).float().mean()) for n, p in pruned.named_parameters() if p.dim() == 3}
    return {"min_expert_tensor_zero_fraction": min(fractions.values()), "tensors": fractions}


#: Qwen3-30B-A3B: 48 MoE layers of 128 experts (gate/up 768 x 2048, down 2048 x 768), top-8, hidden 2048.
QWEN3_30B = {"layers": 48, "experts": 128, "top_k": 8, "hidden": 2048, "expert_width": 768, "params": 30.5e9}


def per_expert_costs(tokens_per_expert: int, repeats: int = 3) -> dict[str, Any]:
    """Seconds of one expert's work at Qwen3-30B-A3B's shapes on this machine, measured: the Gram of its routed
    tokens (gate/up input 2048 wide, down input 768 wide) and SparseGPT's and Wanda's decisions (with the refit)
    for one gate (768 x 2048) and one down (2048 x 768) matrix, float32, 50% unstructured."""
    from prunekit.calibration.statistics import LayerStatistics, accumulate_gram, complete_gram
    from prunekit.core.patterns import parse_pattern
    from prunekit.methods import LayerTask, method_class
    from prunekit.reconstruction.least_squares import refit_kept_weights

    torch.manual_seed(0)
    hidden, width = QWEN3_30B["hidden"], QWEN3_30B["expert_width"]
    out: dict[str, Any] = {"tokens_per_expert": tokens_per_expert}
    for label, rows, cols in (("gate_or_up", width, hidden), ("down", hidden, width)):
        x = torch.randn(tokens_per_expert, cols)
        weight = torch.randn(rows, cols) / cols**0.5
        times: dict[str, list[float]] = {"gram": [], "sparsegpt": [], "wanda": [], "refit": []}
        for _ in range(repeats):
            started = time.perf_counter()
            gram = complete_gram(accumulate_gram(None, x, torch.float32))
            times["gram"].append(time.perf_counter() - started)
            stats = LayerStatistics(gram.diagonal().clone(), tokens_per_expert, None, gram)
            pattern = parse_pattern("unstructured", 0.5, "layer")
            for method in ("sparsegpt", "wanda"):
                chosen = method_class(method)(method_class(method).config_class())
                started = time.perf_counter()
                pruned = chosen.finalize(LayerTask(label, weight, stats, pattern, keep_gram=True))
                times[method].append(time.perf_counter() - started)
            started = time.perf_counter()
            refit_kept_weights(weight, pruned.weight, pruned.mask.keep, gram, 4, dampening=0.01)
            times["refit"].append(time.perf_counter() - started)
        out[label] = {k: statistics.median(v) for k, v in times.items()}
    return out


def qwen3_30b_estimate(costs: dict[str, Any]) -> dict[str, Any]:
    """Time and memory of pruning Qwen3-30B-A3B inside every expert, from the measured per-expert costs."""
    q = QWEN3_30B
    gu, down = costs["gate_or_up"], costs["down"]
    grams = gu["gram"] + down["gram"]  # gate and up read the same input: one Gram for both
    per_expert = {
        "sparsegpt": grams + 2 * (gu["sparsegpt"] + gu["refit"]) + down["sparsegpt"] + down["refit"],
        "wanda": grams + 2 * gu["wanda"] + down["wanda"],  # (Wanda needs only the Gram's diagonal)
    }
    experts = q["layers"] * q["experts"]
    return {
        "experts": experts,
        "hours_on_this_cpu": {method: experts * seconds / 3600 for method, seconds in per_expert.items()},
        "memory_gib": {
            "bf16_weights": q["params"] * 2 / 2**30,
            "largest_expert_gram_float32": q["hidden"] ** 2 * 4 / 2**30,
            "one_block_activations_128x2048_bf16": 128 * 2048 * q["hidden"] * 2 / 2**30,
        },
    }


def run_peer(peer_python: str, model: Path, calib_file: Path, remove: float, out: Path) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        peer_python,
        str(ROOT / "bench" / "peer_llmcompressor_reap.py"),
        str(model),
        str(calib_file),
        str(remove),
        str(out),
    ]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - started
    (WORK / f"peer_reap_{remove}.log").write_text(done.stdout + done.stderr)
    return {"returncode": done.returncode, "seconds": seconds, "tail": (done.stdout + done.stderr)[-2000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peer-python", default=None, help="python of the llm-compressor venv (skip the peer if absent)"
    )
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="only dense, wanda 50%% and reap 25%% (a smoke run)")
    parser.add_argument("--model", default="moe-mixtral", help="the trained model's folder under bench/work")
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/<model>.json)")
    args = parser.parse_args()
    MODEL = WORK / args.model
    args.out = args.out or str(ROOT / "bench" / "results" / f"{args.model.replace('-', '_')}.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("prunekit").setLevel(logging.WARNING)
    if not (MODEL / "training.json").is_file():
        raise SystemExit(f"no trained model in {MODEL}: run `python bench/moe_model.py` first")
    torch.manual_seed(0)
    dense = load_model(str(MODEL))
    tokenizer = dense.tokenizer
    calib = prunekit.calibration_windows(tokenizer, DATA / "wikitext2_valid.txt", args.nsamples, args.seqlen, seed=0)
    test_tokens = prunekit.calibration.data.load_text_tokens(tokenizer, DATA / "wikitext2_test.txt", what="evaluation")
    expert_params = routed_expert_parameters(dense.model)
    results: dict[str, Any] = {
        "versions": versions(),
        "model": json.loads((MODEL / "training.json").read_text()),
        "setting": {k: getattr(args, k) for k in ("nsamples", "seqlen", "ppl_windows", "ppl_seqlen")},
        "expert_params": expert_params,
        "runs": [],
    }

    def fresh() -> torch.nn.Module:
        return load_model(str(MODEL)).model

    def record(name: str, model: torch.nn.Module, **extra: Any) -> None:
        results["runs"].append(score(name, model, tokenizer, test_tokens, args, extra, expert_params))
        Path(args.out).write_text(json.dumps(results, indent=2))

    record("dense", dense.model, seconds=0.0)
    for method in ("wanda",) if args.quick else ("wanda", "sparsegpt"):
        started = time.perf_counter()
        result = prunekit.prune(fresh(), inside_config(method, 0.5), calib, inplace=True, progress=False)
        expert_rows = [r for r in result.layers if r.expert is not None]
        record(
            f"{method}-50-inside-experts",
            result.model,
            seconds=time.perf_counter() - started,
            per_expert_matrix_seconds=statistics.mean(r.seconds for r in expert_rows),
            per_expert_matrix_shapes=sorted({tuple(r.shape) for r in expert_rows}),
        )
    removals = (0.25,) if args.quick else (0.25, 0.5)
    for criterion in ("reap",) if args.quick else CRITERIA:
        for remove in removals:
            started = time.perf_counter()
            removed = prune_experts(
                fresh(), ExpertPruneConfig(remove=remove, criterion=criterion), calib, progress=False
            )
            seconds = time.perf_counter() - started
            layers = [
                {"layer": layer.name, "removed": layer.removed, "error": layer.relative_error, "seconds": layer.seconds}
                for layer in removed.layers
            ]
            record(f"experts-{criterion}-{int(remove * 100)}", removed.model, seconds=seconds, layers=layers)
            if remove != 0.25 or args.quick:
                continue
            for method in ("wanda", "sparsegpt"):
                started = time.perf_counter()
                model = prune_experts(
                    fresh(), ExpertPruneConfig(remove=0.25, criterion=criterion), calib, progress=False
                ).model
                sparsity = oneshot_sparsity(0.5, 0.25)
                prunekit.prune(model, inside_config(method, sparsity), calib, inplace=True, progress=False)
                record(
                    f"stun-{criterion}-25-then-{method}",
                    model,
                    seconds=time.perf_counter() - started,
                    inside_sparsity=sparsity,
                )
    results["held_out_tiny_mixtral_wanda50"] = held_out_family_check(calib.reshape(-1))
    # 128 windows x 2048 tokens, top-8 of 128 experts: 16,384 routed tokens per expert on average
    costs = per_expert_costs(128 * 2048 * QWEN3_30B["top_k"] // QWEN3_30B["experts"])
    results["qwen3_30b_a3b"] = {"measured_per_expert_seconds": costs, "estimate": qwen3_30b_estimate(costs)}
    Path(args.out).write_text(json.dumps(results, indent=2))

    peer_python = args.peer_python if args.peer_python and Path(args.peer_python).exists() else None
    if peer_python is None:
        log.warning("no --peer-python: llm-compressor's REAP is not compared")
    else:
        calib_file = WORK / "moe_calib.safetensors"
        save_file({"input_ids": calib.contiguous()}, str(calib_file))
        for remove in removals:
            out = WORK / "moe-runs" / f"peer-reap-{int(remove * 100)}"
            peer = run_peer(peer_python, MODEL, calib_file, remove, out)
            if peer["returncode"] != 0:
                results.setdefault("peer_failures", []).append({"remove": remove, **peer})
                log.error("llm-compressor REAP %.2f failed: %s", remove, peer["tail"][-500:])
                continue
            model = load_model(str(out)).model
            record(f"llmcompressor-reap-{int(remove * 100)}", model, seconds=peer["seconds"])
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
