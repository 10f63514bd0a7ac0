"""How much do Wanda perplexities move with the calibration draw? prunekit's one-pass ``sequential``
statistics against the two-pass ``block`` statistics (which reproduce llm-compressor's Wanda exactly, see
BENCHMARKS.md), for other calibration seeds, same setting as ``bench_oneshot.py`` otherwise.

    python bench/bench_propagation_seeds.py --seeds 1      # ~9 min per seed here
    python bench/bench_propagation_seeds.py --seeds 0 1 2 --propagations dense --out bench/results/propagation_dense.json

Writes ``bench/results/propagation_seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import prunekit
from prunekit.eval.perplexity import perplexity
from prunekit.io.loading import prepare_bundled_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument(
        "--propagations", nargs="+", default=["sequential", "block"], choices=["sequential", "block", "dense"]
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "propagation_seeds.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model_dir = str(prepare_bundled_model())
    rows = []
    for seed in args.seeds:
        for pattern in args.patterns:
            for propagation in args.propagations:
                loaded = prunekit.load_model(model_dir)
                calib = prunekit.calibration_windows(loaded.tokenizer, DATA / "wikitext2_valid.txt", 32, 512, seed)
                config = prunekit.PruneConfig(device="cpu", pattern=pattern, propagation=propagation)
                result = prunekit.prune(loaded.model, config, calib, inplace=True, progress=False)
                ppl = perplexity(result.model, loaded.tokenizer, DATA / "wikitext2_test.txt", 2048, 40, progress=False)
                rows.append(
                    {"seed": seed, "pattern": pattern, "propagation": propagation, "perplexity": ppl.perplexity,
                     "prune_seconds": result.seconds}
                )  # fmt: skip
                logging.info("%s", rows[-1])
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
