"""The one-shot report is a typed object whose JSON holds hand-checkable numbers for a tiny magnitude run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.oneshot import OneShotReport, PruneConfig, Recipe, prune
from prunekit.oneshot.report import build_report, write_report


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 8, bias=False)
        self.down = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


class TwoLinears(nn.Module):
    """One block of two linears in a stack, the shape the engine looks for."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def test_report_fields_json_and_markdown(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoLinears()
    config = PruneConfig(method="magnitude", sparsity=0.25, pattern="unstructured")
    result = prune(model, config, progress=False)
    recipe = Recipe.from_dict({"prune": {"method": "magnitude", "sparsity": 0.25}})
    report = build_report(recipe, result, command="prunekit prune --sparsity 0.25", model_source="toy")

    assert isinstance(report, OneShotReport)
    assert report.summary.layers == 2
    assert report.summary.overall_sparsity == pytest.approx(16 / 64)  # 8 of 32 weights in each layer
    assert [layer.name for layer in report.layers] == ["layers.0.up", "layers.0.down"]
    assert report.output.written_format is None and report.output.size_bytes is None

    folder = write_report(report, tmp_path / "report")
    data = json.loads((folder / "report.json").read_text())
    assert data["summary"]["layers"] == 2 and data["summary"]["overall_sparsity"] == pytest.approx(0.25)
    assert data["method"] == "magnitude" and data["pattern"] == "unstructured 25% per row" and data["model"] == "toy"
    assert data["calibration"] == {"windows": 0, "seqlen": 0}
    assert data["perplexity"] == {"before": None, "after": None}
    assert data["output"] == {"dir": None, "save_format": "dense", "written_format": None, "size_bytes": None}
    assert [layer["shape"] for layer in data["layers"]] == [[8, 4], [4, 8]]
    assert data["recipe"]["prune"]["sparsity"] == 0.25
    markdown = (folder / "report.md").read_text()
    assert "overall sparsity of 2 target layers: 25.0000%" in markdown
    assert "| layers.0.up | 8x4 | magnitude | 0.2500 |" in markdown
