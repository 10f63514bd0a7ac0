"""The job behind ``prunekit distill``: load the pruned student and its dense teacher, distill on a text
(:func:`prunekit.training.lm_distill.distill_lm`), save the student as it can be reloaded, with a report.

Progress is checkpointed next to the output (``<out>.checkpoint``) and a run started with ``resume`` continues
from there; the checkpoint is deleted once the distilled model is saved. Nothing is written to ``out`` unless
the run succeeds.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prunekit.calibration.data import load_text_tokens, read_text
from prunekit.core.errors import ConfigError
from prunekit.core.measure import versions
from prunekit.io.atomic import check_output_dir
from prunekit.io.loading import load_model
from prunekit.io.saving import save_causal_lm
from prunekit.reporting import new_figure, save_figure, write_report
from prunekit.reporting.model_card import (
    Metric,
    ModelCard,
    base_model_of,
    inherited_tags,
    prefer_hub_id,
    write_model_card,
)
from prunekit.training.lm_distill import LMDistillConfig, LMDistillResult, distill_lm

REPORT_DIR = "prunekit-report"


@dataclass
class DistillReport:
    """A distillation run (satisfies :class:`prunekit.reporting.Report`)."""

    command: str
    student: str
    teacher: str
    text: str
    config: dict[str, Any]
    result: LMDistillResult
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        r = self.result
        return (
            f"# Distillation of `{self.student}` from `{self.teacher}`\n\n"
            f"- {r.steps} steps, {r.tokens:,} tokens of `{self.text}` in {r.seconds:.1f} s"
            + (f" (resumed at step {r.resumed_from})" if r.resumed_from else "")
            + f"\n- held-out KL(teacher || student) per token: {r.kl_before:.4f} -> **{r.kl_after:.4f}**\n"
            f"- settings: {self.config}\n\nCommand: `{self.command}`\n\n## Versions\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in self.versions.items())
            + "\n"
        )

    def model_card(self, base_model: str, params: int, tags: list[str] | None = None) -> ModelCard:
        """The card of the distilled student (``params`` parameters; ``tags``: how the student was pruned)."""
        r = self.result
        summary = (
            f"A pruned `{base_model}` (the student `{self.student}`) recovered by prunekit with knowledge "
            f"distillation from `{self.teacher}`: {r.steps} steps, {r.tokens:,} tokens of "
            f"`{Path(self.text).name}`. The zeros (or removed structures) of the student are kept."
        )
        return ModelCard(
            base_model=base_model,
            method="distillation",
            kind="recovery",
            summary=summary,
            command=self.command,
            results=[
                Metric("held-out KL(teacher ‖ student) per token", r.kl_before, r.kl_after, ".4f"),
                Metric("parameters", params, params, ","),
            ],
            tags=list(tags or []),
        )

    def plot(self, path: Path) -> bool:
        fig = new_figure(7, 3)
        if fig is None or not self.result.losses:
            return False
        ax = fig.subplots()
        ax.plot(range(1, len(self.result.losses) + 1), self.result.losses, color="tab:blue")
        ax.set_xlabel("step")
        ax.set_ylabel("distillation loss")
        ax.set_title(f"KL on held-out windows {self.result.kl_before:.4f} -> {self.result.kl_after:.4f}")
        save_figure(fig, path)
        return True


def checkpoint_folder(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its resumable progress."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def run_distill(
    student: str,
    teacher: str,
    text: str,
    out: str,
    config: LMDistillConfig | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    dtype: str = "auto",
    progress: bool = True,
    command: str | None = None,
) -> DistillReport:
    """Distill ``teacher`` into ``student`` on ``text`` and save the student to ``out``; see the module docstring."""
    config = config or LMDistillConfig()
    check_output_dir(out, overwrite)
    read_text(text, what="distillation")
    folder = checkpoint_folder(out)
    if folder.exists() and not resume:
        if not overwrite:
            raise ConfigError(
                f"{str(folder)!r} holds the progress of an earlier run: --resume continues it, --overwrite starts over"
            )
        shutil.rmtree(folder)
    loaded_student = load_model(student, dtype=dtype)
    loaded_teacher = load_model(teacher, dtype=dtype)
    if loaded_student.tokenizer.get_vocab() != loaded_teacher.tokenizer.get_vocab():
        raise ConfigError(
            "the student and the teacher tokenize differently: distil a model from its own dense original"
        )
    tokens = load_text_tokens(loaded_student.tokenizer, text, what="distillation")
    result = distill_lm(
        loaded_student.model,
        loaded_teacher.model,
        tokens,
        config,
        checkpoint_dir=folder,
        resume=resume,
        progress=progress,
    )
    report = DistillReport(
        command=command if command is not None else shlex.join(sys.argv),
        student=loaded_student.source,
        teacher=loaded_teacher.source,
        text=str(text),
        config=config.model_dump(mode="json"),
        result=result,
        versions=versions(),
    )
    base = prefer_hub_id(base_model_of(student), base_model_of(teacher))
    params = sum(p.numel() for p in loaded_student.model.parameters())
    card = report.model_card(base, params, inherited_tags(student))

    def extra(tmp: Path) -> None:
        write_report(report, tmp / REPORT_DIR)
        write_model_card(card, tmp)

    save_causal_lm(loaded_student.model, loaded_student.tokenizer, out, overwrite, extra=extra)
    shutil.rmtree(folder, ignore_errors=True)
    return report
