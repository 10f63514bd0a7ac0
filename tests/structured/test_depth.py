"""Depth pruning: which blocks are removable, Block Influence by hand, removal leaving outputs unchanged when
a block's branch is zero, save and rebuild, and the combined depth + width target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.core.errors import StructuralPruningError
from prunekit.io.pruned import load_pruned, save_pruned
from prunekit.structured import prune_structurally
from prunekit.structured.depth import block_influence, prune_depth, removable_blocks, remove_blocks


class Residual(nn.Module):
    def __init__(self, width: int, relu_after: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu_after = relu_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y) if self.relu_after else y


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = Residual(8, relu_after=True)  # its input is post-ReLU: relu(x + 0) = x
        self.block2 = Residual(8, relu_after=True)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)  # changes the shape: never removable
        self.block3 = Residual(16, relu_after=False)  # its input is a conv's output, of both signs
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.stem(x))))
        x = self.block3(self.down(x))
        return self.fc(x.mean((2, 3)))


def model_with_silent_block1() -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    with torch.no_grad():  # block1's branch ends in a batch norm with zero scale and shift: it outputs 0
        model.block1.bn2.weight.zero_()
        model.block1.bn2.bias.zero_()
    return model


def test_block_influence_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # orthogonal (cos 0), then parallel (cos 1)
    assert block_influence(x, y) == pytest.approx(0.5)
    assert block_influence(x, x) == pytest.approx(0.0, abs=1e-7)


def test_exactly_the_residual_blocks_are_removable():
    model = model_with_silent_block1()
    x = torch.randn(2, 3, 8, 8)
    blocks = removable_blocks(model, (x,))
    assert list(blocks) == ["block1", "block2", "block3"]  # not down, stem, fc, nor any conv or BN inside
    assert blocks["block1"] == pytest.approx(0.0, abs=1e-6) and blocks["block2"] > 0.0


def test_a_dead_input_does_not_make_a_layer_look_removable():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()  # the BN and the last conv see all-zero inputs, which a zeroed layer also returns
    assert removable_blocks(model, (torch.randn(1, 3, 4, 4),)) == {}


def test_removing_a_block_whose_branch_is_zero_leaves_outputs_unchanged():
    model = model_with_silent_block1()
    x = torch.randn(2, 3, 8, 8)
    result = prune_depth(model, (x,), 1)
    assert result.removed == ["block1"] and isinstance(result.model.block1, nn.Identity)
    assert isinstance(model.block1, type(model.block2))  # the input model is untouched
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


def test_save_then_rebuild_a_model_without_blocks(tmp_path):
    model = model_with_silent_block1()
    x = torch.randn(1, 3, 8, 8)
    pruned = prune_structurally(model, (x,), 0.5, blocks=1).model
    save_pruned(pruned, tmp_path / "out")
    rebuilt = load_pruned(TinyResNet().eval(), tmp_path / "out")
    assert isinstance(rebuilt.block1, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x))


def test_depth_then_width_reaches_the_mac_target_of_the_original():
    model = model_with_silent_block1()
    x = torch.randn(1, 3, 8, 8)

    def macs(m: nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            m(x)
        return counter.get_total_flops() // 2

    result = prune_structurally(model, (x,), 0.6, target="macs", blocks=1)
    assert result.removed_blocks == ["block1"]
    assert 0.35 < macs(result.model) / macs(model) <= 0.4


def test_bad_block_requests_are_refused():
    model = model_with_silent_block1()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(StructuralPruningError, match="has 3 removable ones"):
        prune_depth(model, (x,), 4)
    with pytest.raises(StructuralPruningError, match="remove fewer blocks"):
        prune_structurally(model, (x,), 0.1, target="macs", blocks=3)
    with pytest.raises(StructuralPruningError, match="no block 'nothing'"):
        remove_blocks(model, ["nothing"])


def test_the_report_counts_the_original_and_the_removed_layers():
    from prunekit.structured.report import render_markdown, structural_report

    model = model_with_silent_block1()
    x = torch.randn(1, 3, 8, 8)
    result = prune_structurally(model, (x,), 0.5, target="params", blocks=1)
    report = structural_report(model, result, (x,), measure_latency=False)
    s = report.summary
    assert s["params_before"] == sum(p.numel() for p in model.parameters())
    assert s["params_after"] == sum(p.numel() for p in result.model.parameters()) <= s["params_before"] / 2
    rows = {r["layer"]: r for r in report.layers}
    assert rows["block1.conv1"]["out_kept"] == 0 and rows["block2.conv1"]["out_kept"] > 0
    assert "Blocks removed whole: block1." in render_markdown(report)


def test_the_structured_config_refuses_vision_only_options_for_language_models(tmp_path):
    from prunekit.core.errors import ConfigError
    from prunekit.structured.config import StructuredConfig

    with pytest.raises(ConfigError, match="--blocks must be >= 0"):
        StructuredConfig(out=str(tmp_path / "a"), blocks=-1)
    with pytest.raises(ConfigError, match="--mode depth"):
        StructuredConfig(out=str(tmp_path / "b"), blocks=2)
    with pytest.raises(ConfigError, match="--prune-hidden"):
        StructuredConfig(out=str(tmp_path / "c"), keep_streams=True)
    with pytest.raises(ConfigError, match="--policy and --target latency are for --torchvision"):
        StructuredConfig(out=str(tmp_path / "d"), policy="latency", target="macs")
    with pytest.raises(ConfigError, match="--policy and --target latency are for --torchvision"):
        StructuredConfig(out=str(tmp_path / "e"), target="latency")
    assert not any((tmp_path / name).exists() for name in "abcde")
