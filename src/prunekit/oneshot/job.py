"""The whole job behind ``prunekit prune`` and YAML recipes: load -> calibrate -> (eval) -> prune -> (eval)
-> save -> report. Every input is validated before the slow work starts, and nothing is written unless
the run succeeds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.calibration.data import (
    check_window_args,
    load_dataset_tokens,
    load_text_tokens,
    model_max_context,
    read_text,
    sample_windows,
)
from prunekit.core.devices import resolve_device, resolve_dtype
from prunekit.core.distributed import agree, init_from_torchrun, rank_and_world
from prunekit.core.errors import CalibrationError, ConfigError, ModelLoadError, PrunekitError
from prunekit.core.measure import current_peak_rss_bytes
from prunekit.eval.perplexity import PerplexityResult, check_eval_seqlen, perplexity_of_tokens
from prunekit.io.atomic import check_output_dir
from prunekit.io.compressed import check_save_format
from prunekit.io.hub import check_push_request, push_to_hub
from prunekit.io.loading import BUNDLED_NAMES, load_model, prepare_bundled_model
from prunekit.io.saving import save_pretrained
from prunekit.oneshot.config import CalibrationConfig, Recipe
from prunekit.oneshot.lazy import prune_checkpoint
from prunekit.oneshot.prune import PruneResult, prune
from prunekit.oneshot.report import OneShotReport, build_report, model_card, record_checkpoint, write_report
from prunekit.reporting.model_card import lineage, write_model_card

log = logging.getLogger(__name__)
REPORT_SUBDIR = "prunekit-report"


def calibration_from_config(tokenizer: Any, cfg: CalibrationConfig, max_context: int | None) -> torch.Tensor:
    check_window_args(cfg.nsamples, cfg.seqlen, max_context)
    if cfg.dataset:
        tokens = load_dataset_tokens(tokenizer, cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    else:
        assert cfg.path is not None
        tokens = load_text_tokens(tokenizer, cfg.path)
    return sample_windows(tokens, cfg.nsamples, cfg.seqlen, cfg.seed)


@dataclass
class RunResult:
    """Everything a recipe run produced."""

    prune: PruneResult
    ppl_before: PerplexityResult | None
    ppl_after: PerplexityResult | None
    output_dir: Path | None
    report_dir: Path | None
    report: OneShotReport


def _check_run(recipe: Recipe) -> tuple[Path | None, Path | None, bool]:
    """Everything that can be checked before the model is loaded: ``(out_dir, report_dir, has_calibration)``."""
    if recipe.model.lazy and rank_and_world()[1] > 1:
        raise ConfigError("--lazy cannot run on several ranks yet: run it in one process (without torchrun)")
    out_dir = check_output_dir(recipe.output.dir, recipe.output.overwrite) if recipe.output.dir else None
    if out_dir is None:
        log.warning("no output directory given: the pruned model will not be saved (pass --out DIR)")
    else:
        check_save_format(recipe.output.save_format, recipe.prune.parsed_pattern())  # before the slow work
    check_push_request(recipe.output.push_to_hub, out_dir)
    report_dir: Path | None = None
    if recipe.output.report_dir:
        report_dir = check_output_dir(recipe.output.report_dir, recipe.output.overwrite)
    has_calibration = bool(recipe.calibration.path or recipe.calibration.dataset)
    if recipe.prune.needs_calibration() and not has_calibration:
        if recipe.prune.method_class().needs_activations:
            problem, fix = f"method {recipe.prune.method!r}", ""
        else:
            problem, fix = "refitting the kept weights (--refit-steps)", ", or --refit-steps 0"
        raise CalibrationError(f"{problem} needs calibration text: pass --calib FILE (e.g. a validation split){fix}")
    if has_calibration:
        check_window_args(recipe.calibration.nsamples, recipe.calibration.seqlen)
    if recipe.calibration.path:
        read_text(recipe.calibration.path)  # fail on a missing/empty file before loading the model
    if recipe.eval.ppl:
        read_text(recipe.eval.ppl, what="evaluation")
    return out_dir, report_dir, has_calibration


def run_recipe(recipe: Recipe, command: str | None = None, progress: bool = True) -> RunResult:
    """Run a whole pruning job described by ``recipe``; see the module docstring. With
    ``recipe.prune.distributed`` this process is one rank of a ``torchrun`` job: every rank calibrates its
    share of the windows and solves its share of the layers, and rank 0 alone evaluates and writes."""
    started = time.perf_counter()
    if recipe.prune.distributed:
        init_from_torchrun()
    rank, _ = rank_and_world()
    error: PrunekitError | None = None
    try:
        out_dir, report_dir, has_calibration = _check_run(recipe)
    except PrunekitError as exc:
        error = exc
    agree(error)  # a check failed on any rank: every rank stops here, nothing written
    if rank != 0:
        progress = False
    if recipe.model.lazy:
        return _run_lazily(recipe, out_dir, report_dir, has_calibration, command, started, progress)
    load_started = time.perf_counter()
    loaded = load_model(recipe.model.source, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
    load_seconds = time.perf_counter() - load_started
    context = model_max_context(loaded.model.config)
    calibration = calibration_from_config(loaded.tokenizer, recipe.calibration, context) if has_calibration else None
    eval_tokens = None
    if recipe.eval.ppl:
        check_eval_seqlen(recipe.eval.seqlen, context)  # before any slow work
        eval_tokens = load_text_tokens(loaded.tokenizer, recipe.eval.ppl, what="evaluation")  # once, for both

    def evaluate(model: torch.nn.Module) -> PerplexityResult:
        assert eval_tokens is not None and recipe.eval.ppl is not None
        device = resolve_device(recipe.eval.device)
        return perplexity_of_tokens(
            model, eval_tokens, recipe.eval.seqlen, recipe.eval.max_windows, device, progress, recipe.eval.ppl
        )

    ppl_before = None
    if recipe.eval.ppl and recipe.eval.before and rank == 0:
        ppl_before = evaluate(loaded.model)
        log.info(
            "dense perplexity %.3f (%d windows x %d)",
            ppl_before.perplexity,
            ppl_before.windows,
            ppl_before.seqlen,
        )
    result = prune(loaded.model, recipe.prune, calibration, inplace=True, progress=progress)
    ppl_after = None
    if recipe.eval.ppl and rank == 0:
        ppl_after = evaluate(result.model)
        log.info("pruned perplexity %.3f", ppl_after.perplexity)

    report = build_report(
        recipe,
        result,
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        command=command,
        model_source=loaded.source,
        load_seconds=load_seconds,
        total_seconds=time.perf_counter() - started,
        process_peak_rss_bytes=current_peak_rss_bytes(),
    )
    if rank != 0:  # rank 0 holds the same model and writes it
        return RunResult(result, None, None, None, None, report)
    if out_dir is not None:
        inside = report_dir is None  # the report travels inside the checkpoint directory

        def add_report(tmp: Path) -> None:
            record_checkpoint(report, tmp)  # the weights are written by now: their size is known
            if inside:
                write_report(report, tmp / REPORT_SUBDIR)
            write_model_card(model_card(report, *lineage(recipe.model.source)), tmp)

        save_pretrained(
            result.model, loaded.tokenizer, out_dir, recipe.output.overwrite, add_report, recipe.output.save_format
        )
        if inside:
            report_dir = out_dir / REPORT_SUBDIR
    if recipe.output.report_dir:
        assert report_dir is not None
        write_report(report, report_dir, overwrite=recipe.output.overwrite)
    if recipe.output.push_to_hub and out_dir is not None:
        push_to_hub(out_dir, recipe.output.push_to_hub)
    return RunResult(result, ppl_before, ppl_after, out_dir, report_dir, report)


def _lazy_source(source: str | None) -> Path:
    """The local safetensors directory a lazy run streams from (the bundled model's converted cache)."""
    if source is None or (source.lower() in BUNDLED_NAMES and not Path(source).exists()):
        return prepare_bundled_model()
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"--lazy streams from a local safetensors directory, and {source!r} is not one: download the model "
            "first (e.g. `hf download ORG/NAME --local-dir DIR`) or drop --lazy"
        )
    return path


