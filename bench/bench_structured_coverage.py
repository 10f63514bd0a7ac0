"""Benchmark: which torchvision classification models each tool can structurally prune (issue 5, benchmark 1).

Every model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights) is pruned to a
50% channel ratio with L2 magnitude, the classifier's outputs kept, by prunekit and by Torch-Pruning 1.6.1's
MagnitudePruner, each model in its own process under a memory cap (a blow-up counts as a failure). A model
counts when the tool prunes it, the pruned model runs, and its output shape is unchanged. Parameters and
MACs (torch's FlopCounterMode, MACs = FLOPs / 2) before and after are recorded.

    bash bench/setup_structured.sh                 # venvs: .venv-tv (prunekit + torchvision), .venv-tp (peer)
    .venv-tv/bin/python bench/bench_structured_coverage.py --peer-python .venv-tp/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "structured_coverage.json"

#: Input resolution per model where 224 does not fit the architecture.
INPUT_SIZE = {"inception_v3": 299}


def child(tool: str, name: str, ratio: float) -> dict:
    """Run in the child process: prune one model, return what happened."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    size = INPUT_SIZE.get(name, 224)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)

    def macs(m: torch.nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            m(x)
        return counter.get_total_flops() // 2

    def params(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    with torch.no_grad():
        reference = model(x)
    reference = reference.logits if hasattr(reference, "logits") else reference
    base_params, base_macs = params(model), macs(model)
    start = time.perf_counter()
    if tool == "prunekit":
        from prunekit.structured import prune_structurally

        result = prune_structurally(model, (x,), ratio, criterion="l2")
        pruned = result.model
        extra = {"tied": result.tied, "kept_whole": result.kept_whole}
    else:
        import torch_pruning as tp

        classifier = [  # whatever makes the 1000 class scores: a Linear, or SqueezeNet's final conv
            m
            for m in model.modules()
            if (isinstance(m, torch.nn.Linear) and m.out_features == 1000)
            or (isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000)
        ]
        pruner = tp.pruner.MagnitudePruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=classifier,
        )
        pruner.step()
        pruned = model
        extra = {}
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = pruned(x)
    out = out.logits if hasattr(out, "logits") else out
    if tuple(out.shape) != tuple(reference.shape):
        raise RuntimeError(f"output shape {tuple(out.shape)} != {tuple(reference.shape)}")
    pruned_params, pruned_macs = params(pruned), macs(pruned)
    return {
        "params": base_params,
        "pruned_params": pruned_params,
        "params_ratio": pruned_params / base_params,
        "macs": base_macs,
        "pruned_macs": pruned_macs,
        "macs_ratio": pruned_macs / base_macs,
        "prune_s": round(seconds, 2),
        **extra,
    }


def run_one(python: str, tool: str, name: str, ratio: float, mem_gb: float, timeout: int) -> dict:
    def cap() -> None:
        limit = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [python, str(Path(__file__).resolve()), "--child", tool, name, "--ratio", str(ratio)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=cap, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout} s"}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return {"ok": True, "wall_s": round(wall, 1), **json.loads(lines[-1][7:])}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "wall_s": round(wall, 1), "returncode": proc.returncode, "error": " | ".join(tail)[-600:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "MODEL"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--peer-python", help="python of the Torch-Pruning venv (skip the peer if absent)")
    parser.add_argument("--models", nargs="*", help="a subset of models (default: all)")
    parser.add_argument("--mem-gb", type=float, default=20.0, help="address-space cap per model process")
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child[0], args.child[1], args.ratio)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torchvision

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    tools = [("prunekit", sys.executable)] + ([("torch-pruning", args.peer_python)] if args.peer_python else [])
    results: dict[str, dict[str, dict]] = {tool: {} for tool, _ in tools}
    if args.out.exists() and args.models:
        previous = json.loads(args.out.read_text())
        results.update({k: v for k, v in previous.get("results", {}).items() if k in results})
    for name in names:
        for tool, python in tools:
            result = run_one(python, tool, name, args.ratio, args.mem_gb, args.timeout)
            results[tool][name] = result
            status = "ok" if result["ok"] else "FAIL " + result.get("error", "")[:200]
            extra = f" params {result['params_ratio']:.3f} macs {result['macs_ratio']:.3f}" if result["ok"] else ""
            print(f"{name:28s} {tool:14s} {status}{extra}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {tool: sum(r["ok"] for r in res.values()) for tool, res in results.items()}
        args.out.write_text(json.dumps({"ratio": args.ratio, "summary": summary, "results": results}, indent=1))
    print(json.dumps({tool: f"{sum(r['ok'] for r in res.values())}/{len(res)}" for tool, res in results.items()}))


if __name__ == "__main__":
    main()
