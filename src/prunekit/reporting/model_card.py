"""Model cards: the ``README.md`` the Hugging Face Hub shows for a model, written into every causal-LM directory
prunekit saves (into the same temporary folder as the weights, so that it lands atomically with them).

A card is YAML front matter (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``), dumped with
``yaml.safe_dump``, and a Markdown body: one paragraph on what was done, the command (and recipe) that did it, a
table of results before and after, and how to load the model. Each pipeline fills a :class:`ModelCard` from its
own report; this module holds what they share: rendering (:meth:`ModelCard.to_markdown`), writing
(:func:`write_model_card`, which adds the size of the weights and how to load them), and naming the base model
(:func:`base_model_of`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from prunekit.io.compressed import DENSE, checkpoint_format, checkpoint_size_bytes
from prunekit.io.hub import BUNDLED_HUB_ID, CARD_FILE, is_hub_id, read_card_metadata
from prunekit.io.loading import BUNDLED_NAMES
from prunekit.io.pruned import STRUCTURE_FILE
from prunekit.reporting.writer import MARKDOWN_FILE

__all__ = [
    "CARD_FILE",
    "Metric",
    "ModelCard",
    "base_model_of",
    "lineage",
    "perplexity_metric",
    "write_model_card",
]

#: The tags of every card prunekit writes (before the method and the kind).
TAGS = ("pruned", "prunekit")
#: Where the pipelines put their report inside the model directory.
REPORT_DIR = "prunekit-report"
#: A table cell for something not measured.
NOT_MEASURED = "–"
MIB = 2**20


@dataclass(frozen=True)
class Metric:
    """One row of the results table: a measurement ``before`` and ``after`` (``None``: not measured) and the
    format spec of its numbers (``".3f"``, ``","``, ``".2%"``); a string is shown as it is."""

    name: str
    before: float | str | None = None
    after: float | str | None = None
    spec: str = ""

    def cells(self) -> tuple[str, str]:
        """The ``before`` and ``after`` cells as the table shows them."""
        return _cell(self.before, self.spec), _cell(self.after, self.spec)


def _cell(value: float | str | None, spec: str) -> str:
    if value is None:
        return NOT_MEASURED
    return value if isinstance(value, str) else format(value, spec)


def perplexity_metric(
    before: float | None, after: float | None, source: str | None = None, windows: int | None = None, seqlen: int = 0
) -> Metric:
    """The perplexity row: ``source`` is the text's path (its file name is shown), with the windows measured."""
    where = f" on {Path(source).name}" if source else ""
    if windows:
        where += f", {windows} x {seqlen} tokens"
    return Metric(f"perplexity{where}", before, after, ".3f")


@dataclass
class ModelCard:
    """What the Hub's model card of a pruned model says; :meth:`to_markdown` is the ``README.md``."""

    #: the source model: a Hub id (the bundled default: ``HuggingFaceTB/SmolLM2-135M-Instruct``) or a path
    base_model: str
    #: the method (a tag): ``wanda``, ``width-pruning``, ``reap``, ``distillation``...
    method: str
    #: the pattern or kind (a tag): ``unstructured``, ``2:4``, ``structured``, ``expert-pruning``...
    kind: str
    #: one paragraph on what was done
    summary: str
    #: the model actually pruned, when it is not ``base_model`` itself (a directory prunekit wrote from it)
    derived_from: str | None = None
    #: the command line that produced the model, when known
    command: str | None = None
    #: the run's recipe (YAML-able), and the command that runs it saved as ``recipe.yaml``
    recipe: dict[str, Any] | None = None
    recipe_command: str | None = None
    results: list[Metric] = field(default_factory=list)
    #: tags beyond ``pruned``, ``prunekit``, the method and the kind
    tags: list[str] = field(default_factory=list)
    #: the weights' bytes before pruning, when known (the size after is measured by :func:`write_model_card`)
    weights_bytes_before: int | None = None
    #: ``transformers`` (plain ``from_pretrained`` loads it) or ``prunekit`` (``prunekit.load_model`` does)
    loader: str = "transformers"
    #: the full report's Markdown, relative to the card
    report: str | None = None

    def all_tags(self) -> list[str]:
        """``pruned``, ``prunekit``, the method, the kind and the other tags, each once, in that order."""
        return list(dict.fromkeys(t for t in (*TAGS, self.method, self.kind, *self.tags) if t))

    def metadata(self) -> dict[str, Any]:
        """The front matter, as a mapping."""
        return {
            "base_model": self.base_model,
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": self.all_tags(),
        }

    def to_markdown(self) -> str:
        """The card: ``---``, the YAML front matter, ``---``, then the Markdown body."""
        header = yaml.safe_dump(self.metadata(), sort_keys=False, allow_unicode=True)
        name = self.base_model.rstrip("/").rsplit("/", 1)[-1] or self.base_model
        lines = ["---", header.rstrip("\n"), "---", "", f"# {name}, pruned ({self.method}, {self.kind})", ""]
        lines += [self.summary, ""]
        if self.derived_from:
            lines += [
                f"It was pruned from `{self.derived_from}`, itself derived from `{self.base_model}` by prunekit.",
                "",
            ]
        if self.command or self.recipe:
            lines += ["## Reproduce", ""]
        if self.command:
            lines += ["```bash", self.command, "```", ""]
        if self.recipe:
            run = f": `{self.recipe_command}`" if self.recipe_command else ""
            lines += [
                "<details><summary>Recipe (save as recipe.yaml" + (f" and run{run}" if run else "") + ")</summary>",
                "",
                "```yaml",
                yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True).rstrip("\n"),
                "```",
                "",
                "</details>",
                "",
            ]
        if self.results:
            lines += ["## Results", "", "| | before | after |", "|---|---|---|"]
            for metric in self.results:
                before, after = metric.cells()
                lines.append(f"| {_escape(metric.name)} | {_escape(before)} | {_escape(after)} |")
            lines.append("")
        lines += ["## Use", "", *_usage(self.loader)]
        if self.report:
            lines += ["", f"The full report of the run: [{self.report}]({self.report})."]
        return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _usage(loader: str) -> list[str]:
    if loader == "prunekit":
        return [
            "The pruned layers are stored in a form plain `transformers` does not read; prunekit rebuilds the model "
            "from a local copy (`hf download ORG/NAME --local-dir DIR`):",
            "",
            "```python",
            "import prunekit",
            "",
            'loaded = prunekit.load_model("DIR")  # .model, .tokenizer',
            "```",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("ORG/NAME")  # this repository, or a local copy',
        'tokenizer = AutoTokenizer.from_pretrained("ORG/NAME")',
        "```",
    ]


