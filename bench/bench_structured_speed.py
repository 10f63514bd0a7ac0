"""Benchmark: does removing half the MACs make the model faster? (issue 5, benchmark 2)

ResNet-50, MobileNetV2 and ViT-B/16 (random weights) pruned to about 50% of their MACs by prunekit
(``target="macs"``, L2 magnitude) and by Torch-Pruning 1.6.1's MagnitudePruner (its channel ratio bisected to
the same MAC reduction; it has no MAC target), each tool in its own process and venv (same torch and
torchvision), with channel counts rounded to multiples of each ``--round-to`` value (both tools alike). With
``--blocks K`` a third entry, ``prunekit-depth``, first removes the K residual blocks of lowest Block Influence
whole, then prunes the width to the same MAC target (``prune_structurally(..., blocks=K)``). With
``--keep-streams``, ``prunekit-inner`` (and ``prunekit-inner-depth`` with ``--blocks``) keep the residual
streams whole and prune only the width inside the blocks (``keep_streams=True``). With ``--latency-aware``
every prunekit entry is run again with ``policy="latency"`` (``prunekit-latency``, ``prunekit-inner-latency-depth``...):
HALP's allocation, from a latency table measured in the child process before pruning, at batch 1, with the
timed models' layout, thread count and batch-norm folding.

CPU latency at batch 1 and 32, threads fixed, dense and pruned in the same process, both in ``--memory-format``
(channels_last by default: PyTorch's fast CPU layout for convolutions), with batch norms folded into their
convolutions under ``--fold-bn`` (:func:`prunekit.structured.graph.fold_bn.fold_batch_norms`, as any deployment
runtime does), and compiled under ``--compile`` (``torch.compile`` with inductor's freezing on, which folds the
weights into constants and pre-packs them for oneDNN: PyTorch's recommended CPU inference path); whatever is
chosen applies to the dense model and the pruned one, for every tool alike. ``--runtime onnxruntime`` times
both models in onnxruntime instead, after an ONNX export at each batch size (its own graph optimisations fold
the batch norms and fuse the activations; ``--fold-bn``, ``--memory-format`` and ``--compile`` do not apply).
Timing is ``prunekit.structured.report.compare_latency``: adjacent dense/pruned pairs (15 at batch 1, 7 at
batch 32), the speed-up being the median of the per-pair ratios, so a machine whose speed drifts favours
neither model. The figure of merit is ``speed-up / MACs reduction`` =
``(t_dense / t_pruned) / (MACs_dense / MACs_pruned)``: 1.0 means every MAC removed is time saved.

    bash bench/setup_structured.sh
    .venv-tv/bin/python bench/bench_structured_speed.py --peer-python .venv-tp/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "structured_speed.json"
MODELS = ("resnet50", "mobilenet_v2", "vit_b_16")


def child(
    tool: str,
    name: str,
    macs_ratio: float,
    batches: list[int],
    threads: int,
    min_time: float,
    round_to: int,
    memory_format: str,
    fold_bn: bool = False,
    blocks: int = 0,
    compiled: bool = False,
    runtime: str = "torch",
) -> dict:
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    from prunekit.structured.report import compare_latency  # on PYTHONPATH in the peer's venv

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)

    def macs(m: torch.nn.Module) -> int:
        # with autograd on: under no_grad nn.MultiheadAttention takes a fused fast path whose projections
        # FlopCounterMode does not count
        counter = FlopCounterMode(display=False)
        with counter, torch.enable_grad():
            m(x)
        return counter.get_total_flops() // 2

    def params(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    dense_macs = macs(model)
    if tool.startswith("prunekit"):
        from prunekit.structured import prune_structurally
        from prunekit.structured.latency import BATCH_NORM_OPS, LatencyTable

        depth = blocks if tool.endswith("-depth") else 0
        inner = "-inner" in tool
        policy = "latency" if "-latency" in tool else "uniform"
        table = LatencyTable(  # the model as it will be timed: its layout, its thread count, batch norms folded
            threads=threads,
            memory_format=torch.channels_last if memory_format == "channels_last" else torch.contiguous_format,
            free_ops=BATCH_NORM_OPS if fold_bn else (),
        )
        result = prune_structurally(
            model,
            (x,),
            macs_ratio,
            target="macs",
            round_to=round_to,
            blocks=depth,
            keep_streams=inner,
            policy=policy,
            latency=table,
        )
        pruned = result.model
        setting = {
            "target": "macs",
            "ratio": macs_ratio,
            "round_to": round_to,
            "blocks": result.removed_blocks,
            "keep_streams": inner,
            "policy": policy,
            "latency_table_entries": len(table.entries),
        }
    else:
        import copy

        import torch_pruning as tp

        def tp_prune(ratio: float) -> torch.nn.Module:
            m = copy.deepcopy(model)
            keep = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.out_features == 1000]
            heads = {}
            for mod in m.modules():
                if isinstance(mod, torch.nn.MultiheadAttention):
                    heads[mod] = mod.num_heads
            pruner = tp.pruner.MagnitudePruner(
                m,
                x,
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=ratio,
                ignored_layers=keep,
                round_to=round_to,
                num_heads=heads,
                prune_head_dims=True,
                prune_num_heads=False,
            )
            pruner.step()
            for mod in m.modules():  # Torch-Pruning's own recipe for torchvision ViT
                if isinstance(mod, torch.nn.MultiheadAttention):
                    mod.head_dim = mod.embed_dim // mod.num_heads
            if hasattr(m, "hidden_dim") and hasattr(m, "conv_proj"):
                m.hidden_dim = m.conv_proj.out_channels
            return m

        low, high, best = 0.0, 0.9, None
        for _ in range(7):
            middle = (low + high) / 2
            candidate = tp_prune(middle)
            if macs(candidate) <= dense_macs * (1 - macs_ratio):
                high, best = middle, candidate
            else:
                low = middle
        pruned = best if best is not None else tp_prune(high)
        setting = {"pruning_ratio": high, "round_to": round_to}
    pruned_macs = macs(pruned)
    pruned.eval()
    sizes = {  # as pruned, before any deployment step (folding batch norms removes their parameters)
        "setting": setting,
        "macs": dense_macs,
        "pruned_macs": pruned_macs,
        "params": params(model),
        "pruned_params": params(pruned),
    }
    if runtime == "onnxruntime":
        return {**sizes, **_onnxruntime_rows(model, pruned, batches, threads, min_time, dense_macs / pruned_macs)}
    if fold_bn:  # the same inference preparation for both models (and both tools)
        from prunekit.structured.graph.fold_bn import fold_batch_norms

        model, pruned = fold_batch_norms(model), fold_batch_norms(pruned)
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model, pruned = model.to(memory_format=layout), pruned.to(memory_format=layout)
    if compiled:  # the same deployment path for both models (and both tools)
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        model, pruned = torch.compile(model, dynamic=False), torch.compile(pruned, dynamic=False)
    rows = []
    for batch in batches:
        xb = torch.randn(batch, 3, 224, 224).contiguous(memory_format=layout)
        timing = compare_latency(
            model, pruned, (xb,), min_run_time=min_time, rounds=7 if batch > 1 else 15, threads=threads
        )
        rows.append(_timing_row(batch, timing, dense_macs / pruned_macs))
    return {**sizes, "rows": rows}


def _timing_row(batch: int, timing: dict, reduction: float) -> dict:
    return {
        "batch": batch,
        "dense_s": timing["latency_before_s"],
        "pruned_s": timing["latency_after_s"],
        "speedup": timing["speedup"],
        "macs_reduction": reduction,
        "speedup_over_macs_reduction": timing["speedup"] / reduction,
        "rounds": timing["rounds"],
        "calls_per_round": timing["calls_per_round"],
    }


def _onnxruntime_rows(model, pruned, batches: list[int], threads: int, min_time: float, reduction: float) -> dict:
    """Both models exported to ONNX at each batch size (static shapes) and timed in onnxruntime (its graph
    optimisations on: batch norms folded, activations fused), adjacent pairs as for PyTorch. The two sessions
    share one process-wide pool of ``threads`` threads: with a pool each, the idle session's threads spin on
    the cores the timed one needs (on this 2-core machine that cost the pruned model, timed in shorter blocks,
    up to a fifth of its speed-up). Each session's outputs are checked against PyTorch's first."""
    import tempfile

    import onnxruntime
    import onnxruntime.capi._pybind_state as ort_state
    import torch

    from prunekit.io.onnx import OnnxRuntimeModule, export_onnx
    from prunekit.structured.report import compare_latency

    ort_state.set_global_thread_pool_sizes(threads, 1)  # before the first session of this process
    options = onnxruntime.SessionOptions()
    options.use_per_session_threads = False
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for batch in batches:
            xb = torch.randn(batch, 3, 224, 224)
            sessions = []
            for label, m in (("dense", model), ("pruned", pruned)):
                session = OnnxRuntimeModule(
                    export_onnx(m, (xb,), f"{tmp}/{label}{batch}.onnx", check=False), options=options
                )
                torch.testing.assert_close(session(xb), m(xb), atol=1e-3, rtol=1e-3)
                sessions.append(session)
            timing = compare_latency(*sessions, (xb,), min_run_time=min_time, rounds=7 if batch > 1 else 15)
            rows.append(_timing_row(batch, timing, reduction))
    return {"rows": rows}


def _with_latency(tool: str) -> str:
    """``prunekit-inner-depth`` -> ``prunekit-inner-latency-depth``: the same entry, latency-aware."""
    stem, depth, _ = tool.partition("-depth")
    return f"{stem}-latency{depth}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "MODEL"))
    parser.add_argument("--peer-python")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--macs-ratio", type=float, default=0.5)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per model and batch size")
    parser.add_argument("--round-to", type=int, nargs="*", default=[8, 32], help="channel multiples, both tools")
    parser.add_argument(
        "--memory-format", choices=["channels_last", "contiguous"], default="channels_last", help="dense and pruned"
    )
    parser.add_argument(
        "--fold-bn", action="store_true", help="fold batch norms into their convs, dense and pruned alike"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile with freezing, dense and pruned alike (after --fold-bn)"
    )
    parser.add_argument(
        "--blocks", type=int, default=0, help="also run prunekit-depth: this many residual blocks removed, then width"
    )
    parser.add_argument(
        "--keep-streams", action="store_true", help="also run prunekit-inner: residual streams kept, inner width pruned"
    )
    parser.add_argument(
        "--latency-aware",
        action="store_true",
        help="also run every prunekit entry with policy='latency' (HALP; its latency table measured here first)",
    )
    parser.add_argument(
        "--runtime",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="time in PyTorch (eager, or --compile) or in onnxruntime after an ONNX export of both models",
    )
    parser.add_argument("--tools", nargs="*", help="run only these tools (prunekit, prunekit-depth, torch-pruning...)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        tool, name, round_to = args.child[0], args.child[1], args.round_to[0]
        out = child(
            tool,
            name,
            args.macs_ratio,
            args.batches,
            args.threads,
            args.min_time,
            round_to,
            args.memory_format,
            args.fold_bn,
            args.blocks,
            args.compile,
            args.runtime,
        )
        print("RESULT " + json.dumps(out), flush=True)
        return
    tools = [("prunekit", sys.executable)]
    tools += [("prunekit-depth", sys.executable)] if args.blocks else []
    tools += [("prunekit-inner", sys.executable)] if args.keep_streams else []
    tools += [("prunekit-inner-depth", sys.executable)] if args.keep_streams and args.blocks else []
    if args.latency_aware:  # each prunekit entry again, with HALP's latency-aware allocation
        tools += [(_with_latency(t), p) for t, p in tools]
    tools += [("torch-pruning", args.peer_python)] if args.peer_python else []
    tools = [t for t in tools if not args.tools or t[0] in args.tools]
    results: dict[str, dict] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # both tools are timed by prunekit's compare_latency
    for name in args.models:
        for round_to in args.round_to:
            for tool, python in tools:
                cmd = [
                    python,
                    str(Path(__file__).resolve()),
                    "--child",
                    tool,
                    name,
                    *("--macs-ratio", str(args.macs_ratio), "--threads", str(args.threads)),
                    *("--min-time", str(args.min_time), "--round-to", str(round_to)),
                    *("--memory-format", args.memory_format, "--batches", *map(str, args.batches)),
                    *(["--fold-bn"] if args.fold_bn else []),
                    *(["--compile"] if args.compile else []),
                    *("--blocks", str(args.blocks), "--runtime", args.runtime),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not lines:
                    result = {"ok": False, "error": " | ".join(proc.stderr.strip().splitlines()[-3:])[-600:]}
                    print(f"{name:14s} {tool:14s} FAIL {result['error'][:300]}", flush=True)
                else:
                    result = {"ok": True, **json.loads(lines[-1][7:])}
                    for row in result["rows"]:
                        print(
                            f"{name:14s} {tool:14s} round_to {round_to:2d} batch {row['batch']:3d} "
                            f"MACs /{row['macs_reduction']:.2f} speed-up x{row['speedup']:.2f} "
                            f"ratio {row['speedup_over_macs_reduction']:.2f}",
                            flush=True,
                        )
                results.setdefault(name, {}).setdefault(f"round_to={round_to}", {})[tool] = result
                args.out.parent.mkdir(parents=True, exist_ok=True)
                summary = {
                    "threads": args.threads,
                    "memory_format": args.memory_format,
                    "fold_bn": args.fold_bn,
                    "compile": args.compile,
                    "runtime": args.runtime,
                    "blocks": args.blocks,
                    "keep_streams": args.keep_streams,
                    "results": results,
                }
                args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
