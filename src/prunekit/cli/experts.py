"""``prunekit experts``: remove whole experts from every MoE layer (REAP, frequency, STUN, NAEE-style
reconstruction), optionally prune inside the kept experts to an overall budget (STUN), and save a model plain
transformers reloads. Flags override a YAML recipe (``--recipe``), section by section."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from prunekit.cli.common import (
    CALIBRATION_FLAGS,
    EVAL_FLAGS,
    OUTPUT_FLAGS,
    _add_calibration_flags,
    _add_eval_flags,
    _add_model_flags,
    _add_output_flags,
    _add_verbosity_flags,
    apply_flags,
)
from prunekit.core.config import read_yaml_mapping
from prunekit.core.errors import ConfigError
from prunekit.methods import method_names
from prunekit.moe.criteria import criterion_names
from prunekit.moe.job import ExpertRecipe, run_expert_recipe

# flag destination -> (recipe section, field); ``then`` fields apply when --then (or the recipe) names a method
_FLAGS = {
    "dtype": ("model", "dtype"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "remove": ("experts", "remove"),
    "criterion": ("experts", "criterion"),
    "merge": ("experts", "merge"),
    "sample_tokens": ("experts", "sample_tokens"),
    "batch_size": ("experts", "batch_size"),
    "device": ("experts", "device"),
    "then": ("then", "method"),
    "sparsity": ("then", "sparsity"),
    "pattern": ("then", "pattern"),
    **CALIBRATION_FLAGS,
    **EVAL_FLAGS,
    **OUTPUT_FLAGS,
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("experts", help="remove whole experts from a mixture-of-experts LM (and prune inside the rest)")
    _add_verbosity_flags(p, argparse.SUPPRESS)
    _add_model_flags(p)
    p.add_argument("--recipe", help="YAML recipe (sections model, calibration, experts, then, budget, eval, output)")
    p.add_argument(
        "--remove", type=float, default=None, help="fraction of each layer's experts to remove (default 0.25)"
    )
    p.add_argument(
        "--criterion",
        choices=criterion_names(),
        default=None,
        help="reap (default: routing weight x output norm), frequency (routed tokens), stun (clusters of experts with close router rows), "
        "reconstruct (the kept set that best reproduces the layer's output)",
    )
    p.add_argument("--merge", action="store_true", default=None, help="merge removed experts into kept ones")
    _add_calibration_flags(p, nsamples=32, seqlen=512)
    p.add_argument("--sample-tokens", type=int, default=None, help="tokens per layer kept to measure output errors")
    p.add_argument("--batch-size", type=int, default=None, help="calibration windows per forward batch")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--then",
        choices=method_names(),
        default=None,
        help="then prune inside the kept experts with this method (STUN)",
    )
    p.add_argument("--sparsity", type=float, default=None, help="--then's sparsity inside the kept experts")
    p.add_argument("--pattern", default=None, help="--then's pattern: unstructured (default) or N:M")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="fraction of the routed experts' parameters to remove in all; sets --then's sparsity",
    )
    _add_eval_flags(p)
    _add_output_flags(p)
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")


def recipe_from_args(args: argparse.Namespace) -> ExpertRecipe:
    data: dict[str, Any] = read_yaml_mapping(args.recipe) if args.recipe else {}
    if args.model is not None:
        data.setdefault("model", {})["source"] = args.model
    if data.get("then") is not None or args.then is not None:
        apply_flags(data, args, _FLAGS)
    else:  # --sparsity/--pattern without a one-shot step are refused below
        apply_flags(data, args, {k: v for k, v in _FLAGS.items() if v[0] != "then"})
    if args.budget is not None:
        data["budget"] = args.budget
    if data.get("then") is None and (args.sparsity is not None or args.pattern is not None):
        raise ConfigError("--sparsity and --pattern set the one-shot step inside the kept experts: add --then METHOD")
    return ExpertRecipe.from_dict(data)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    recipe = recipe_from_args(args)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    result = run_expert_recipe(recipe, command=shlex.join(["prunekit", *argv]), progress=not args.quiet)
    report = result.report
    print(
        f"experts per layer: {report.experts_before} -> {report.experts_after} ({report.criterion}); routed-expert "
        f"parameters removed: {report.expert_params_removed_fraction:.2%}"
    )
    if report.perplexity_after is not None:
        before = f"{report.perplexity_before.perplexity:.3f} -> " if report.perplexity_before else ""
        print(f"perplexity {before}{report.perplexity_after.perplexity:.3f}")
    if result.output_dir:
        print(f"checkpoint: {result.output_dir}")
    if result.report_dir:
        print(f"report: {result.report_dir}")
    return 0
