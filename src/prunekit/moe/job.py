"""The whole job behind ``prunekit experts`` and its YAML recipes: load -> calibrate -> (eval) -> remove experts
-> (prune inside the kept experts) -> (eval) -> save -> report. Inputs are validated before the slow work,
and nothing is written unless the run succeeds.

Removing experts and then pruning inside the kept ones under one budget is STUN (Lee et al. 2024):
``budget`` is the fraction of the routed experts' parameters to remove in all; the one-shot step's sparsity
is then ``(budget - r) / (1 - r)`` where ``r`` is the fraction of experts removed.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, model_validator

from prunekit.calibration.data import load_text_tokens, model_max_context, read_text
from prunekit.core.config import StrictConfig
from prunekit.core.devices import resolve_device
from prunekit.core.errors import ConfigError
from prunekit.core.measure import versions
from prunekit.eval.perplexity import PerplexityResult, check_eval_seqlen, perplexity_of_tokens
from prunekit.io.atomic import check_output_dir
from prunekit.io.compressed import checkpoint_size_bytes
from prunekit.io.hub import check_push_request, push_to_hub
from prunekit.io.loading import load_model
from prunekit.io.saving import save_pretrained
from prunekit.models.moe_layers import experts_to_remove, find_moe_layers
from prunekit.moe.config import ExpertPruneConfig
from prunekit.moe.remove import ExpertPruneResult, check_expert_removal, prune_experts
from prunekit.moe.report import ExpertReport, expert_rows, model_card
from prunekit.oneshot.config import CalibrationConfig, EvalConfig, ModelConfig, OutputConfig, PruneConfig
from prunekit.oneshot.job import REPORT_SUBDIR, calibration_from_config
from prunekit.oneshot.prune import PruneResult, prune
from prunekit.reporting import write_report
from prunekit.reporting.model_card import lineage, write_model_card

log = logging.getLogger(__name__)

#: The one-shot step's default targets: every expert's matrices (``...experts.<e>.<part>_proj``).
EXPERT_TARGETS = r"\.experts\.\d+\."


class ExpertRecipe(StrictConfig):
    """Everything an expert-pruning run needs; a YAML file of these sections is a recipe."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: CalibrationConfig = Field(default_factory=lambda: CalibrationConfig(nsamples=32, seqlen=512))
    experts: ExpertPruneConfig = Field(default_factory=ExpertPruneConfig)
    then: PruneConfig | None = Field(
        None, description="one-shot pruning inside the kept experts (default targets: the experts' matrices)"
    )
    budget: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="fraction of the routed experts' parameters removed in all (experts removed + zeros inside the "
        "kept ones); sets then.sparsity",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _budget_needs_then(self) -> ExpertRecipe:
        if self.budget is not None and self.then is None:
            raise ValueError("budget sets the sparsity of the one-shot step inside the kept experts: give `then` too")
        if self.model.lazy:
            raise ValueError("expert removal runs in memory: drop model.lazy (--lazy)")
        return self


def oneshot_sparsity(budget: float, removed_fraction: float) -> float:
    """The sparsity inside the kept experts that brings the removed share of expert parameters to ``budget``."""
    if budget < removed_fraction:
        raise ConfigError(
            f"the budget {budget} is below the {removed_fraction:.4f} of the expert parameters that removing experts "
            "already takes: raise --budget or remove fewer experts"
        )
    return (budget - removed_fraction) / (1 - removed_fraction)


def routed_expert_parameters(model: torch.nn.Module) -> int:
    """Parameters of the routed experts' fused tensors over all MoE layers."""
    return sum(p.numel() for layer in find_moe_layers(model) for p in layer.experts.parameters(recurse=False))


def expert_zeros(model: torch.nn.Module) -> int:
    return sum(int((p == 0).sum()) for layer in find_moe_layers(model) for p in layer.experts.parameters(recurse=False))


@dataclass
class ExpertRunResult:
    experts: ExpertPruneResult
    inside: PruneResult | None
    report: ExpertReport
    output_dir: Path | None
    report_dir: Path | None


