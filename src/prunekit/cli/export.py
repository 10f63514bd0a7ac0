"""``prunekit export``: write a model (dense or pruned by prunekit) as a GGUF file for llama.cpp, and check it
there."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prunekit.cli.common import _add_verbosity_flags
from prunekit.core.errors import ConfigError
from prunekit.io.gguf.export import OUTTYPES, export_gguf
from prunekit.io.loading import BUNDLED_NAMES, bundled_gguf_path, load_model


def add_parser(sub: Any) -> None:
    e = sub.add_parser("export", help="write a model as GGUF for llama.cpp")
    _add_verbosity_flags(e, argparse.SUPPRESS)
    e.add_argument("model", help="a directory prunekit wrote, any model prunekit loads, or smollm2")
    e.add_argument("--gguf", required=True, help="output file (OUT.gguf)")
    e.add_argument("--outtype", choices=OUTTYPES, default="f16", help="type of the 2-D weights (default f16)")
    e.add_argument(
        "--tokenizer-gguf",
        default=None,
        help="carry the tokenizer over from this GGUF file (smollm2: the bundled one; the default for smollm2 "
        "itself); otherwise it is derived from the model's tokenizer.json",
    )
    e.add_argument("--tokenizer-pre", default=None, help="llama.cpp's pre-tokenizer name, if not recognised")
    e.add_argument("--name", default=None, help="general.name written in the file")
    e.add_argument(
        "--check",
        action="store_true",
        help="load the file in llama.cpp (needs prunekit[llamacpp]) and compare its logits with PyTorch's",
    )
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.add_argument("--json", action="store_true", help="print the result as JSON")


def _tokenizer_gguf(args: argparse.Namespace) -> str | None:
    if args.tokenizer_gguf is not None:
        return str(bundled_gguf_path()) if args.tokenizer_gguf.lower() in BUNDLED_NAMES else args.tokenizer_gguf
    if args.tokenizer_pre is None and args.model.lower() in BUNDLED_NAMES:
        return str(bundled_gguf_path())
    return None


def run(args: argparse.Namespace) -> int:
    from prunekit.eval.gguf_check import compare_with_llamacpp

    if args.check:  # fail before the slow part when llama.cpp is missing
        from prunekit.eval.speed.llamacpp import INSTALL, llama_cpp_available

        if not llama_cpp_available():
            raise ConfigError(f"--check needs llama-cpp-python: {INSTALL}")
    loaded = load_model(args.model, dtype="float32")
    result = export_gguf(
        loaded.model,
        loaded.tokenizer,
        args.gguf,
        outtype=args.outtype,
        tokenizer_pre=args.tokenizer_pre,
        tokenizer_gguf=_tokenizer_gguf(args),
        name=args.name,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    data: dict[str, Any] = {"model": loaded.source, **result.to_dict()}
    if args.check:
        data["check"] = compare_with_llamacpp(loaded.model, args.gguf).to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    widths = {(layer["heads"], layer["kv_heads"], layer["channels"]) for layer in result.layers}
    dropped = sum(layer["heads"] == 0 for layer in result.layers)
    print(
        f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, {result.outtype}): llama.cpp architecture "
        f"{result.arch}, {len(result.layers)} layers, {len(widths)} distinct widths, {dropped} without attention; "
        f"{result.parameters:,} parameters; tokenizer from {result.tokenizer}"
    )
    for note in result.notes:
        print(f"note: {note}")
    if args.check:
        check = data["check"]
        print(
            f"llama.cpp check on {check['tokens']} tokens: max |logit difference| {check['max_abs_diff']:.3g} "
            f"({check['relative']:.2e} of the largest logit), same argmax at {check['argmax_agreement']:.1%} of positions"
        )
    return 0
