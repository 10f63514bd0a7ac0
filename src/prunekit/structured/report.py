"""What structural pruning bought: parameters, MACs, size on disk and CPU (or GPU) latency before and after,
and the width kept by every layer: a :class:`StructuralReport`, written as JSON, Markdown and a PNG by
:func:`prunekit.reporting.write_report`.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from prunekit.core.devices import device_of
from prunekit.core.measure import versions
from prunekit.eval.speed import seconds_per_call
from prunekit.reporting import new_figure, save_figure
from prunekit.reporting.model_card import Metric, ModelCard, perplexity_metric
from prunekit.structured.cost import model_size, original_size, planned_macs, planned_parameters
from prunekit.structured.llm.search import SearchResult
from prunekit.structured.prune import StructuralResult

log = logging.getLogger(__name__)


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's safetensors file (tied tensors once, as :func:`~prunekit.save_pruned` writes)."""
    unique: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        unique.setdefault(tensor.data_ptr() if tensor.numel() else id(tensor), (name, tensor))
    return len(safetensors_bytes({name: t.detach().cpu().contiguous() for name, t in unique.values()}))


def _seconds_per_call(model: nn.Module, inputs: Sequence[Any], kwargs: dict[str, Any], calls: int) -> float:
    return seconds_per_call(lambda: model(*inputs, **kwargs), device_of(model), calls)


def compare_latency(
    before: nn.Module,
    after: nn.Module,
    inputs: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    min_run_time: float = 1.0,
    rounds: int = 15,
    *,
    threads: int | None = None,
) -> dict[str, float]:
    """Latency of two models measured as adjacent pairs: ``rounds`` times, ``before`` then ``after`` for about
    ``min_run_time / rounds`` seconds each (after three warm-up calls of each). The speed-up is the median of the
    per-pair ratios, so a machine whose speed drifts during the measurement (shared cores, frequency changes)
    favours neither model; the latencies are the medians of each model's rounds. CUDA is synchronised."""
    call_kwargs = dict(kwargs or {})
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for _ in range(3):
                before(*inputs, **call_kwargs)
                after(*inputs, **call_kwargs)
            first = _seconds_per_call(before, inputs, call_kwargs, 1)
            calls = max(1, round(min_run_time / max(rounds, 1) / max(first, 1e-9)))
            pairs = [
                (
                    _seconds_per_call(before, inputs, call_kwargs, calls),
                    _seconds_per_call(after, inputs, call_kwargs, calls),
                )
                for _ in range(rounds)
            ]
    finally:
        torch.set_num_threads(previous)
    return {
        "latency_before_s": statistics.median(t for t, _ in pairs),
        "latency_after_s": statistics.median(t for _, t in pairs),
        "speedup": statistics.median(b / a for b, a in pairs),
        "rounds": rounds,
        "calls_per_round": calls,
    }


