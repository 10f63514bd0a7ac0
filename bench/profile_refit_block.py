"""How much refitting the kept weights lowers SparseGPT's layer errors, in one decoder block of SmolLM2-135M.

The block's dense inputs (calibration 32 x 512, seed 0), each of its seven layers pruned by SparseGPT, then
refitted by 1, 2, 4, 8 and 32 conjugate-gradient steps (:func:`prunekit.reconstruction.least_squares.refit_kept_weights`).
Prints, per pattern and layer, SparseGPT's reconstruction error ``(w - w') (H + lambda I) (w - w')^T`` (the
objective both solve) and the fraction of it left after each number of steps, with the refit's time.

    python bench/profile_refit_block.py            # ~1 min; prints JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from block_inputs import SHARED_INPUT, dense_block_inputs
from prunekit.calibration.statistics import accumulate_gram, complete_gram
from prunekit.methods.sparsegpt.solver import inverse_hessian, sparsegpt_prune
from prunekit.oneshot.config import PruneConfig
from prunekit.reconstruction.least_squares import damped, reconstruction_error, refit_kept_weights

STEPS = (1, 2, 4, 8, 32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=3)
    args = parser.parse_args()
    block, hidden, calls = dense_block_inputs(args.block)
    rows = []
    with torch.no_grad():
        linears = {name.split(".")[-1]: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        grams: dict[str, torch.Tensor] = {}

        def add(name: str, x: torch.Tensor) -> None:
            grams[name] = accumulate_gram(grams.get(name), x.flatten(0, -2), torch.float32)

        hooks = [
            m.register_forward_pre_hook(lambda _m, a, n=n: add(n, a[0]))
            for n, m in linears.items()
            if SHARED_INPUT[n] == n
        ]
        for x, call in zip(hidden, calls, strict=True):
            block(x, *call.args, **call.kwargs)
        for hook in hooks:
            hook.remove()
        for gram in grams.values():
            complete_gram(gram)
        for pattern_name in ("unstructured 50%", "2:4"):
            config = PruneConfig(method="sparsegpt", **({"pattern": "2:4"} if pattern_name == "2:4" else {}))
            pattern = config.parsed_pattern()
            for name, source in SHARED_INPUT.items():
                weight, gram = linears[name].weight, grams[source]
                solved = sparsegpt_prune(weight, inverse_hessian(gram, 0.01), pattern)
                objective = damped(gram, solved.dampening)
                before = float(reconstruction_error(weight, solved.weight, objective).sum())
                row = {"pattern": pattern_name, "layer": name, "sparsegpt_error": before, "left": {}, "ms": {}}
                for steps in STEPS:
                    started = time.perf_counter()
                    refit = refit_kept_weights(
                        weight, solved.weight, solved.keep, gram, steps, dampening=solved.dampening
                    )
                    row["ms"][steps] = round(1000 * (time.perf_counter() - started), 1)
                    row["left"][steps] = round(float(reconstruction_error(weight, refit, objective).sum()) / before, 4)
                rows.append(row)
    print(json.dumps({"block": args.block, "threads": torch.get_num_threads(), "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
