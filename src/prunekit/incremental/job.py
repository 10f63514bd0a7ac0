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
    save_causal_lm(result.model, tokenizer, out, overwrite, extra=lambda tmp: write_report(report, tmp / REPORT_DIR))
    return report
