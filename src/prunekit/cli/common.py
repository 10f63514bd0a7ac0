"""Flags that several subcommands share."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

#: flag destination -> (recipe section, field), for the flags below
CALIBRATION_FLAGS = {
    "calib": ("calibration", "path"),
    "nsamples": ("calibration", "nsamples"),
    "seqlen": ("calibration", "seqlen"),
    "seed": ("calibration", "seed"),
}
EVAL_FLAGS = {"ppl": ("eval", "ppl"), "ppl_seqlen": ("eval", "seqlen"), "ppl_windows": ("eval", "max_windows")}
OUTPUT_FLAGS = {
    "out": ("output", "dir"),
    "overwrite": ("output", "overwrite"),
    "report": ("output", "report_dir"),
    "push_to_hub": ("output", "push_to_hub"),
}


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model directory, .gguf file or hub id; omit for the bundled SmolLM2-135M-Instruct",
    )
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--trust-remote-code", action="store_true", default=None, help="run model code from the hub")


def _add_verbosity_flags(parser: argparse.ArgumentParser, default: object = False) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars, warnings only")


def _add_calibration_flags(parser: argparse.ArgumentParser, nsamples: int, seqlen: int) -> None:
    parser.add_argument("--calib", default=None, help="calibration text file (e.g. a validation split)")
    parser.add_argument("--nsamples", type=int, default=None, help=f"calibration windows (default {nsamples})")
    parser.add_argument("--seqlen", type=int, default=None, help=f"tokens per calibration window (default {seqlen})")
    parser.add_argument("--seed", type=int, default=None, help="seed of the calibration draw (default 0)")


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ppl", default=None, help="text file to measure perplexity on, before and after")
    parser.add_argument("--ppl-seqlen", type=int, default=None, help="perplexity window length (default 2048)")
    parser.add_argument("--ppl-windows", type=int, default=None, help="use only the first N perplexity windows")


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output directory for the pruned checkpoint")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out")
    parser.add_argument("--report", default=None, help="report directory (default: <out>/prunekit-report)")
    parser.add_argument(
        "--push-to-hub", default=None, metavar="ORG/NAME", help="upload --out to this Hub repository once written"
    )


def apply_flags(data: dict[str, Any], args: argparse.Namespace, flags: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """Set ``data[section][key]`` from every flag of ``flags`` given on the command line (not ``None``)."""
    for flag, (section, key) in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            if data.get(section) is None:
                data[section] = {}
            data[section][key] = value
    return data