def base_model_of(source: str | os.PathLike[str] | None) -> str:
    """The ``base_model`` of a model pruned from ``source`` (a model argument as the user gave it): the bundled
    default's Hub id for ``None``/``smollm2``/``default``; for a directory prunekit wrote, the base model its own
    card names (so a model pruned again, or distilled, still points at the original); otherwise ``source``."""
    if source is None:
        return BUNDLED_HUB_ID
    text = os.fspath(source)
    path = Path(text).expanduser()
    if text.lower() in BUNDLED_NAMES and not path.exists():
        return BUNDLED_HUB_ID
    return _prunekit_base(path) or text


def _prunekit_base(path: Path) -> str | None:
    """The base model named by the card prunekit wrote into the directory ``path``; ``None`` for anything else
    (no directory, no card, or a card prunekit did not write, such as a downloaded model's own)."""
    if not path.is_dir():
        return None
    card = read_card_metadata(path)
    base, tags = card.get("base_model"), card.get("tags")
    return base if isinstance(base, str) and base and isinstance(tags, list) and TAGS[1] in tags else None


def lineage(source: str | os.PathLike[str] | None) -> tuple[str, str | None]:
    """``(base_model, derived_from)`` of a model pruned from ``source``: :func:`base_model_of`, and ``source``
    itself when that is a directory prunekit wrote (its card names the base model), else ``None``."""
    if source is not None and _prunekit_base(Path(source).expanduser()):
        return base_model_of(source), os.fspath(source)
    return base_model_of(source), None


def prefer_hub_id(*candidates: str) -> str:
    """The first candidate that is a Hub id (or the first one, when none is)."""
    return next((c for c in candidates if is_hub_id(c)), candidates[0])


def inherited_tags(source: str | os.PathLike[str] | None) -> list[str]:
    """The tags of the prunekit card in the directory ``source`` beyond ``pruned`` and ``prunekit`` (the method
    and pattern it was pruned with); empty for anything else."""
    if source is None or not _prunekit_base(Path(source).expanduser()):
        return []
    return [str(t) for t in read_card_metadata(Path(source).expanduser())["tags"] if t not in TAGS]


def write_model_card(card: ModelCard, folder: str | os.PathLike[str]) -> Path:
    """Write ``card`` as ``README.md`` into the model directory ``folder`` (written already: the card adds the
    size of its weight files, how to load them, and a link to ``prunekit-report/report.md`` when there is one);
    returns the file. Pipelines call it on their temporary folder, before the atomic rename."""
    folder = Path(folder)
    needs_prunekit = (folder / STRUCTURE_FILE).is_file() or checkpoint_format(folder) != DENSE
    size = Metric(
        "weights on disk (MiB)",
        None if card.weights_bytes_before is None else card.weights_bytes_before / MIB,
        checkpoint_size_bytes(folder) / MIB,
        ".1f",
    )
    report = f"{REPORT_DIR}/{MARKDOWN_FILE}"
    card = replace(
        card,
        results=[*card.results, size],
        loader="prunekit" if needs_prunekit else "transformers",
        report=report if (folder / report).is_file() else None,
    )
    path = folder / CARD_FILE
    path.write_text(card.to_markdown())
    return path
