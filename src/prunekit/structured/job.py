"""The ``prunekit structured`` job: load, prune structurally, measure, save, report.

Two kinds of model:

- a causal LM (a Hugging Face directory, ``.gguf``, hub id or the bundled SmolLM2): width (``--mode width``:
  MLP width and heads, refitted by least squares; the hidden size too with ``--prune-hidden``; with
  ``--drop-attention K`` the attention of ``K`` layers dropped first), depth (``--mode depth``: whole
  layers) or searched per-layer widths (``--mode search``: Týr-the-Pruner, attention drops and layer removal
  among the choices; :mod:`prunekit.structured.llm.search`), calibrated on text windows, saved with
  ``save_pretrained`` (plain ``transformers`` loads it) and its tokenizer; a model with dropped attention or
  layers of different widths is saved with :func:`save_pruned` and its config instead
  (:func:`prunekit.load_model` rebuilds it);
- a torchvision classifier by name (``--torchvision resnet50``; ``--blocks k`` first removes ``k`` residual
  blocks): saved with :func:`save_pruned` (rebuild it with :func:`load_pruned` from
  ``torchvision.models.get_model(name)``), optionally exported to ONNX.

The report (``prunekit-report/``: JSON, Markdown, PNG of kept widths) records parameters, MACs where known,
size on disk, latency before and after, and perplexity for LMs when a test text is given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.calibration.data import calibration_windows
from prunekit.core.errors import ConfigError
from prunekit.core.measure import versions
from prunekit.eval.perplexity import perplexity
from prunekit.io.atomic import check_output_dir, write_atomically
from prunekit.io.hub import check_push_request, push_to_hub
from prunekit.io.loading import load_model
from prunekit.io.onnx import export_onnx
from prunekit.io.pruned import write_pruned
from prunekit.io.saving import save_causal_lm
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.dropped_attention import dropped_attention_layers
from prunekit.reporting import write_report
from prunekit.reporting.model_card import lineage, write_model_card
from prunekit.structured.config import StructuredConfig
from prunekit.structured.cost import model_size
from prunekit.structured.llm import prune_causal_lm_depth, prune_causal_lm_width
from prunekit.structured.llm.search import SearchResult, WidthSearchConfig, search_widths
from prunekit.structured.prune import prune_structurally
from prunekit.structured.report import (
    StructuralReport,
    compare_latency,
    layer_widths,
    model_card,
    search_summary,
    size_on_disk,
    structural_report,
)

log = logging.getLogger(__name__)

REPORT_DIR = "prunekit-report"


def run_structured_job(job: StructuredConfig, command: str | None = None) -> dict[str, Any]:
    """Run ``job``; returns the report as a dict (also written under ``<out>/prunekit-report``). ``command``, the
    command line that ran it, goes into a causal LM's model card (``README.md``)."""
    if job.out is None:
        raise ConfigError("no output directory: pass --out DIR (or out: in the recipe)")
    check_output_dir(job.out, job.overwrite)
    if job.torchvision:
        if job.push_to_hub:
            raise ConfigError(
                "--push-to-hub uploads causal LMs (a Hub model card needs one): drop it for --torchvision"
            )
        return _vision_job(job).to_dict()
    check_push_request(job.push_to_hub, job.out)
    report = _llm_job(job, command).to_dict()
    if job.push_to_hub:
        push_to_hub(job.out, job.push_to_hub)
    return report


def _vision_job(job: StructuredConfig) -> StructuralReport:
    try:
        import torchvision
    except ImportError:
        raise ConfigError("--torchvision needs torchvision installed (pip install torchvision)") from None
    model = torchvision.models.get_model(job.torchvision, weights=job.weights).eval()
    example = torch.randn(1, 3, job.input_size, job.input_size)
    criterion = job.criterion or "l2"
    if criterion in ("activation", "beta_rank", "taylor"):
        raise ConfigError(
            f"--criterion {criterion} needs calibration images; the command line supports l1, l2, bn_scale, random"
        )
    result = prune_structurally(
        model,
        (example,),
        job.ratio,
        target=job.target,
        criterion=criterion,
        round_to=job.round_to,
        blocks=job.blocks,
        keep_streams=job.keep_streams,
        policy=job.policy,
    )
    report = structural_report(model, result, (example,))
    report.command = {
        "torchvision": job.torchvision,
        "ratio": job.ratio,
        "target": job.target,
        "criterion": criterion,
        "round_to": job.round_to,
        "blocks": job.blocks,
        "keep_streams": job.keep_streams,
        "policy": job.policy,
    }

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        write_pruned(result.model, tmp / "model")
        if job.onnx:
            export_onnx(result.model, (example,), tmp / "model.onnx")
        write_report(report, tmp / REPORT_DIR)

    write_atomically(job.out, write, job.overwrite)
    return report


