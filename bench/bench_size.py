"""Benchmark: on-disk size of SmolLM2-135M-Instruct checkpoints, dense vs compressed (``--save-format``).

Setting: the bundled SmolLM2-135M-Instruct de-quantized to float32 (``prunekit.load_model(None,
dtype="float32")``). Three checkpoints: dense (unpruned, plain ``save_pretrained``), 50% unstructured saved as
``sparse-bitmask``, and 2:4 saved as ``sparse-24-bitmask``. Pruning is magnitude pruning: the size depends
only on how many weights are zero and on the pattern, not on which weights the method keeps (Wanda or
SparseGPT give the same sizes). The 49152 x 576 embedding (tied to the head) and the norms stay dense.

Sizes are the bytes of the weight files (``checkpoint_size_bytes``); ``expected_bytes`` is the same payload
computed from the formula (4 bytes per kept float32 value + 1 bit per weight + row offsets/shape; dense
tensors as they are) to show where the bytes go; ``compressed_layers_bytes`` / ``compressed_layers_dense_bytes``
is the ratio on the pruned layers alone. Save time covers ``prunekit.io.saving.save_pretrained`` with
the tokenizer (compression included); load time covers ``prunekit.load_model`` (decompression included);
each is the median of ``--repeats`` runs on this machine's CPU, with the page cache warm.

    python bench/bench_size.py            # ~1.5 min here

Writes ``bench/results/size_smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import prunekit
from prunekit.core.measure import versions
from prunekit.io.compressed import SPARSE_24, checkpoint_format, checkpoint_size_bytes, plan_compression
from prunekit.io.saving import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_size")

RUNS = [  # (name, prune config or None for the dense model, save format)
    ("dense", None, "dense"),
    ("unstructured-50", {"sparsity": 0.5}, "sparse-bitmask"),
    ("2:4", {"pattern": "2:4"}, "sparse-24"),
]


def expected_bytes(model: torch.nn.Module, save_format: str) -> dict[str, int]:
    """Tensor payload the format should take: compressed layers by formula, the rest as stored; and what
    the compressed layers alone take, dense and compressed."""
    plan = plan_compression(model, save_format)
    compressed = {f"{name}.weight" for name in plan.modules}
    total, layers_dense, layers_compressed, seen = 0, 0, 0, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights are saved once
            continue
        seen.add(tensor.data_ptr())
        dense = tensor.numel() * tensor.element_size()
        if name not in compressed:
            total += dense
            continue
        rows, cols = tensor.shape
        bits = rows * math.ceil(cols / 8)
        if plan.format == SPARSE_24:
            size = rows * cols // 2 * tensor.element_size() + bits + 2 * 8
        else:
            size = int((tensor != 0).sum()) * tensor.element_size() + bits + rows * 8 + 2 * 8
        total += size
        layers_dense += dense
        layers_compressed += size
    return {"total": total, "layers_dense": layers_dense, "layers_compressed": layers_compressed}


def measure(name: str, prune_args: dict[str, Any] | None, save_format: str, repeats: int, work: Path) -> dict:
    loaded = prunekit.load_model(None, dtype="float32")
    model = loaded.model
    if prune_args is not None:
        config = prunekit.PruneConfig(method="magnitude", **prune_args)
        model = prunekit.prune(model, config, inplace=True, progress=False).model
    saves, loads = [], []
    out = work / name.replace(":", "of")
    for _ in range(repeats):
        started = time.perf_counter()
        save_pretrained(model, loaded.tokenizer, out, overwrite=True, save_format=save_format)
        saves.append(time.perf_counter() - started)
    for _ in range(repeats):
        started = time.perf_counter()
        reloaded = prunekit.load_model(out).model
        loads.append(time.perf_counter() - started)
    state, back = model.state_dict(), reloaded.state_dict()
    exact = state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    plan = plan_compression(model, save_format)
    expected = expected_bytes(model, save_format)
    unique = {t.data_ptr(): t for t in state.values()}.values()
    zeros, weights = sum(int((t == 0).sum()) for t in unique), sum(t.numel() for t in unique)
    result = {
        "name": name,
        "prune": prune_args,
        "save_format": save_format,
        "written_format": checkpoint_format(out),
        "compressed_layers": len(plan.modules),
        "model_sparsity": zeros / max(1, weights),
        "size_bytes": checkpoint_size_bytes(out),
        "expected_bytes": expected["total"],
        "compressed_layers_dense_bytes": expected["layers_dense"],
        "compressed_layers_bytes": expected["layers_compressed"],
        "save_seconds": statistics.median(saves),
        "load_seconds": statistics.median(loads),
        "reload_equal": exact,
    }
    log.info("%s: %s", name, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "size_smollm2.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
        runs = [measure(name, prune_args, fmt, args.repeats, Path(tmp)) for name, prune_args, fmt in RUNS]
    dense = runs[0]["size_bytes"]
    for run in runs:
        run["ratio_to_dense"] = run["size_bytes"] / dense
    result = {
        "model": "bundled SmolLM2-135M-Instruct (float32)",
        "method": "magnitude (size depends only on the pattern)",
        "repeats": args.repeats,
        "runs": runs,
        "versions": versions(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(
            f"{run['name']:>16} {run['written_format']:>18} {run['size_bytes'] / 2**20:8.1f} MiB "
            f"({run['ratio_to_dense']:.3f} of dense)  save {run['save_seconds']:.2f} s  load {run['load_seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
