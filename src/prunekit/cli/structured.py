"""``prunekit structured``: structural pruning from flags or a YAML recipe (``--recipe``; flags given on the
command line override it) into a :class:`prunekit.structured.config.StructuredConfig`."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from prunekit.cli.common import _add_model_flags, _add_verbosity_flags
from prunekit.core.config import read_yaml_mapping
from prunekit.structured.config import StructuredConfig
from prunekit.structured.job import run_structured_job


def add_parser(sub: Any) -> None:
    s = sub.add_parser("structured", help="remove channels, heads or layers (structural pruning) and save")
    _add_verbosity_flags(s, argparse.SUPPRESS)
    _add_model_flags(s)
    s.add_argument("--torchvision", default=None, help="prune this torchvision classifier instead (e.g. resnet50)")
    s.add_argument("--weights", default=None, help="torchvision weights name (downloaded by torchvision)")
    s.add_argument("--input-size", type=int, default=None, help="torchvision example image size (default 224)")
    s.add_argument("--ratio", type=float, default=None, help="fraction to remove (default 0.25)")
    s.add_argument(
        "--target", choices=["params", "macs", "channels", "latency"], default=None, help="what --ratio counts"
    )
    s.add_argument(
        "--policy",
        choices=["uniform", "global", "latency"],
        default=None,
        help="--torchvision: where to cut: the same ratio per layer, one global ranking, or latency-aware (HALP: "
        "least importance per second saved, from operation times measured on this machine)",
    )
    s.add_argument(
        "--mode",
        choices=["width", "depth", "search"],
        default=None,
        help="LMs: the same channels/heads in every layer, whole layers, or per-layer widths searched "
        "(Týr-the-Pruner: attention drops and layer removal among the choices; slower, better)",
    )
    s.add_argument("--search-iterations", type=int, default=None, help="--mode search: coarse-to-fine iterations (3)")
    s.add_argument("--search-generations", type=int, default=None, help="--mode search: generations per iteration (12)")
    s.add_argument("--search-population", type=int, default=None, help="--mode search: genomes kept (16)")
    s.add_argument(
        "--search-windows", type=int, default=None, help="--mode search: calibration windows held apart to score on (4)"
    )
    s.add_argument(
        "--channel-multiple",
        type=int,
        default=None,
        metavar="M",
        help="--mode search: MLP widths in multiples of M (32 or 64 for llama.cpp's and GPUs' fast kernels; "
        "default 1: the parameter target met exactly)",
    )
    s.add_argument(
        "--decode-speedup",
        type=float,
        default=None,
        metavar="X",
        help="--mode search: also decode at batch 1 at least X times faster than the dense model (by a latency "
        "model measured on this machine: attention drops and removed layers save the fixed per-layer costs)",
    )
    s.add_argument(
        "--criterion",
        default=None,
        help="importance: l1, l2, bn_scale, taylor, activation, obs (LM default: second-order cost)",
    )
    s.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of this (e.g. 8)")
    s.add_argument(
        "--blocks", type=int, default=None, help="--torchvision: first remove this many residual blocks whole"
    )
    s.add_argument(
        "--keep-streams",
        action="store_true",
        default=None,
        help="--torchvision: keep the residual streams whole, prune only the width inside blocks (MobileNets)",
    )
    s.add_argument(
        "--prune-hidden", action="store_true", default=None, help="LMs, width: also shrink the hidden size (costlier)"
    )
    s.add_argument(
        "--drop-attention",
        type=int,
        default=None,
        metavar="K",
        help="LMs, width: first drop the attention of the K layers that change their input least (He et al. "
        "2024), then prune the width to the rest of --ratio; faster decoding per parameter removed",
    )
    s.add_argument(
        "--no-reconstruct",
        action="store_true",
        default=None,
        help="LMs, width: slice only, no least-squares refit of the consumers",
    )
    s.add_argument("--calib", default=None, help="LMs: calibration text file")
    s.add_argument("--nsamples", type=int, default=None, help="LMs: calibration windows (default 32)")
    s.add_argument("--seqlen", type=int, default=None, help="LMs: calibration window length (default 512)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--ppl", default=None, help="LMs: text file to report perplexity before and after on")
    s.add_argument("--ppl-windows", type=int, default=None, help="LMs: perplexity windows (default 40)")
    s.add_argument("--ppl-seqlen", type=int, default=None, help="LMs: perplexity window length (default 2048)")
    s.add_argument(
        "--onnx",
        action="store_true",
        default=None,
        help="torchvision: also export model.onnx (checked with onnxruntime)",
    )
    s.add_argument("--out", default=None, help="new or empty output directory (or out: in the recipe)")
    s.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out")
    s.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="LMs: upload --out to this Hub repository")
    s.add_argument("--device", default=None, help="LMs: auto (default), cpu, cuda")
    s.add_argument("--recipe", default=None, help="YAML recipe (the keys of StructuredConfig); flags override it")
    s.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")


#: Flags whose config key differs from the flag's name, and how the value maps.
_RENAMED = {"no_reconstruct": ("reconstruct", lambda given: not given)}
#: Flags that set a key of a section: ``--search-generations`` is ``search: {generations: ...}``.
_SECTIONS = {
    "search_iterations": ("search", "iterations"),
    "search_generations": ("search", "generations"),
    "search_population": ("search", "population"),
    "search_windows": ("search", "search_windows"),
    "decode_speedup": ("search", "decode_speedup"),
    "channel_multiple": ("search", "channel_multiple"),
}
_NOT_CONFIG = {"command", "verbose", "quiet", "recipe", "print_recipe"}


def config_from_args(args: argparse.Namespace) -> StructuredConfig:
    """Start from ``--recipe`` (or the defaults) and apply every flag that was given."""
    data: dict[str, Any] = {}
    if args.recipe:
        data = read_yaml_mapping(args.recipe)
        StructuredConfig.from_dict(data)  # the file alone must be valid
    for flag, value in vars(args).items():
        if flag in _NOT_CONFIG or value is None:
            continue
        if flag in _SECTIONS:
            section, key = _SECTIONS[flag]
            data[section] = {**data.get(section, {}), key: value}
            continue
        key, convert = _RENAMED.get(flag, (flag, lambda given: given))
        data[key] = convert(value)
    return StructuredConfig.from_dict(data)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    job = config_from_args(args)
    if args.print_recipe:
        print(job.to_yaml(), end="")
        return 0
    report = run_structured_job(job, command=None if argv is None else shlex.join(["prunekit", *argv]))
    s = report["summary"]
    print(f"parameters {s['params_before']:,} -> {s['params_after']:,} ({s['params_after'] / s['params_before']:.3f})")
    if s.get("macs_before"):
        print(f"MACs {s['macs_before']:,} -> {s['macs_after']:,} ({s['macs_after'] / s['macs_before']:.3f})")
    print(f"latency x{s['speedup']:.2f} faster; bytes on disk {s['bytes_after'] / s['bytes_before']:.3f} of before")
    if "perplexity" in report:
        print(f"perplexity {report['perplexity']['before']:.3f} -> {report['perplexity']['after']:.3f}")
    if report.get("removed_layers"):
        print(f"removed layers: {report['removed_layers']}")
    print(f"saved to {job.out} (report: {job.out}/prunekit-report)")
    return 0
