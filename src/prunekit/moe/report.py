"""The report of an expert-pruning run: per MoE layer and per expert, the routed calibration tokens, the
criterion's score and REAP saliency, kept or removed (or merged, and into which), and, after pruning inside
the kept experts, each expert's sparsity and reconstruction error; with a heatmap of the routing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit.eval.perplexity import PerplexityResult
from prunekit.moe.remove import ExpertPruneResult
from prunekit.oneshot.prune import PruneResult
from prunekit.reporting import new_figure, save_figure
from prunekit.reporting.model_card import Metric, ModelCard, perplexity_metric


@dataclass
class ExpertRow:
    """One expert of one layer, by its index in the original model."""

    layer: str
    expert: int
    routed_tokens: int
    score: float | None
    reap: float
    kept: bool
    merged_into: int | None = None
    #: after pruning inside the kept experts: the mean sparsity and error of its matrices
    sparsity: float | None = None
    relative_error: float | None = None


@dataclass
class ExpertReport:
    """An expert-pruning run (satisfies :class:`prunekit.reporting.Report`)."""

    command: str
    recipe: dict[str, Any]
    versions: dict[str, str]
    model: str
    criterion: str
    merged: bool
    experts_before: int
    experts_after: int
    config_keys: list[str]
    params_before: int
    params_after: int
    #: parameters of the routed experts before and after (what the ``budget`` is a fraction of)
    expert_params_before: int
    expert_params_after_removal: int
    #: zeros inside the kept experts after the one-shot step (0 without one)
    expert_zeros: int
    seconds: float
    layer_errors: dict[str, float]
    experts: list[ExpertRow] = field(default_factory=list)
    oneshot_method: str | None = None
    #: the one-shot step's resolved settings (its sparsity set from the budget, its targets)
    oneshot: dict[str, Any] | None = None
    #: the sparsity it reached over its targets
    oneshot_sparsity: float | None = None
    perplexity_before: PerplexityResult | None = None
    perplexity_after: PerplexityResult | None = None
    output_dir: str | None = None
    size_bytes: int | None = None

    @property
    def expert_params_removed_fraction(self) -> float:
        """Fraction of the routed experts' parameters gone: removed experts plus zeros inside the kept ones."""
        gone = self.expert_params_before - self.expert_params_after_removal + self.expert_zeros
        return gone / max(1, self.expert_params_before)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["expert_params_removed_fraction"] = self.expert_params_removed_fraction
        return data

    def to_markdown(self) -> str:
        ppl = ""
        if self.perplexity_after is not None:
            before = f"{self.perplexity_before.perplexity:.3f} -> " if self.perplexity_before else ""
            ppl = (
                f"- perplexity: {before}**{self.perplexity_after.perplexity:.3f}** ({self.perplexity_after.windows} "
                f"windows x {self.perplexity_after.seqlen} tokens of `{self.perplexity_after.source}`)\n"
            )
        oneshot = ""
        if self.oneshot_method:
            oneshot = f"- then {self.oneshot_method}: sparsity {self.oneshot_sparsity:.4f} of its targets (default: the kept experts)\n"
        lines = [
            f"# Expert pruning of `{self.model}`",
            "",
            f"- criterion: **{self.criterion}**; removed experts were {'merged into their nearest kept expert' if self.merged else 'dropped'}",
            f"- experts per layer: {self.experts_before} -> {self.experts_after} (config: {', '.join(self.config_keys)})",
            *([oneshot.rstrip("\n")] if oneshot else []),
            f"- routed-expert parameters removed: {self.expert_params_removed_fraction:.4f} "
            f"(model: {self.params_before:,} -> {self.params_after:,} parameters, {self.expert_zeros:,} zeros inside experts)",
            *([ppl.rstrip("\n")] if ppl else []),
            f"- time: {self.seconds:.1f} s",
            "",
            f"Command: `{self.command}`",
            "",
            "## Layers",
            "",
            "| layer | relative output error after removal |",
            "|---|---|",
        ]
        lines += [f"| {name} | {error:.4f} |" for name, error in self.layer_errors.items()]
        lines += [
            "",
            "## Experts",
            "",
            "| layer | expert | routed tokens | score | REAP | kept | sparsity | rel. error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in self.experts:
            kept = (
                "yes"
                if row.kept
                else ("merged into " + str(row.merged_into) if row.merged_into is not None else "removed")
            )
            lines.append(
                f"| {row.layer} | {row.expert} | {row.routed_tokens} | {_fmt(row.score)} | {row.reap:.4f} | {kept} | "
                f"{_fmt(row.sparsity)} | {_fmt(row.relative_error)} |"
            )
        lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in self.versions.items()]
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> bool:
        """Heatmap of the fraction of each layer's routed tokens per expert, removed experts crossed out."""
        layers = list(self.layer_errors)
        if not layers:
            return False
        fig = new_figure(max(6, self.experts_before * 0.5), max(3, len(layers) * 0.4))
        if fig is None:
            return False
        ax = fig.subplots()
        grid = [[0.0] * self.experts_before for _ in layers]
        for row in self.experts:
            grid[layers.index(row.layer)][row.expert] = row.routed_tokens
        grid = [[v / max(1.0, sum(line)) for v in line] for line in grid]
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax, label="fraction of routed tokens")
        for row in self.experts:
            if not row.kept:
                ax.text(row.expert, layers.index(row.layer), "x", ha="center", va="center", color="red")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{self.criterion}: {self.experts_before} -> {self.experts_after} experts per layer (x: removed)")
        save_figure(fig, path)
        return True