def run_expert_recipe(recipe: ExpertRecipe, command: str | None = None, progress: bool = True) -> ExpertRunResult:
    """Run a whole expert-pruning job described by ``recipe``; see the module docstring."""
    started = time.perf_counter()
    out_dir = check_output_dir(recipe.output.dir, recipe.output.overwrite) if recipe.output.dir else None
    if out_dir is None:
        log.warning("no output directory given: the pruned model will not be saved (pass --out DIR)")
    check_push_request(recipe.output.push_to_hub, out_dir)
    report_dir = (
        check_output_dir(recipe.output.report_dir, recipe.output.overwrite) if recipe.output.report_dir else None
    )
    if not (recipe.calibration.path or recipe.calibration.dataset):
        raise ConfigError(
            "expert removal scores experts on calibration text: pass --calib FILE (e.g. a validation split)"
        )
    if recipe.calibration.path:
        read_text(recipe.calibration.path)
    if recipe.eval.ppl:
        read_text(recipe.eval.ppl, what="evaluation")

    loaded = load_model(recipe.model.source, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
    model = loaded.model
    context = model_max_context(model.config)
    calibration = calibration_from_config(loaded.tokenizer, recipe.calibration, context)
    layers = check_expert_removal(model, recipe.experts, calibration)  # before any slow work
    removed_fraction = experts_to_remove(layers[0].num_experts, recipe.experts.remove) / layers[0].num_experts
    then = recipe.then
    if then is not None:
        updates: dict[str, object] = {}
        if recipe.budget is not None:
            updates["sparsity"] = oneshot_sparsity(recipe.budget, removed_fraction)
        if not then.include:
            updates["include"] = [EXPERT_TARGETS]
        then = PruneConfig.from_dict({**then.model_dump(), **updates}) if updates else then
    eval_tokens = None
    if recipe.eval.ppl:
        check_eval_seqlen(recipe.eval.seqlen, context)
        eval_tokens = load_text_tokens(loaded.tokenizer, recipe.eval.ppl, what="evaluation")

    def evaluate(m: torch.nn.Module) -> PerplexityResult:
        assert eval_tokens is not None and recipe.eval.ppl is not None
        return perplexity_of_tokens(
            m,
            eval_tokens,
            recipe.eval.seqlen,
            recipe.eval.max_windows,
            resolve_device(recipe.eval.device),
            progress,
            recipe.eval.ppl,
        )

    ppl_before = evaluate(model) if eval_tokens is not None and recipe.eval.before else None
    expert_params_before = routed_expert_parameters(model)
    result = prune_experts(model, recipe.experts, calibration, inplace=True, progress=progress)
    expert_params_after = routed_expert_parameters(model)
    inside = prune(model, then, calibration, inplace=True, progress=progress) if then is not None else None
    ppl_after = evaluate(model) if eval_tokens is not None else None

    report = ExpertReport(
        command=command if command is not None else shlex.join(sys.argv),
        recipe=recipe.model_dump(mode="json"),
        versions=versions(),
        model=loaded.source,
        criterion=recipe.experts.criterion,
        merged=recipe.experts.merge,
        experts_before=result.experts_before,
        experts_after=result.experts_after,
        config_keys=result.config_keys,
        params_before=result.params_before,
        params_after=result.params_after,
        expert_params_before=expert_params_before,
        expert_params_after_removal=expert_params_after,
        expert_zeros=expert_zeros(model),
        seconds=time.perf_counter() - started,
        layer_errors={layer.name: layer.relative_error for layer in result.layers},
        experts=expert_rows(result, inside),
        oneshot_method=None if then is None else then.method,
        oneshot=None if then is None else then.model_dump(mode="json"),
        oneshot_sparsity=None if inside is None else inside.overall_sparsity,
        perplexity_before=ppl_before,
        perplexity_after=ppl_after,
        output_dir=None if out_dir is None else str(out_dir),
    )
    if out_dir is not None:

        def add_report(tmp: Path) -> None:
            report.size_bytes = checkpoint_size_bytes(tmp)
            if report_dir is None:
                write_report(report, tmp / REPORT_SUBDIR)
            write_model_card(model_card(report, *lineage(recipe.model.source)), tmp)

        save_pretrained(model, loaded.tokenizer, out_dir, recipe.output.overwrite, add_report)
    if report_dir is not None:
        write_report(report, report_dir, overwrite=recipe.output.overwrite)
    elif out_dir is not None:
        report_dir = out_dir / REPORT_SUBDIR
    if recipe.output.push_to_hub and out_dir is not None:
        push_to_hub(out_dir, recipe.output.push_to_hub)
    return ExpertRunResult(result, inside, report, out_dir, report_dir)