def _run_lazily(
    recipe: Recipe,
    out_dir: Path | None,
    report_dir: Path | None,
    has_calibration: bool,
    command: str | None,
    started: float,
    progress: bool,
) -> RunResult:
    """:func:`run_recipe` for ``model.lazy``: stream the blocks from disk to ``out_dir``."""
    from transformers import AutoConfig, AutoTokenizer

    if out_dir is None:
        raise ConfigError("--lazy writes the pruned model block by block as it goes: pass --out DIR")
    if recipe.eval.ppl:
        raise ConfigError(
            "perplexity needs the whole model in memory, which --lazy avoids: drop --ppl and run "
            "`prunekit eval OUT --ppl FILE` on a machine where the pruned model fits"
        )
    if recipe.output.save_format != "dense":
        raise ConfigError("--lazy writes dense shards only: drop --save-format or --lazy")
    source = _lazy_source(recipe.model.source)
    trust = recipe.model.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        context = model_max_context(AutoConfig.from_pretrained(source, trust_remote_code=trust))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the tokenizer or config of {str(source)!r}: {exc}") from exc
    calibration = calibration_from_config(tokenizer, recipe.calibration, context) if has_calibration else None
    reports: list[OneShotReport] = []

    def add_report(tmp: Path, result: PruneResult) -> None:
        report = build_report(
            recipe,
            result,
            ppl_before=None,
            ppl_after=None,
            command=command,
            model_source=f"{source} (streamed block by block)",
            load_seconds=0.0,
            total_seconds=time.perf_counter() - started,
            process_peak_rss_bytes=current_peak_rss_bytes(),
        )
        record_checkpoint(report, tmp)
        reports.append(report)
        if report_dir is None:
            write_report(report, tmp / REPORT_SUBDIR)
        write_model_card(model_card(report, *lineage(recipe.model.source)), tmp)

    result = prune_checkpoint(
        source,
        out_dir,
        recipe.prune,
        calibration,
        tokenizer=tokenizer,
        dtype=resolve_dtype(recipe.model.dtype),
        overwrite=recipe.output.overwrite,
        trust_remote_code=trust,
        progress=progress,
        extra=add_report,
    )
    if report_dir is not None:
        write_report(reports[0], report_dir, overwrite=recipe.output.overwrite)
    if recipe.output.push_to_hub:
        push_to_hub(out_dir, recipe.output.push_to_hub)
    return RunResult(result, None, None, out_dir, report_dir or out_dir / REPORT_SUBDIR, reports[0])
