"""Where SparseGPT's time goes in one decoder block of SmolLM2-135M (calibration 32 x 512, seed 0).

Times, best of ``--repeats``, each part of what the engine does for one block: the forward of the 32
calibration windows, the Gram matrices of the four distinct layer inputs (q/k/v share one, gate/up share
one), their inverse factors, and the seven layer solves at 50% and 2:4.

    python bench/profile_sparsegpt_block.py            # ~1 min; prints JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch

from block_inputs import SHARED_INPUT, dense_block_inputs
from prunekit.calibration.statistics import accumulate_gram, complete_gram
from prunekit.methods.sparsegpt.solver import inverse_hessian, sparsegpt_prune
from prunekit.oneshot.config import PruneConfig


def best_of(repeats: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    block, hidden, calls = dense_block_inputs(args.block)
    with torch.no_grad():

        def forward() -> None:
            for x, call in zip(hidden, calls, strict=True):
                block(x, *call.args, **call.kwargs)

        inputs: dict[str, list[torch.Tensor]] = {}
        linears = {name.split(".")[-1]: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        hooks = [
            m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].flatten(0, -2)))
            for n, m in linears.items()
            if SHARED_INPUT[n] == n
        ]
        forward()
        for hook in hooks:
            hook.remove()
        grams: dict[str, torch.Tensor] = {}

        def gram_all() -> None:
            for name, batches in inputs.items():
                gram = None
                for x in batches:
                    gram = accumulate_gram(gram, x, torch.float32)
                grams[name] = complete_gram(gram)

        factors = {}

        def factor_all() -> None:
            for name, gram in grams.items():
                factors[name] = inverse_hessian(gram, 0.01)

        seconds = {"forward": best_of(args.repeats, forward), "grams": best_of(args.repeats, gram_all)}
        seconds["inverse_factors"] = best_of(args.repeats, factor_all)
        for label, config in (
            ("solves_50pct", PruneConfig(method="sparsegpt", sparsity=0.5)),
            ("solves_2of4", PruneConfig(method="sparsegpt", pattern="2:4")),
        ):
            pattern = config.parsed_pattern()
            seconds[label] = best_of(
                args.repeats,
                lambda p=pattern: [sparsegpt_prune(linears[n].weight, factors[s], p) for n, s in SHARED_INPUT.items()],
            )
    print(json.dumps({"block": args.block, "threads": torch.get_num_threads(), "seconds": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
