"""``prunekit prune``: one-shot pruning of a causal LM. Every flag maps onto one field of
:class:`prunekit.oneshot.config.Recipe`; a YAML recipe (``--recipe``) gives the starting values and flags given on
the command line override them. The registered methods' own options become flags by themselves."""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

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
from prunekit.core.distributed import rank_and_world
from prunekit.io.compressed import SAVE_FORMATS
from prunekit.methods import method_classes, method_names
from prunekit.oneshot.config import Recipe
from prunekit.oneshot.job import run_recipe

log = logging.getLogger(__name__)

# flag destination -> (recipe section, field)
_PRUNE_FLAGS = {
    "method": ("prune", "method"),
    "sparsity": ("prune", "sparsity"),
    "pattern": ("prune", "pattern"),
    "scope": ("prune", "scope"),
    "include": ("prune", "include"),
    "exclude": ("prune", "exclude"),
    "batch_size": ("prune", "batch_size"),
    "device": ("prune", "device"),
    "distributed": ("prune", "distributed"),
    "sample_tokens": ("prune", "sample_tokens"),
    "offload_activations": ("prune", "offload_activations"),
    "propagation": ("prune", "propagation"),
    "refit_steps": ("prune", "refit_steps"),
    "reconstruct": ("prune", "reconstruct"),
    "reconstruct_steps": ("prune", "reconstruct_steps"),
    "reconstruct_lr": ("prune", "reconstruct_lr"),
    "layer_budget": ("prune", "layer_budget"),
    "owl_outlier_multiple": ("prune", "owl_outlier_multiple"),
    "owl_max_deviation": ("prune", "owl_max_deviation"),
    "expert_min_tokens": ("prune", "expert_min_tokens"),
    "underused_experts": ("prune", "underused_experts"),
    "routing_weighted": ("prune", "routing_weighted"),
    "dtype": ("model", "dtype"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "lazy": ("model", "lazy"),
    "calib_dataset": ("calibration", "dataset"),
    "save_format": ("output", "save_format"),
    **CALIBRATION_FLAGS,
    **EVAL_FLAGS,
    **OUTPUT_FLAGS,
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="one-shot prune a causal LM and save it")
    _add_verbosity_flags(p, argparse.SUPPRESS)  # accepted after the subcommand too
    _add_model_flags(p)
    p.add_argument("--recipe", help="YAML recipe; flags override its values")
    p.add_argument(
        "--method",
        choices=method_names(),
        default=None,
        help="default: wanda; " + "; ".join(f"{m.name}: {m.summary}" for m in method_classes()),
    )
    p.add_argument("--sparsity", type=float, default=None, help="fraction removed, in [0, 1); default 0.5")
    p.add_argument("--pattern", default=None, help="'unstructured' (default) or N:M such as 2:4")
    p.add_argument("--scope", choices=["row", "layer"], default=None, help="unstructured comparison group")
    p.add_argument("--include", action="append", default=None, help="regex of layer names to prune (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="regex of layer names to skip (repeatable)")
    _add_calibration_flags(p, nsamples=128, seqlen=2048)
    p.add_argument("--calib-dataset", default=None, help="Hugging Face dataset name instead of --calib")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward batch (default 1; all batches are in flight together, so larger batches only add transient memory)",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--distributed",
        action="store_true",
        default=None,
        help="one rank of a torchrun job (torchrun --nproc-per-node N -m prunekit prune ... --distributed): "
        "calibration and layer solves shared by the ranks, rank 0 writes",
    )
    p.add_argument("--sample-tokens", type=int, default=None, help="tokens per layer for the error report")
    p.add_argument("--offload-activations", action="store_true", default=None, help="keep activations on CPU")
    p.add_argument(
        "--propagation",
        choices=["auto", "sequential", "block", "dense"],
        default=None,
        help="inputs behind the statistics: sequential (1 pass), block (2 passes), dense (1 pass); auto (default): "
        "dense for unstructured Wanda, sequential otherwise",
    )
    p.add_argument(
        "--lazy",
        action="store_true",
        default=None,
        help="models larger than memory: read, prune and write one block at a time (needs --out, no --ppl)",
    )
    _add_method_option_flags(p)
    p.add_argument(
        "--refit-steps",
        type=int,
        default=None,
        help="conjugate-gradient steps refitting the kept weights to the dense output after masking (default 4 for "
        "sparsegpt, 0 otherwise; 0 = the paper's SparseGPT; any method with > 0 needs --calib)",
    )
    p.add_argument(
        "--reconstruct",
        choices=["none", "block"],
        default=None,
        help="block: after each block's masks, tune its kept weights (Adam) to the dense block's outputs on the "
        "calibration inputs; the mask is held exactly and the block's error never rises (default none)",
    )
    p.add_argument("--reconstruct-steps", type=int, default=None, help="block reconstruction: Adam steps (100)")
    p.add_argument("--reconstruct-lr", type=float, default=None, help="block reconstruction: learning rate (1e-4)")
    budget = p.add_argument_group("per-block sparsity")
    budget.add_argument(
        "--layer-budget",
        choices=["uniform", "owl"],
        default=None,
        help="uniform (default) or owl: more weights kept in blocks with more outlier scores (Yin et al. 2024); "
        "the mean sparsity stays exactly --sparsity",
    )
    budget.add_argument("--owl-outlier-multiple", type=float, default=None, help="OWL's M (default 5)")
    budget.add_argument("--owl-max-deviation", type=float, default=None, help="OWL's lambda (default 0.08)")
    moe = p.add_argument_group("mixture-of-experts layers (every expert's gate/up/down matrices are targets)")
    moe.add_argument(
        "--expert-min-tokens",
        type=int,
        default=None,
        help="an expert reached by fewer routed calibration tokens is pruned as --underused-experts says (default 16)",
    )
    moe.add_argument(
        "--underused-experts",
        choices=["magnitude", "dense"],
        default=None,
        help="prune an underused expert by magnitude (default) or leave it dense; either way the report says so",
    )
    moe.add_argument(
        "--routing-weighted",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weigh each routed token in an expert's statistics by its routing weight (default: yes)",
    )
    _add_eval_flags(p)
    _add_output_flags(p)
    p.add_argument(
        "--save-format",
        choices=list(SAVE_FORMATS),
        default=None,
        help="dense (default), compressed (sparse layers stored compressed: compressed-tensors' sparse-24-bitmask "
        "when 2:4, else sparse-bitmask), or a format by name",
    )
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")


def _method_options() -> dict[str, tuple[FieldInfo, list[str]]]:
    """Every registered method's own options: ``field name -> (field, [methods that have it])``."""
    options: dict[str, tuple[FieldInfo, list[str]]] = {}
    for method in method_classes():
        for name, field in method.config_class.model_fields.items():
            options.setdefault(name, (field, []))[1].append(method.name)
    return options


def _add_method_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option of a registered method (``--dampening`` for SparseGPT...), built from the methods'
    config classes, so a newly registered method's options are on the command line without editing it."""
    for name, (field, owners) in _method_options().items():
        kwargs: dict[str, Any] = {"default": None}
        annotation = field.annotation
        if get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
        elif annotation is bool:
            kwargs["action"] = "store_true"
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        description = (field.description or "").split(": ", 1)[-1]
        kwargs["help"] = f"{'/'.join(owners)}: {description} (default {field.default})"
        flag = "--" + name.replace("_", "-")
        if flag in parser._option_string_actions:  # a common flag: PruneConfig refuses the method when it is used
            log.warning("method option %s of %s is named like a common flag; not offered", name, "/".join(owners))
            continue
        parser.add_argument(flag, **kwargs)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Start from ``--recipe`` (or defaults) and apply every flag that was given."""
    data: dict[str, Any] = {}
    if args.recipe:
        data = read_yaml_mapping(args.recipe)
        Recipe.from_dict(data)  # the file alone must be valid
    if args.model is not None:
        data.setdefault("model", {})["source"] = args.model
    options = _method_options()
    prune_section = data.get("prune") if isinstance(data.get("prune"), dict) else None
    if args.method is not None and prune_section is not None and prune_section.get("method", "wanda") != args.method:
        # --method replaces the recipe's method: the recipe's options of that method go with it
        for key in [k for k in prune_section if k in options]:
            log.warning(
                "--method %s replaces the recipe's %s: dropping its option %s",
                args.method,
                prune_section.get("method", "wanda"),
                key,
            )
            del prune_section[key]
    return Recipe.from_dict(apply_flags(data, args, {**_PRUNE_FLAGS, **{name: ("prune", name) for name in options}}))


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    recipe = recipe_from_args(args)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    command = shlex.join(["prunekit", *argv])
    run = run_recipe(recipe, command=command, progress=not args.quiet)
    if rank_and_world()[0] != 0:  # rank 0 speaks for the run
        return 0
    s = run.report.summary
    print(f"pruned {s.layers} layers: sparsity {s.overall_sparsity:.2%} in {s.prune_seconds:.1f} s")
    if run.ppl_before:
        print(
            f"perplexity before: {run.ppl_before.perplexity:.3f} ({run.ppl_before.windows} x {run.ppl_before.seqlen})"
        )
    if run.ppl_after:
        print(f"perplexity after:  {run.ppl_after.perplexity:.3f} ({run.ppl_after.windows} x {run.ppl_after.seqlen})")
    if run.output_dir:
        out = run.report.output
        print(
            f"checkpoint: {run.output_dir} ({out.written_format}, {(out.size_bytes or 0) / 2**20:.1f} MiB of weights)"
        )
    if run.report_dir:
        print(f"report: {run.report_dir}")
    return 0
