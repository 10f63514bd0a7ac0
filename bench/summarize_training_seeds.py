"""Pool ``bench_training.py`` results of several seeds: accuracy per experiment and seed, the mean and sample
standard deviation over seeds, and each experiment's gap to the dense run of the same seed (mean and
standard deviation of the per-seed gaps: the seeds pair the runs, as they share the initialisation and the
data order).

    python3 bench/summarize_training_seeds.py bench/results/training_cifar10_e8.json \\
        bench/results/training_cifar10_e8_erk.json bench/results/training_cifar10_e8_seed1.json ...

Files of the same seed are merged (the seed is read from each file's ``budget``); only files of one training
length are accepted. Prints a Markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(paths: list[Path]) -> tuple[float, dict[int, dict[str, float]]]:
    """``(epochs, {seed: {experiment: accuracy %}})`` from result files of one training length."""
    by_seed: dict[int, dict[str, float]] = {}
    lengths = set()
    for path in paths:
        report = json.loads(path.read_text())
        budget = report["budget"]
        lengths.add(budget["epochs_per_run"])
        runs = by_seed.setdefault(int(budget["seed"]), {})
        for name, entry in report["experiments"].items():
            if entry.get("accuracy") is not None:
                runs[name] = 100.0 * entry["accuracy"]
    if len(lengths) != 1:
        raise SystemExit(f"the files hold runs of different lengths ({sorted(lengths)} epochs): pool one length")
    return lengths.pop(), by_seed


def spread(values: list[float]) -> str:
    """``mean ± sd (n)``; the sample standard deviation needs two values."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (1 seed)"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f} ({len(values)} seeds)"


def table(by_seed: dict[int, dict[str, float]]) -> list[str]:
    seeds = sorted(by_seed)
    names = sorted({name for runs in by_seed.values() for name in runs}, key=lambda n: (n != "dense", n))
    lines = [
        "| experiment | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | gap to dense, mean ± sd |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for name in names:
        cells = [f"{by_seed[s][name]:.2f}" if name in by_seed[s] else "-" for s in seeds]
        values = [by_seed[s][name] for s in seeds if name in by_seed[s]]
        gaps = [by_seed[s]["dense"] - by_seed[s][name] for s in seeds if name in by_seed[s] and "dense" in by_seed[s]]
        gap = "-" if name == "dense" else spread(gaps)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {spread(values)} | {gap} |")
    return lines


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    epochs, by_seed = load([Path(p) for p in sys.argv[1:]])
    print(f"{epochs:g} epochs per run; test accuracy %")
    print("\n".join(table(by_seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
