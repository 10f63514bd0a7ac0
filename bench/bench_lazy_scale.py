"""Benchmark: prune a model larger than the memory budget, block by block (``prunekit prune --lazy``).

A randomly initialised Llama-architecture model of about 1.2B parameters (hidden 2048, intermediate 5632,
22 blocks, 32 heads / 4 KV heads as TinyLlama-1.1B, with SmolLM2's 49152-token vocabulary so the bundled
tokenizer can feed it real text; untied head) is written once to disk in float32 (about 4.7 GB). It is then
pruned at 50% with Wanda and with SparseGPT by ``prunekit prune --lazy``, each run in its own process under
``peak_rss.py`` (peak RSS from ``wait4``). The weights are random, so perplexity means nothing here: this
measures memory and time. Correctness of the streamed result (bit-identical to in-memory pruning) is
tested on small models in ``tests/test_lazy.py``.

    python bench/bench_lazy_scale.py                      # ~9 min here; writes bench/results/lazy_scale.json
    python bench/bench_lazy_scale.py --nsamples 16 --out bench/results/lazy_scale_16x512.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from prunekit.core.measure import versions
from prunekit.io.loading import prepare_bundled_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
log = logging.getLogger("bench_lazy_scale")

CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "vocab_size": 49152,
    "tie_word_embeddings": False,
}


def make_random_model(directory: Path) -> None:
    """Write the random float32 model (with SmolLM2's tokenizer) once; later runs reuse it."""
    import transformers

    if (directory / "config.json").is_file():
        return
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(config).float()
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB")
    transformers.AutoTokenizer.from_pretrained(prepare_bundled_model()).save_pretrained(tmp)
    del model
    tmp.rename(directory)


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lazy_scale.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "random-llama-1.2b-f32"
    started = time.perf_counter()
    make_random_model(model_dir)
    log.info("model ready in %.0f s: %s", time.perf_counter() - started, model_dir)
    size = checkpoint_bytes(model_dir)
    n_params = size // 4

    runs = []
    for method in args.methods:
        out = work / f"lazy-{method}-50"
        measured = work / f"lazy-{method}.rss.json"
        cmd = [
            sys.executable, "-m", "prunekit.cli", "-q", "prune", str(model_dir), "--lazy", "--method", method,
            "--sparsity", "0.5", "--calib", str(DATA / "wikitext2_valid.txt"), "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--seed", "0", "--device", "cpu", "--out", str(out), "--overwrite",
        ]  # fmt: skip
        wrapper = [sys.executable, str(ROOT / "bench" / "peak_rss.py"), str(measured), "--", *cmd]
        with (work / f"lazy-{method}.log").open("w") as log_file:
            code = subprocess.run(wrapper, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
        if code != 0:
            raise SystemExit(f"{method} failed; see {work / f'lazy-{method}.log'}")
        stats = json.loads(measured.read_text())
        report = json.loads((out / "prunekit-report" / "report.json").read_text())
        block_seconds = [round(b["seconds"], 2) for b in report["blocks"]]
        runs.append(
            {
                "method": method,
                "peak_rss_bytes": stats["peak_rss_bytes"],
                "peak_rss_over_checkpoint": stats["peak_rss_bytes"] / size,
                "process_wall_s": stats["wall_s"],
                "prune_seconds": report["summary"]["prune_seconds"],
                "seconds_per_block": block_seconds,
                "sparsity": report["summary"]["overall_sparsity"],
                "output_bytes": checkpoint_bytes(out),
                "command": " ".join(cmd),
            }
        )
        log.info(
            "%s: peak RSS %.2f GB (%.3f x checkpoint), %.0f s", method, stats["peak_rss_bytes"] / 1e9,
            stats["peak_rss_bytes"] / size, stats["wall_s"],
        )  # fmt: skip

    result = {
        "benchmark": "lazy (block-streamed) one-shot pruning of a random Llama model larger than the budget",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "model": {"config": CONFIG, "dtype": "float32", "parameters": n_params, "checkpoint_bytes": size},
        "calibration": {"file": "wikitext2_valid.txt", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