def _llm_job(job: StructuredConfig, command: str | None = None) -> StructuralReport:

    loaded = load_model(job.model, dtype=job.dtype, device=job.device, trust_remote_code=job.trust_remote_code)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    if not job.calib:
        raise ConfigError("a causal LM needs calibration text: pass --calib FILE (e.g. wikitext2_valid.txt)")
    device = next(model.parameters()).device
    held = job.search.search_windows if job.mode == "search" else 0  # the search's own windows, drawn alongside
    calib = calibration_windows(tokenizer, job.calib, job.nsamples + held, job.seqlen, job.seed).to(device)
    example = calib[:1]
    ppl = {}
    if job.ppl:
        ppl["before"] = perplexity(model, tokenizer, job.ppl, job.ppl_seqlen, job.ppl_windows).perplexity
    if job.mode == "width":
        result = prune_causal_lm_width(
            model,
            calib,
            job.ratio,
            target=job.target,
            criterion=job.criterion or "obs",
            round_to=job.round_to,
            prune_hidden=job.prune_hidden,
            reconstruct=job.reconstruct,
            drop_attention=job.drop_attention,
        )
        report = structural_report(model, result, (example,), {"use_cache": False})
        pruned = result.model
    elif job.mode == "depth":
        if job.target != "params":
            raise ConfigError("--mode depth removes whole layers to a parameter target: use --target params")
        pruned, removed = prune_causal_lm_depth(model, calib, job.ratio)
        report = _depth_report(model, pruned, removed, example)
    elif job.mode == "search":
        config = WidthSearchConfig(**job.search.model_dump(), ratio=job.ratio, seed=job.seed)
        searched = search_widths(model, calib, config)
        pruned = searched.model
        report = _search_report(model, searched, example)
    else:
        raise ConfigError(f"--mode must be width, depth or search, got {job.mode!r}")
    # one definition for every mode: the MACs of one forward pass over one calibration window
    report.summary["macs_before"] = model_size(model, (example,), {"use_cache": False})[1]
    report.summary["macs_after"] = model_size(pruned, (example,), {"use_cache": False})[1]
    report.summary["macs_tokens"] = int(example.shape[1])
    if job.ppl:
        ppl["after"] = perplexity(pruned, tokenizer, job.ppl, job.ppl_seqlen, job.ppl_windows).perplexity
        report.perplexity = ppl
    report.command = {"model": loaded.source, "mode": job.mode, "ratio": job.ratio, "target": job.target}
    dropped = dropped_attention_layers(pruned)
    if dropped:
        report.command["drop_attention"] = job.drop_attention
        report.dropped_attention = dropped

    def extra(directory: Path) -> None:
        write_report(report, directory / REPORT_DIR)
        base, derived_from = lineage(job.model)
        card = model_card(report, base, command, job.model_dump(mode="json"), job.ppl, derived_from)
        write_model_card(card, directory)

    save_causal_lm(pruned, tokenizer, job.out, job.overwrite, extra=extra)
    return report


def _depth_report(
    original: nn.Module, pruned: nn.Module, removed: list[int], example: torch.Tensor
) -> StructuralReport:
    timing = compare_latency(original, pruned, (example,), {"use_cache": False})
    return StructuralReport(
        model=type(original).__name__,
        summary={
            "params_before": sum(p.numel() for p in original.parameters()),
            "params_after": sum(p.numel() for p in pruned.parameters()),
            "bytes_before": size_on_disk(original),
            "bytes_after": size_on_disk(pruned),
            **timing,
        },
        layers=_depth_widths(original, removed),
        versions=versions(),
        removed_layers=removed,
    )


def _search_report(original: nn.Module, searched: SearchResult, example: torch.Tensor) -> StructuralReport:
    pruned = searched.model
    timing = compare_latency(original, pruned, (example,), {"use_cache": False})
    removed = [i for i, choice in enumerate(searched.genome) if choice == (0, 0)]
    blocks_name, _ = find_decoder_blocks(original)
    renamed = _renumbered(blocks_name, removed, len(searched.genome))
    return StructuralReport(
        model=type(original).__name__,
        summary={
            "params_before": searched.dense_params,
            "params_after": searched.params,
            "bytes_before": size_on_disk(original),
            "bytes_after": size_on_disk(pruned),
            **timing,
        },
        layers=layer_widths(original, pruned, rename=renamed),
        versions=versions(),
        removed_layers=removed or None,
        search=search_summary(searched),
    )


def _renumbered(blocks_name: str, removed: list[int], layers: int) -> dict[str, str]:
    """Each kept decoder layer's name prefix in the original model, mapped to its prefix after ``removed`` went."""
    kept = [i for i in range(layers) if i not in removed]
    return {f"{blocks_name}.{old}.": f"{blocks_name}.{new}." for new, old in enumerate(kept)}


def _depth_widths(original: nn.Module, removed: list[int]) -> list[dict[str, Any]]:
    """Every Linear's widths, zero for the layers of removed blocks."""
    blocks_name, _ = find_decoder_blocks(original)
    gone = tuple(f"{blocks_name}.{i}." for i in removed)
    rows = []
    for row in layer_widths(original, original):
        if row["layer"].startswith(gone):
            row = {**row, "in_kept": 0, "out_kept": 0}
        rows.append(row)
    return rows