def layer_widths(
    original: nn.Module, pruned: nn.Module, *, rename: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Input and output width of every Linear and conv, before and after, in module order (a layer of a
    removed block keeps 0 of each). ``rename`` maps a name prefix of ``original`` to the prefix the module has
    in ``pruned`` (decoder layers renumbered after others were removed); modules under a prefix it does not
    map are looked up by their own name."""
    rows = []
    after = dict(pruned.named_modules())

    def new_name(name: str) -> str | None:
        if rename is None:
            return name
        prefix = next((p for p in rename if name.startswith(p)), None)
        return rename[prefix] + name[len(prefix) :] if prefix is not None else name

    for name, module in original.named_modules():
        old = _widths(module)
        if old is None:
            continue
        target = new_name(name)
        new = _widths(after[target]) if target in after else (0, 0)
        rows.append({"layer": name, "in": old[0], "out": old[1], "in_kept": new[0], "out_kept": new[1]})
    return rows


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` features of a Linear or channels of a conv; ``None`` for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    return None


@dataclass
class StructuralReport:
    """One structural pruning run (satisfies :class:`prunekit.reporting.Report`). :meth:`to_dict` gives the
    JSON keys consumers read (``bench/summarize_structured.py``): the optional fields appear only when set."""

    model: str
    #: params/MACs/bytes before and after, and latency (``latency_before_s``, ``latency_after_s``, ``speedup``)
    summary: dict[str, Any]
    #: one row per Linear or convolution: ``layer``, ``in``, ``out``, ``in_kept``, ``out_kept``
    layers: list[dict[str, Any]]
    versions: dict[str, str]
    tied: list[str] = field(default_factory=list)
    kept_whole: list[str] = field(default_factory=list)
    unknown_ops: dict[str, int] = field(default_factory=dict)
    spaces: list[dict[str, Any]] = field(default_factory=list)
    #: blocks removed whole before the width was pruned (width pruning; ``None`` for depth pruning of an LM)
    removed_blocks: list[str] | None = None
    #: decoder layers removed (depth pruning of an LM)
    removed_layers: list[int] | None = None
    #: the command-line settings of the run
    command: dict[str, Any] | None = None
    #: perplexity ``before`` and ``after``
    perplexity: dict[str, float] | None = None
    #: layers whose attention was dropped
    dropped_attention: list[int] | None = None
    #: the width search (``--mode search``): widths per decoder layer, KLs, history (:func:`search_summary`)
    search: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model": self.model, "summary": self.summary}
        if self.removed_layers is not None:
            data["removed_layers"] = self.removed_layers
        data.update(tied=self.tied, kept_whole=self.kept_whole)
        if self.removed_blocks is not None:
            data["removed_blocks"] = self.removed_blocks
        data.update(unknown_ops=self.unknown_ops, spaces=self.spaces, layers=self.layers, versions=self.versions)
        for key in ("command", "perplexity", "dropped_attention", "search"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    def to_markdown(self) -> str:
        return render_markdown(self.to_dict())

    def plot(self, path: Path) -> bool:
        return plot_widths(self.to_dict(), path)


def structural_report(
    original: nn.Module,
    result: StructuralResult,
    example_inputs: Sequence[Any],
    example_kwargs: dict[str, Any] | None = None,
    *,
    measure_latency: bool = True,
    min_run_time: float = 1.0,
) -> StructuralReport:
    """Everything about one structural pruning run."""
    params_before, macs_before = original_size(result.plan)
    macs_after = planned_macs(result.plan)
    if result.removed_blocks:  # the plan is of the model without them: count both models on the same inputs
        params_before, macs_before = model_size(original, example_inputs, example_kwargs)
        macs_after = model_size(result.model, example_inputs, example_kwargs)[1]
    summary: dict[str, Any] = {
        "params_before": params_before,
        "params_after": planned_parameters(result.plan),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "bytes_before": size_on_disk(original),
        "bytes_after": size_on_disk(result.model),
    }
    if measure_latency:
        summary.update(compare_latency(original, result.model, example_inputs, example_kwargs, min_run_time))
    spaces = [
        {
            "space": p.space.index,
            "kind": p.space.kind,
            "units": p.space.size,
            "kept": len(p.keep),
            "where": [f"{n}[{d}]" for n, d in p.space.where[:4]],
        }
        for p in result.plan.spaces
        if p.removed
    ]
    return StructuralReport(
        model=type(original).__name__,
        summary=summary,
        layers=layer_widths(original, result.model),
        versions=versions(),
        tied=result.tied,
        kept_whole=result.kept_whole,
        unknown_ops=result.graph.unknown_ops,
        spaces=spaces,
        removed_blocks=result.removed_blocks,
    )


def render_markdown(report: dict[str, Any] | StructuralReport) -> str:
    """The report as Markdown: the summary table, what was adjusted, every layer's widths, the versions."""
    if isinstance(report, StructuralReport):
        report = report.to_dict()
    s = report["summary"]
    lines = [
        f"# Structural pruning of {report['model']}",
        "",
        "| | before | after | ratio |",
        "|---|---|---|---|",
        f"| parameters | {s['params_before']:,} | {s['params_after']:,} | {s['params_after'] / s['params_before']:.3f} |",
        f"| bytes on disk | {s['bytes_before']:,} | {s['bytes_after']:,} | {s['bytes_after'] / s['bytes_before']:.3f} |",
    ]
    if s.get("macs_before"):  # reports of before the MAC count covered every mode have 0 here: no row
        label = f"MACs (one pass of {s['macs_tokens']} tokens)" if "macs_tokens" in s else "MACs"
        ratio = s["macs_after"] / s["macs_before"]
        lines.insert(-1, f"| {label} | {s['macs_before']:,} | {s['macs_after']:,} | {ratio:.3f} |")
    if "latency_before_s" in s:
        lines.append(
            f"| latency (s) | {s['latency_before_s']:.5f} | {s['latency_after_s']:.5f} | speed-up x{s['speedup']:.2f} |"
        )
    if report.get("removed_blocks"):
        lines += ["", f"Blocks removed whole: {', '.join(report['removed_blocks'])}."]
    if report["tied"] or report["kept_whole"]:
        lines += [
            "",
            f"Widths tied to their input: {report['tied'] or 'none'}; kept whole: {report['kept_whole'] or 'none'}.",
        ]
    if report["unknown_ops"]:
        lines += [
            "",
            "Operations without a coupling rule (their tensors kept whole): "
            + ", ".join(f"{k} x{v}" for k, v in report["unknown_ops"].items()),
        ]
    search = report.get("search")
    if search:
        lines += [
            "",
            f"## Searched widths (KL from dense {search['kl']:.4f}; uniform widths {search['uniform_kl']:.4f}; "
            f"{search['evaluations']} evaluations in {search['seconds'] / 60:.1f} min)",
            "",
            "| decoder layer | heads kept | MLP channels kept |",
            "|---|---|---|",
        ]
        lines += [
            f"| {i} | {w['heads']} ({w['heads_share']:.0%}) | {w['mlp_channels']} ({w['mlp_share']:.0%}) |"
            for i, w in enumerate(search["widths"])
        ]
    lines += ["", "| layer | in | out | in kept | out kept |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['in']} | {r['out']} | {r['in_kept']} | {r['out_kept']} |" for r in report["layers"]]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def search_summary(result: SearchResult) -> dict[str, Any]:
    """The report's ``search`` section: per decoder layer the heads and MLP channels kept (and their shares),
    the searched model's KL from the dense one on the held-apart windows and the uniform baseline's, the
    evaluations and seconds spent, and the best KL after every generation."""
    return {
        "kl": result.kl,
        "uniform_kl": result.uniform_kl,
        "refit_kl": result.refit_kl,
        "decode_speedup_predicted": result.decode_speedup,
        "latency_fit_error": result.latency_fit_error,
        "decode_latency": result.decode_latency,
        "evaluations": result.evaluations,
        "seconds": result.seconds,
        "widths": result.widths(),
        "history": [asdict(step) for step in result.history],
    }


def _plot_search(report: dict[str, Any], path: Path) -> bool:
    """The searched widths per decoder layer (heads and MLP channels kept), beside the best KL against time."""
    search = report["search"]
    fig = new_figure(12, 3.8)
    if fig is None:
        return False
    widths, curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    layers = range(len(search["widths"]))
    widths.bar([i - 0.2 for i in layers], [w["heads_share"] for w in search["widths"]], 0.4, label="heads kept")
    widths.bar([i + 0.2 for i in layers], [w["mlp_share"] for w in search["widths"]], 0.4, label="MLP kept")
    widths.set_ylim(0, 1.05)
    widths.set_xlabel("decoder layer")
    widths.set_ylabel("share kept")
    widths.legend(loc="lower right")
    s = report["summary"]
    widths.set_title(
        f"{report['model']}: searched widths, {s['params_after'] / s['params_before']:.2f} of the parameters kept"
    )
    history = search["history"]
    curve.plot([h["seconds"] / 60 for h in history], [h["best_kl"] for h in history], marker=".", label="search")
    if search.get("uniform_kl") is not None:
        curve.axhline(search["uniform_kl"], color="grey", linestyle="--", label="uniform widths")
    curve.set_xlabel("search time (min)")
    curve.set_ylabel("KL from dense (held-apart tokens)")
    curve.legend()
    save_figure(fig, path)
    return True


def plot_widths(report: dict[str, Any] | StructuralReport, path: Path) -> bool:
    """Fraction of output width kept per layer (for a width search: the searched widths per decoder layer and
    the search's KL against time), as a PNG. False if matplotlib is missing."""
    if isinstance(report, StructuralReport):
        report = report.to_dict()
    if report.get("search"):
        return _plot_search(report, path)
    layers = report["layers"]
    fig = new_figure(max(8, len(layers) * 0.12), 3.5)
    if fig is None:
        return False
    ax = fig.add_subplot()
    ax.bar(range(len(layers)), [r["out_kept"] / r["out"] for r in layers], color="tab:green")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("output width kept")
    ax.set_xlabel("layer (module order)")
    ax.set_title(
        f"{report['model']}: {report['summary']['params_after'] / report['summary']['params_before']:.2f} of the parameters kept"
    )
    save_figure(fig, path)
    return True


#: How each ``--mode`` of a causal LM prunes, for its model card (and its method tag).
_MODES = {
    "width": ("width-pruning", "the same share of MLP channels and attention heads removed from every decoder layer"),
    "depth": ("depth-pruning", "whole decoder layers removed"),
    "search": ("width-search", "per-layer widths chosen by an evolutionary search (Týr-the-Pruner)"),
}


def model_card(
    report: StructuralReport,
    base_model: str,
    command: str | None = None,
    recipe: dict[str, Any] | None = None,
    ppl_source: str | None = None,
    derived_from: str | None = None,
) -> ModelCard:
    """The model card of a structurally pruned causal LM (``report.command`` holds its mode, ratio and target;
    ``ppl_source`` is the text its perplexity was measured on; ``base_model`` and ``derived_from``: what it was
    pruned from, :func:`prunekit.reporting.model_card.lineage`)."""
    settings = report.command or {}
    mode = settings.get("mode", "width")
    method, how = _MODES.get(mode, (f"{mode}-pruning", mode))
    s = report.summary
    if report.removed_layers:
        how += f" (layers {', '.join(map(str, report.removed_layers))})"
    if report.dropped_attention:
        how += f"; the attention of layers {', '.join(map(str, report.dropped_attention))} dropped"
    target = f" (asked: {settings['ratio']:.0%} of the {settings['target']})" if "ratio" in settings else ""
    summary = (
        f"`{base_model}` pruned structurally by prunekit: {how}. {s['params_before']:,} -> {s['params_after']:,} "
        f"parameters, {1 - s['params_after'] / s['params_before']:.2%} removed{target}. The tensors are smaller, so "
        "the model is smaller and faster with ordinary dense kernels."
    )
    results = []
    if report.perplexity:
        results.append(perplexity_metric(report.perplexity.get("before"), report.perplexity.get("after"), ppl_source))
    results.append(Metric("parameters", s["params_before"], s["params_after"], ","))
    if "latency_before_s" in s:
        results.append(
            Metric("latency of a forward pass (ms)", 1e3 * s["latency_before_s"], 1e3 * s["latency_after_s"], ".2f")
        )
        results.append(Metric("speed-up", None, f"x{s['speedup']:.2f}"))
    return ModelCard(
        base_model=base_model,
        derived_from=derived_from,
        method=method,
        kind="structured",
        summary=summary,
        command=command,
        recipe=recipe,
        recipe_command="prunekit structured --recipe recipe.yaml" if recipe else None,
        results=results,
        tags=["attention-drop"] if report.dropped_attention else [],
        weights_bytes_before=s.get("bytes_before"),
    )
