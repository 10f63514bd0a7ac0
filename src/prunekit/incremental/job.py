"""The job behind ``prunekit adapt``: load a causal LM, prune it in increments with recovery between them
(:func:`~prunekit.incremental.prune.prune_incrementally`), save it as it can be reloaded, with a report of
every step. Nothing is written to ``out`` unless the run succeeds."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prunekit.calibration.data import calibration_windows, load_text_tokens
from prunekit.core.errors import ConfigError
from prunekit.core.measure import versions
from prunekit.eval.perplexity import perplexity
from prunekit.incremental.prune import IncrementalConfig, IncrementalStep, prune_incrementally
from prunekit.io.atomic import check_output_dir
from prunekit.io.loading import load_model
from prunekit.io.saving import save_causal_lm
from prunekit.reporting import new_figure, save_figure, write_report
from prunekit.reporting.model_card import Metric, ModelCard, lineage, perplexity_metric, write_model_card

REPORT_DIR = "prunekit-report"


@dataclass
class IncrementalReport:
    """An incremental pruning run (satisfies :class:`prunekit.reporting.Report`)."""

    command: str
    model: str
    config: dict[str, Any]
    dense_params: int
    params: int
    steps: list[IncrementalStep]
    perplexity: dict[str, float] | None
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"# Incremental pruning of `{self.model}` (Adapt-Pruner)",
            "",
            f"{self.dense_params:,} -> {self.params:,} parameters ({self.params / self.dense_params:.3f} kept)"
            + (
                f"; perplexity {self.perplexity['before']:.3f} -> {self.perplexity['after']:.3f}"
                if self.perplexity
                else ""
            ),
            "",
            "| step | removed | parameters | held-out KL before recovery | after | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for i, s in enumerate(self.steps, 1):
            kl = (f"{s.kl_before:.4f}", f"{s.kl_after:.4f}") if s.kl_before is not None else ("", "")
            lines.append(f"| {i} | {s.removed:.1%} | {s.params:,} | {kl[0]} | {kl[1]} | {s.seconds:.1f} |")
        lines += ["", f"Command: `{self.command}`", "", "## Versions", ""]
        lines += [f"- {k}: {v}" for k, v in self.versions.items()]
        return "\n".join(lines) + "\n"

    def model_card(self, base_model: str, derived_from: str | None = None, ppl_source: str | None = None) -> ModelCard:
        """The card of the pruned model (``base_model`` and ``derived_from``: what it was pruned from,
        :func:`prunekit.reporting.model_card.lineage`; ``ppl_source``: the text its perplexity was measured on)."""
        recover = self.config.get("recover", True)
        summary = (
            f"`{base_model}` pruned structurally by prunekit with Adapt-Pruner in {len(self.steps)} steps"
            + (", each followed by distillation from the dense model" if recover else "")
            + f": {self.dense_params:,} -> {self.params:,} parameters, {1 - self.params / self.dense_params:.2%} "
            "removed (MLP channels and attention heads, a width per layer). The tensors are smaller, so the model "
            "is smaller and faster with ordinary dense kernels."
        )
        results = []
        if self.perplexity:
            results.append(perplexity_metric(self.perplexity.get("before"), self.perplexity.get("after"), ppl_source))
        results.append(Metric("parameters", self.dense_params, self.params, ","))
        last = self.steps[-1] if self.steps else None
        if last is not None and last.kl_after is not None:
            results.append(Metric("held-out KL from the dense model per token", None, last.kl_after, ".4f"))
        return ModelCard(
            base_model=base_model,
            derived_from=derived_from,
            method="adapt-pruner",
            kind="structured",
            summary=summary,
            command=self.command,
            results=results,
            tags=["distillation"] if recover else [],
        )

    def plot(self, path: Path) -> bool:
        """The MLP width of every decoder layer after each step."""
        fig = new_figure(8, 3.5)
        if fig is None or not self.steps:
            return False
        ax = fig.subplots()
        for step in self.steps:
            ax.plot([c for _, c in step.genome], marker=".", label=f"{step.removed:.0%} removed")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("MLP channels kept")
        ax.legend()
        save_figure(fig, path)
        return True


def run_incremental(
    model: str | None,
    calib: str,
    out: str,
    config: IncrementalConfig,
    *,
    text: str | None = None,
    nsamples: int = 32,
    seqlen: int = 512,
    seed: int = 0,
    ppl: str | None = None,
    ppl_windows: int | None = 40,
    overwrite: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    command: str | None = None,
) -> IncrementalReport:
    """Prune ``model`` in increments to ``config.ratio`` (calibrated on ``calib``, recovering on ``text``) and save
    it to ``out``; see the module docstring."""
    check_output_dir(out, overwrite)
    loaded = load_model(model, dtype=dtype, device=device)
    tokenizer = loaded.tokenizer
    device_of = next(loaded.model.parameters()).device
    windows = calibration_windows(tokenizer, calib, nsamples, seqlen, seed).to(device_of)
    if config.recover and text is None:
        raise ConfigError("recovery between the steps distills on a text: pass --text FILE, or --no-recover")
    tokens = load_text_tokens(tokenizer, text, what="recovery") if config.recover and text is not None else None
    scores = {}
    if ppl:
        scores["before"] = perplexity(
            loaded.model, tokenizer, ppl, max_windows=ppl_windows, progress=progress
        ).perplexity
    result = prune_incrementally(loaded.model, windows, tokens, config, progress=progress)
    if ppl:
        scores["after"] = perplexity(
            result.model, tokenizer, ppl, max_windows=ppl_windows, progress=progress
        ).perplexity
    report = IncrementalReport(
        command=command if command is not None else shlex.join(sys.argv),
        model=loaded.source,
        config=config.model_dump(mode="json"),
        dense_params=result.dense_params,
        params=sum(p.numel() for p in result.model.parameters()),
        steps=result.steps,
        perplexity=scores or None,
        versions=versions(),
    )
    card = report.model_card(*lineage(model), ppl_source=ppl)

    def extra(tmp: Path) -> None:
        write_report(report, tmp / REPORT_DIR)
        write_model_card(card, tmp)

    save_causal_lm(result.model, tokenizer, out, overwrite, extra=extra)
    return report