def model_card(report: ExpertReport, base_model: str, derived_from: str | None = None) -> ModelCard:
    """The model card of the checkpoint an expert-pruning run saved (``base_model`` and ``derived_from``: what it
    was pruned from, :func:`prunekit.reporting.model_card.lineage`)."""
    then = ""
    tags = ["moe"]
    if report.oneshot_method and report.oneshot_sparsity is not None:
        pattern = str((report.oneshot or {}).get("pattern", "unstructured"))
        then = (
            f", then {report.oneshot_method} ({pattern}) inside the kept experts to {report.oneshot_sparsity:.2%} "
            "sparsity"
        )
        tags += [report.oneshot_method, pattern]
    summary = (
        f"`{base_model}` pruned by prunekit from {report.experts_before} to {report.experts_after} routed experts per "
        f"MoE layer: the experts kept were chosen by **{report.criterion}**, the others "
        + ("merged into their nearest kept expert" if report.merged else "removed")
        + f"{then}. {report.expert_params_removed_fraction:.2%} of the routed experts' parameters are gone."
    )
    results = []
    ppl = [report.perplexity_before, report.perplexity_after]
    known = next((p for p in ppl if p is not None), None)
    if known is not None:
        values = [None if p is None else p.perplexity for p in ppl]
        results.append(perplexity_metric(*values, known.source, known.windows, known.seqlen))
    results += [
        Metric("parameters", report.params_before, report.params_after, ","),
        Metric("routed experts per layer", report.experts_before, report.experts_after, "d"),
        Metric("routed-expert parameters removed", None, report.expert_params_removed_fraction, ".2%"),
    ]
    return ModelCard(
        base_model=base_model,
        derived_from=derived_from,
        method=report.criterion,
        kind="expert-pruning",
        summary=summary,
        command=report.command,
        recipe=report.recipe,
        recipe_command="prunekit experts --recipe recipe.yaml",
        results=results,
        tags=tags,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def expert_rows(result: ExpertPruneResult, inside: PruneResult | None) -> list[ExpertRow]:
    """One row per expert of every layer; with the one-shot step's result, each kept expert's sparsity and
    error (its matrices are named by their index *after* removal, mapped back to the original one)."""
    per_expert: dict[tuple[str, int], list[tuple[float, float | None]]] = {}
    if inside is not None:
        for layer_result in inside.layers:
            if layer_result.expert is None:
                continue
            owner = layer_result.name.split(".experts.")[0]
            per_expert.setdefault((owner, layer_result.expert), []).append(
                (layer_result.sparsity, layer_result.relative_error)
            )
    rows = []
    for layer in result.layers:
        new_index = {old: new for new, old in enumerate(layer.kept)}
        for e in range(layer.experts):
            stats = per_expert.get((layer.name, new_index[e])) if e in new_index else None
            errors = [err for _, err in stats or [] if err is not None]
            rows.append(
                ExpertRow(
                    layer=layer.name,
                    expert=e,
                    routed_tokens=layer.counts[e],
                    score=None if layer.scores is None else layer.scores[e],
                    reap=layer.reap[e],
                    kept=e in new_index,
                    merged_into=layer.merged_into.get(e),
                    sparsity=sum(s for s, _ in stats) / len(stats) if stats else None,
                    relative_error=sum(errors) / len(errors) if errors else None,
                )
            )
    return rows
