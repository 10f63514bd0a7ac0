"""Benchmark (issue 23): one-shot pruning on several ranks (torchrun, gloo on this CPU) against one process.

SmolLM2-135M-Instruct float32, SparseGPT 50% (its defaults: 4 refit steps), calibration 32 x 512 tokens of
``wikitext2_valid.txt`` (seed 0). Run A: one process with 2 threads (``OMP_NUM_THREADS=2``). Run B: ``torchrun
--standalone --nproc-per-node 2 -m prunekit prune ... --distributed``, 1 thread per rank. Both through the
command line, timed whole (wall) and as the report's prune time; peak RSS of the whole command from ``wait4``
(``bench/peak_rss.py``: the largest process of the tree, i.e. one rank); per rank, from the report, its windows,
layers solved, seconds, peak RSS and the calibration activations it held. Then both outputs are scored here
on the same 40 x 2048 tokens of ``wikitext2_test.txt``, and compared tensor by tensor.

The cost model (``model_costs``) splits run A's time into the blocks' forward passes (block time minus the
layer solves inside it, which scale with the windows a rank holds) and the layer solves (which one rank does
at a time: a layer's solve needs all windows' statistics, and the next layer's inputs need its result), and
predicts run B as ``forward x (windows per rank / all) x (threads at A / per rank) + solves x (threads at A / per
rank)``, the all-reduces neglected; the prediction is checked against run B. The same
split, with per-token forward FLOPs and SparseGPT's solve FLOPs and stated GPU throughputs, sizes Llama-3-8B
and Llama-3-70B at 128 x 2048 calibration tokens on 1, 8 and 16 GPUs (assumptions in ``GPU``).

    .venv/bin/python bench/bench_distributed.py          # about 10 minutes on 2 CPU cores

Writes ``bench/results/distributed.json``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WORK = ROOT / "bench" / "work" / "distributed"
log = logging.getLogger("bench_distributed")

#: Assumptions of the GPU projection (not measured here: no GPU on this machine).
GPU = {
    "device": "H100 80GB (SXM)",
    "effective_tflops_bf16": 400.0,  # dense matmul throughput reached by the forward passes (about 40% of peak)
    "effective_tflops_fp32_solve": 40.0,  # SparseGPT's Cholesky/triangular work in float32
    "allreduce_gbytes_per_s": 100.0,  # NCCL bus bandwidth within a node (NVLink); across nodes lower
    "bytes_per_activation": 2,  # bfloat16 hidden states
}
MODELS = {  # hidden, MLP width, layers, KV width (GQA), vocabulary
    "Llama-3-8B": {"hidden": 4096, "mlp": 14336, "layers": 32, "kv": 1024},
    "Llama-3-70B": {"hidden": 8192, "mlp": 28672, "layers": 80, "kv": 1024},
}


def run(command: list[str], threads: int, name: str) -> dict[str, Any]:
    """Run ``command`` with ``threads`` intra-op threads per process; wall time and peak RSS from wait4."""
    stats = WORK / f"{name}.rss.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, str(ROOT / "bench/peak_rss.py"), str(stats), "--", *command], check=True, env=env)
    return json.loads(stats.read_text())


def block_costs(report: dict[str, Any]) -> dict[str, float]:
    """Run A's time split into forward passes and layer solves (from its report)."""
    blocks = sum(b["seconds"] for b in report["blocks"])
    solves = sum(layer["seconds"] for layer in report["layers"])
    return {"blocks_s": blocks, "solves_s": solves, "forward_s": blocks - solves}


