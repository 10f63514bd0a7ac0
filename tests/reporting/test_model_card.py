"""Model cards: the Hub's ``README.md`` format (YAML front matter that ``yaml.safe_load`` reads back, then
Markdown), filled from a run's report with its exact numbers; and written by the real ``prune`` and
``structured`` commands into their output directories, atomically with the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from torch import nn

from models import sample_text, save_tiny_checkpoint
from prunekit.cli import main
from prunekit.eval.perplexity import PerplexityResult
from prunekit.io.hub import BUNDLED_HUB_ID, parse_front_matter, read_card_metadata
from prunekit.oneshot import PruneConfig, Recipe, prune
from prunekit.oneshot.report import build_report, model_card
from prunekit.reporting.model_card import (
    Metric,
    ModelCard,
    base_model_of,
    inherited_tags,
    lineage,
    prefer_hub_id,
    write_model_card,
)


def front_matter(text: str) -> dict:
    """The YAML between the first two ``---`` lines, parsed with ``yaml.safe_load``."""
    assert text.startswith("---\n")
    header, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(header)


def table(text: str) -> dict[str, tuple[str, str]]:
    """The results table: metric -> (before, after) cells."""
    body = text.split("## Results\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert body[:2] == ["| | before | after |", "|---|---|---|"]
    rows = (re.split(r"(?<!\\)\|", row) for row in body[2:])  # cells split at the unescaped pipes
    return {cells[1].strip(): (cells[2].strip(), cells[3].strip()) for cells in rows}


def test_card_header_is_yaml_the_hub_reads_and_the_body_holds_the_table() -> None:
    card = ModelCard(
        base_model="org/base-model",
        method="wanda",
        kind="2:4",
        summary="What was done.",
        command="prunekit prune org/base-model --pattern 2:4",
        results=[
            Metric("perplexity", 12.3456, 14.5, ".3f"),
            Metric("parameters", 1234567, 1000000, ","),
            Metric("sparsity | zeros", None, 0.5, ".2%"),
            Metric("speed-up", None, "x1.50"),
        ],
        tags=["extra", "wanda"],
    )
    text = card.to_markdown()
    assert front_matter(text) == {
        "base_model": "org/base-model",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["pruned", "prunekit", "wanda", "2:4", "extra"],  # "2:4" stays a string (YAML 1.1: 124)
    }
    assert parse_front_matter(text) == front_matter(text)
    assert "\n# base-model, pruned (wanda, 2:4)\n\nWhat was done.\n" in text
    assert "```bash\nprunekit prune org/base-model --pattern 2:4\n```" in text
    assert table(text) == {
        "perplexity": ("12.346", "14.500"),
        "parameters": ("1,234,567", "1,000,000"),
        "sparsity \\| zeros": ("–", "50.00%"),
        "speed-up": ("–", "x1.50"),
    }
    assert 'AutoModelForCausalLM.from_pretrained("ORG/NAME")' in text


def test_write_model_card_adds_the_weights_size_the_loader_and_the_report_link(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "prunekit-report").mkdir()
    (tmp_path / "prunekit-report" / "report.md").write_text("# report\n")
    card = ModelCard("org/m", "magnitude", "unstructured", "Done.", weights_bytes_before=6 * 2**20)
    path = write_model_card(card, tmp_path)
    assert path == tmp_path / "README.md"
    text = path.read_text()
    assert table(text) == {"weights on disk (MiB)": ("6.0", "3.0")}
    assert "[prunekit-report/report.md](prunekit-report/report.md)" in text
    assert "transformers import AutoModelForCausalLM" in text
    (tmp_path / "prunekit_structure.json").write_text("{}")  # a structurally pruned layout: prunekit loads it
    text = write_model_card(card, tmp_path).read_text()
    assert 'prunekit.load_model("DIR")' in text and "AutoModelForCausalLM" not in text


def test_base_model_is_the_hub_id_the_bundled_name_or_the_original_behind_a_prunekit_directory(
    tmp_path: Path,
) -> None:
    assert base_model_of(None) == base_model_of("smollm2") == base_model_of("Default") == BUNDLED_HUB_ID
    assert BUNDLED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_of("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert lineage("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert base_model_of(str(plain)) == str(plain) and lineage(plain) == (str(plain), None)
    downloaded = tmp_path / "downloaded"  # a Hub download carries the card of its own author: not followed
    downloaded.mkdir()
    (downloaded / "README.md").write_text("---\nbase_model: org/its-base\ntags: [chat]\n---\n# x\n")
    assert base_model_of(str(downloaded)) == str(downloaded) and inherited_tags(downloaded) == []
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    write_model_card(ModelCard(BUNDLED_HUB_ID, "wanda", "2:4", "Done."), pruned)
    assert base_model_of(str(pruned)) == BUNDLED_HUB_ID
    assert lineage(str(pruned)) == (BUNDLED_HUB_ID, str(pruned))
    assert inherited_tags(str(pruned)) == ["wanda", "2:4"]
    assert prefer_hub_id(str(plain), "org/teacher") == "org/teacher"
    assert prefer_hub_id(str(plain), str(downloaded)) == str(plain)


class TwoLinears(nn.Module):
    """One block of two linears in a stack, the shape the engine looks for."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 4, bias=False))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def test_the_one_shot_card_carries_the_numbers_of_its_report() -> None:
    torch.manual_seed(0)
    result = prune(TwoLinears(), PruneConfig(method="magnitude", sparsity=0.25), progress=False)
    recipe = Recipe.from_dict({"prune": {"method": "magnitude", "sparsity": 0.25}})
    report = build_report(
        recipe,
        result,
        ppl_before=PerplexityResult(10.0, windows=4, seqlen=128, tokens_scored=508, seconds=1.0, source="a/t.txt"),
        ppl_after=PerplexityResult(11.25, windows=4, seqlen=128, tokens_scored=508, seconds=1.0, source="a/t.txt"),
        command="prunekit prune toy --sparsity 0.25",
        model_source="toy",
    )
    card = model_card(report, "org/toy")
    text = card.to_markdown()
    assert front_matter(text)["tags"] == ["pruned", "prunekit", "magnitude", "unstructured"]
    assert front_matter(text)["base_model"] == "org/toy"
    assert table(text) == {
        "perplexity on t.txt, 4 x 128 tokens": ("10.000", "11.250"),
        "sparsity of the target layers": ("–", "25.00%"),
    }
    assert "with **magnitude** to the **unstructured 25% per row** pattern: 25.00% of the weights of its 2" in text
    assert "```bash\nprunekit prune toy --sparsity 0.25\n```" in text
    recipe_yaml = text.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(recipe_yaml) == report.recipe  # the recipe reruns the job
    assert "`prunekit prune --recipe recipe.yaml`" in text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cards")
    save_tiny_checkpoint(root / "tiny", "llama")
    text = sample_text()
    (root / "calib.txt").write_text(text[: len(text) // 2])
    (root / "ppl.txt").write_text(text[len(text) // 2 :])
    return root


def test_prune_writes_the_card_into_its_output_directory(workspace: Path) -> None:
    model, out = str(workspace / "tiny"), workspace / "wanda24"
    calib = ["--calib", str(workspace / "calib.txt"), "--nsamples", "4", "--seqlen", "32"]
    ppl = ["--ppl", str(workspace / "ppl.txt"), "--ppl-seqlen", "64", "--ppl-windows", "2"]
    argv = ["-q", "prune", model, "--method", "wanda", "--pattern", "2:4", *calib, *ppl, "--out", str(out)]
    assert main(argv) == 0
    text = (out / "README.md").read_text()
    assert front_matter(text) == {
        "base_model": model,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["pruned", "prunekit", "wanda", "2:4"],
    }
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    before, after = report["perplexity"]["before"], report["perplexity"]["after"]
    assert table(text) == {
        "perplexity on ppl.txt, 2 x 64 tokens": (f"{before['perplexity']:.3f}", f"{after['perplexity']:.3f}"),
        "sparsity of the target layers": ("–", "50.00%"),
        "mean relative reconstruction error": ("–", f"{report['summary']['mean_relative_error']:.4f}"),
        "weights on disk (MiB)": ("–", f"{report['output']['size_bytes'] / 2**20:.1f}"),
    }
    assert f"```bash\nprunekit {' '.join(argv)}\n```" in text
    assert transformers.AutoModelForCausalLM.from_pretrained(out) is not None  # the card does not disturb loading

    # pruned again from that directory (its report elsewhere): the card still names the original
    again, reports = workspace / "again", workspace / "again-report"
    argv = ["-q", "prune", str(out), "--method", "magnitude", "--sparsity", "0.6", "--out", str(again)]
    assert main([*argv, "--report", str(reports)]) == 0
    card = read_card_metadata(again)
    assert card["base_model"] == model and card["tags"] == ["pruned", "prunekit", "magnitude", "unstructured"]
    text = (again / "README.md").read_text()
    assert f"It was pruned from `{out}`, itself derived from `{model}` by prunekit." in text
    assert not (again / "prunekit-report").exists() and "The full report" not in text
    size = json.loads((reports / "report.json").read_text())["output"]["size_bytes"]
    assert table(text)["weights on disk (MiB)"] == ("–", f"{size / 2**20:.1f}")


def test_structured_writes_the_card_into_its_output_directory(workspace: Path) -> None:
    model, out = str(workspace / "tiny"), workspace / "width"
    calib = ["--calib", str(workspace / "calib.txt"), "--nsamples", "4", "--seqlen", "32"]
    argv = ["-q", "structured", model, "--ratio", "0.3", *calib, "--out", str(out)]
    assert main(argv) == 0
    text = (out / "README.md").read_text()
    assert front_matter(text) == {
        "base_model": model,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["pruned", "prunekit", "width-pruning", "structured"],
    }
    s = json.loads((out / "prunekit-report" / "report.json").read_text())["summary"]
    rows = table(text)
    assert rows["parameters"] == (f"{s['params_before']:,}", f"{s['params_after']:,}")
    assert rows["latency of a forward pass (ms)"] == (
        f"{1e3 * s['latency_before_s']:.2f}",
        f"{1e3 * s['latency_after_s']:.2f}",
    )
    assert rows["speed-up"] == ("–", f"x{s['speedup']:.2f}")
    assert rows["weights on disk (MiB)"][0] == f"{s['bytes_before'] / 2**20:.1f}"
    assert f"{s['params_before']:,} -> {s['params_after']:,} parameters" in text
    assert f"```bash\nprunekit {' '.join(argv)}\n```" in text
    recipe = yaml.safe_load(text.split("```yaml\n", 1)[1].split("\n```", 1)[0])
    assert recipe["ratio"] == 0.3 and recipe["model"] == model and recipe["mode"] == "width"
