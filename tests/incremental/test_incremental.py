"""Adapt-Pruner's incremental loop on a tiny Llama: sparsities by hand, the schedule, the exact budget at every
step, the more important layer pruned less, recovery lowering the KL, the input untouched."""

from __future__ import annotations

import pytest
import torch
import transformers

from models import sample_text, tiny_llama, tiny_tokenizer
from prunekit.calibration.data import tokenize_text
from prunekit.core.errors import ConfigError
from prunekit.incremental import IncrementalConfig, adaptive_sparsities, prune_incrementally, widths_for_sparsities
from prunekit.incremental.prune import _schedule
from prunekit.structured.llm.layer_widths import layer_layout
from prunekit.training.lm_distill import LMDistillConfig


def llama(layers: int = 4) -> transformers.PreTrainedModel:
    model = tiny_llama(layers)
    with torch.no_grad():  # a confident teacher: a random tiny model's next-token distribution is near uniform
        model.lm_head.weight.mul_(30.0)
    return model


def test_sparsities_spread_around_the_mean_by_importance() -> None:
    # centre 0.2, largest deviation 0.1: z = (-1, +1, 0); the most important layer is pruned least
    assert adaptive_sparsities([0.1, 0.3, 0.2], 0.2, 0.05) == pytest.approx([0.25, 0.15, 0.2])
    assert adaptive_sparsities([0.4, 0.4], 0.1, 0.05) == [0.1, 0.1]
    assert adaptive_sparsities([0.0, 1.0], 0.02, 0.05) == pytest.approx([0.07, 0.0])  # clipped at 0
    assert _schedule(0.25, 0.1) == pytest.approx([0.1, 0.2, 0.25])


def test_widths_meet_the_budget_and_never_grow() -> None:
    model = llama()
    layouts = [layer_layout(b, i) for i, b in enumerate(model.model.layers)]
    dense = tuple(layout.dense for layout in layouts)
    total = sum(p.numel() for p in model.parameters())
    fixed = total - sum(layout.params(d) for layout, d in zip(layouts, dense, strict=True))
    target = total - 6000
    genome = widths_for_sparsities(layouts, dense, [0.1, 0.3, 0.2, 0.05], fixed, target)
    kept = fixed + sum(layout.params(g) for layout, g in zip(layouts, genome, strict=True))
    assert target - layouts[0].channel_params < kept <= target
    assert all(u <= 2 and 1 <= c <= 64 for u, c in genome)
    assert genome[1][1] < genome[3][1]  # 30% of layer 1 goes, 5% of layer 3


def test_incremental_pruning_meets_every_step_and_recovery_lowers_the_kl() -> None:
    model = llama()
    model.model.layers[0].requires_grad_(False)  # partly frozen: the teacher keeps its flags
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    tokens = tokenize_text(tiny_tokenizer(), sample_text(20_000))
    calibration = tokens[: 6 * 32].reshape(6, 32)
    distill = LMDistillConfig(tokens=4 * 2 * 32, seqlen=32, batch_size=2, lr=1e-4, heldout_windows=2)
    config = IncrementalConfig(ratio=0.4, step=0.2, amplitude=0.05, distill=distill)
    result = prune_incrementally(model, calibration, tokens, config, progress=False)
    assert [s.removed for s in result.steps] == pytest.approx([0.2, 0.4])
    for step in result.steps:
        target = result.dense_params - round(step.removed * result.dense_params)
        assert target - 96 < step.params <= target  # to one MLP channel (3 x 32 parameters)
        assert step.kl_after < step.kl_before
        most, least = max(range(4), key=step.importance.__getitem__), min(range(4), key=step.importance.__getitem__)
        assert step.sparsities[most] < step.sparsities[least]
    assert sum(p.numel() for p in result.model.parameters()) == result.steps[-1].params
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags and not model.training


def test_increments_without_recovery_need_no_text() -> None:
    tokens = tokenize_text(tiny_tokenizer(), sample_text(20_000))
    calibration = tokens[: 4 * 32].reshape(4, 32)
    config = IncrementalConfig(ratio=0.3, step=0.15, recover=False)
    result = prune_incrementally(llama(), calibration, None, config, progress=False)
    assert [s.kl_before for s in result.steps] == [None, None]
    with pytest.raises(ConfigError, match="recovery distills on a text"):
        prune_incrementally(llama(), calibration, None, IncrementalConfig(ratio=0.3, step=0.15), progress=False)
    with pytest.raises(Exception, match="larger than the ratio"):
        IncrementalConfig(ratio=0.1, step=0.2)


def test_prunekit_adapt_prunes_in_steps_and_reports_them(tmp_path) -> None:
    import json

    import prunekit
    from models import save_tiny_checkpoint
    from prunekit.cli import main
    from prunekit.io.hub import read_card_metadata

    model_dir = save_tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(sample_text())
    out = tmp_path / "out"
    argv = ["-q", "adapt", str(model_dir), "--ratio", "0.3", "--step", "0.15", "--calib", str(tmp_path / "text.txt")]
    argv += ["--nsamples", "4", "--seqlen", "32", "--tokens-per-step", "128"]
    assert main([*argv, "--text", str(tmp_path / "text.txt"), "--out", str(out)]) == 0
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    assert [round(s["removed"], 2) for s in report["steps"]] == [0.15, 0.3]
    reloaded = prunekit.load_model(str(out)).model
    assert sum(p.numel() for p in reloaded.parameters()) == report["params"]
    card = read_card_metadata(out)
    assert card["base_model"] == str(model_dir)
    assert card["tags"] == ["pruned", "prunekit", "adapt-pruner", "structured", "distillation"]
    text = (out / "README.md").read_text()
    assert f"| parameters | {report['dense_params']:,} | {report['params']:,} |" in text
    assert main([*argv, "--out", str(tmp_path / "no-text")]) == 2  # recovery without --text: refused
    assert not (tmp_path / "no-text").exists()