def gpu_projection(name: str, shape: dict[str, int], tokens: int, gpus: int) -> dict[str, float]:
    """Wall time and memory per GPU of SparseGPT with the refit on ``tokens`` calibration tokens."""
    h, f, layers, kv = shape["hidden"], shape["mlp"], shape["layers"], shape["kv"]
    block_params = h * (2 * h + 2 * kv) + 3 * h * f
    # forward of every window through every block (2 FLOPs per parameter per token), shared by the GPUs
    forward_s = 2 * block_params * tokens * layers / gpus / (GPU["effective_tflops_bf16"] * 1e12)
    # Gram accumulation (2 T d^2 per distinct input: attention input, o input, MLP input, down input), shared
    gram_flops = 2 * tokens * (h * h * 3 + f * f) * layers / gpus
    gram_s = gram_flops / (GPU["effective_tflops_bf16"] * 1e12)
    # solves: inverse (d^3/3) + the column sweep (2 d_out d_in^2 / block) per layer, one rank at a time
    linears = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
    solve_flops = sum(d_in**3 / 3 + 2 * d_out * d_in * d_in for d_out, d_in in linears) * layers
    solve_s = solve_flops / (GPU["effective_tflops_fp32_solve"] * 1e12)
    allreduce_s = 0.0 if gpus == 1 else (4 * (3 * h * h + f * f) * layers * 2) / (GPU["allreduce_gbytes_per_s"] * 1e9)
    activations = tokens / gpus * h * GPU["bytes_per_activation"] * 2  # inputs and outputs of one block
    return {
        "gpus": gpus,
        "wall_s": forward_s + gram_s + solve_s + allreduce_s,
        "forward_s": forward_s,
        "gram_s": gram_s,
        "solves_s": solve_s,
        "allreduce_s": allreduce_s,
        "activations_gib_per_gpu": activations / 2**30,
        "block_weights_gib": block_params * 2 / 2**30,
        "largest_gram_gib": f * f * 4 / 2**30,
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    WORK.mkdir(parents=True, exist_ok=True)
    flags = ["--method", "sparsegpt", "--sparsity", "0.5", "--calib", str(DATA / "wikitext2_valid.txt")]
    flags += ["--nsamples", "32", "--seqlen", "512", "--seed", "0", "--overwrite"]
    one = [sys.executable, "-m", "prunekit", "-q", "prune", "smollm2", *flags, "--out", str(WORK / "one")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = [*torchrun, "-m", "prunekit", "-q", "prune", "smollm2", *flags, "--out", str(WORK / "two"), "--distributed"]
    result: dict[str, Any] = {"runs": {}}
    result["runs"]["one_process_2_threads"] = run(one, 2, "one")
    result["runs"]["two_ranks_1_thread"] = run(two, 1, "two")
    reports = {k: json.loads((WORK / k / "prunekit-report/report.json").read_text()) for k in ("one", "two")}
    for key, name in (("one_process_2_threads", "one"), ("two_ranks_1_thread", "two")):
        result["runs"][key]["prune_seconds"] = reports[name]["summary"]["prune_seconds"]
        result["runs"][key]["ranks"] = reports[name].get("ranks", [])

    import torch
    from safetensors.torch import load_file

    import prunekit

    torch.set_num_threads(2)
    tokenizer = prunekit.load_model("smollm2").tokenizer
    for key, name in (("one_process_2_threads", "one"), ("two_ranks_1_thread", "two")):
        model = prunekit.load_model(str(WORK / name), dtype="float32").model
        ppl = prunekit.perplexity(model, tokenizer, str(DATA / "wikitext2_test.txt"), 2048, 40, progress=False)
        result["runs"][key]["perplexity"] = ppl.perplexity
    a, b = (load_file(str(WORK / n / "model.safetensors")) for n in ("one", "two"))
    result["comparison"] = {
        "masks_identical": all(torch.equal(a[k] == 0, b[k] == 0) for k in a),
        "max_relative_weight_difference": max(
            float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a
        ),
    }
    costs = block_costs(reports["one"])
    # run B: each rank pushes half the windows through on half the threads (the same forward time, at equal
    # per-core speed), and the solves, one rank at a time under sequential propagation, run on 1 thread
    # instead of 2 (twice as long); the gloo all-reduces sit inside run B's block times, not separable
    predicted = reports["one"]["summary"]["prune_seconds"] + costs["solves_s"]
    result["model"] = {
        **costs,
        "assumption": "forward passes split evenly over the ranks at equal per-core speed; solves serial, one rank "
        "at a time, at 1 thread instead of 2 (2x their run-A time); all-reduce time neglected",
        "predicted_two_rank_prune_s": predicted,
        "measured_two_rank_prune_s": reports["two"]["summary"]["prune_seconds"],
    }
    result["gpu_projection"] = {
        "assumptions": GPU,
        "tokens": 128 * 2048,
        "models": {
            name: [gpu_projection(name, shape, 128 * 2048, g) for g in (1, 8, 16)] for name, shape in MODELS.items()
        },
    }
    out = ROOT / "bench/results/distributed.json"
    out.write_text(json.dumps(result, indent=2))
    log.info("%s", json.dumps({k: v for k, v in result.items() if k != "gpu_projection"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
