"""The ``prunekit`` command: ``prune``, ``eval``, ``bench-speed``, ``structured``, ``experts``, ``distill``,
``adapt``, ``export``, ``push``; one module per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from transformers.utils import logging as hf_logging

from prunekit.cli import adapt, distill, evaluate, experts, export, prune, push, structured
from prunekit.cli.common import _add_verbosity_flags
from prunekit.core.errors import PrunekitError

log = logging.getLogger("prunekit")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (built at call time, so methods registered since import are offered)."""
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune PyTorch models and measure the result.")
    _add_verbosity_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    prune.add_parser(sub)
    evaluate.add_parsers(sub)
    structured.add_parser(sub)
    experts.add_parser(sub)
    distill.add_parser(sub)
    adapt.add_parser(sub)
    export.add_parser(sub)
    push.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunekit`` command; returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        if args.command == "prune":
            return prune.run(args, argv)
        if args.command == "experts":
            return experts.run(args, argv)
        if args.command == "distill":
            return distill.run(args, argv)
        if args.command == "adapt":
            return adapt.run(args, argv)
        if args.command == "structured":
            return structured.run(args, argv)
        commands = {
            "eval": evaluate.run_eval,
            "bench-speed": evaluate.run_bench_speed,
            "export": export.run,
            "push": push.run,
        }
        return commands[args.command](args)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
