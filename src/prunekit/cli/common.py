"""Flags that several subcommands share."""

from __future__ import annotations

import argparse


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
