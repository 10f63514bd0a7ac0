"""``prunekit push``: upload a model directory prunekit wrote (weights, tokenizer, ``README.md`` model card,
report) to a Hugging Face Hub model repository (:func:`prunekit.io.hub.push_to_hub`)."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.common import _add_verbosity_flags
from prunekit.io.hub import push_to_hub


def add_parser(sub: Any) -> None:
    p = sub.add_parser("push", help="upload a pruned model directory (with its model card) to the Hugging Face Hub")
    _add_verbosity_flags(p, argparse.SUPPRESS)
    p.add_argument("directory", help="a model directory prunekit wrote (the --out of prune, structured...)")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one is kept)")
    p.add_argument(
        "--token",
        default=None,
        help="a Hub token with write access (default: HF_TOKEN or the token of `hf auth login`)",
    )
    p.add_argument("--revision", default=None, help="push to this branch (created if missing; default: main)")
    p.add_argument("--message", default=None, help="the commit message")


def run(args: argparse.Namespace) -> int:
    url = push_to_hub(
        args.directory,
        args.repo,
        private=args.private,
        token=args.token,
        revision=args.revision,
        commit_message=args.message,
    )
    print(f"pushed {args.directory} to {url}" + (f" (branch {args.revision})" if args.revision else ""))
    return 0
