"""One-shot pruning inside mixture-of-experts layers: every expert's matrices are targets, with statistics from
its own routed tokens, and every MoE family saves and reloads with plain transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import prunekit
from models import (
    EXPERTS,
    HIDDEN,
    MOE_FAMILIES,
    TOY_VOCAB,
    WIDTH,
    MoeOnly,
    moe_only,
    never_routed_to_last_expert,
    sample_text,
    save_tiny_checkpoint,
    tiny_model,
)
from prunekit.cli import main
from prunekit.core.errors import TargetError
from prunekit.io.saving import save_pretrained
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.experts import ExpertMatrix, fused_layout, router_linears
from prunekit.models.targets import find_targets
from prunekit.oneshot import prune_checkpoint


def keep_half_per_row(scores: torch.Tensor) -> torch.Tensor:
    """The keep-mask of the larger half of each row (by hand: sort, take the top half)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    top = scores.argsort(dim=1, descending=True)[:, : scores.shape[1] - scores.shape[1] // 2]
    return keep.scatter_(1, top, True)


def expected_wanda_masks(model: MoeOnly, ids: torch.Tensor, weighted: bool) -> dict[tuple[int, str], torch.Tensor]:
    """Wanda's keep-masks of every expert's matrices computed by hand: route every token as Mixtral does
    (softmax, top-k, renormalise); per expert, the input column norms over its routed tokens only (each
    scaled by its routing weight when ``weighted``), score ``|W_ij| * ||X_j||``, keep the best half of
    each row. The down matrix's inputs are ``silu(gate x) * up x`` of the dense expert."""
    experts = model.layers[0].mlp.experts
    router = model.layers[0].mlp.gate.weight
    with torch.no_grad():
        x = model.embed(ids).reshape(-1, HIDDEN)
        probs = torch.softmax(x @ router.t(), dim=-1)
        top_w, top_i = probs.topk(2, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        masks = {}
        for e in range(EXPERTS):
            routed = (top_i == e).any(-1)
            g = (top_w * (top_i == e)).sum(-1)[routed] if weighted else torch.ones(int(routed.sum()))
            xe = x[routed]
            gate_w, up_w = experts.gate_up_proj[e, :WIDTH], experts.gate_up_proj[e, WIDTH:]
            down_w = experts.down_proj[e]
            h = torch.nn.functional.silu(xe @ gate_w.t()) * (xe @ up_w.t())
            norm_x = (g[:, None] * xe).pow(2).sum(0).sqrt()
            norm_h = (g[:, None] * h).pow(2).sum(0).sqrt()
            masks[(e, "gate")] = keep_half_per_row(gate_w.abs() * norm_x)
            masks[(e, "up")] = keep_half_per_row(up_w.abs() * norm_x)
            masks[(e, "down")] = keep_half_per_row(down_w.abs() * norm_h)
    return masks


@pytest.mark.parametrize("weighted", [True, False])
def test_per_expert_wanda_keeps_the_weights_computed_by_hand(weighted: bool) -> None:
    model = moe_only()
    ids = torch.randint(0, TOY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    expected = expected_wanda_masks(model, ids, weighted)
    config = prunekit.PruneConfig(method="wanda", sparsity=0.5, routing_weighted=weighted, expert_min_tokens=0)
    result = prunekit.prune(model, config, ids, progress=False)
    experts = result.model.layers[0].mlp.experts
    for e in range(EXPERTS):
        assert torch.equal(experts.gate_up_proj[e, :WIDTH] != 0, expected[(e, "gate")]), (e, "gate")
        assert torch.equal(experts.gate_up_proj[e, WIDTH:] != 0, expected[(e, "up")]), (e, "up")
        assert torch.equal(experts.down_proj[e] != 0, expected[(e, "down")]), (e, "down")
    # the kept weights are the dense ones, untouched
    dense = model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(experts.gate_up_proj[experts.gate_up_proj != 0], dense[experts.gate_up_proj != 0])
    rows = {layer.name: layer for layer in result.layers}
    routed_tokens = [rows[f"layers.0.mlp.experts.{e}.gate_proj"].calibration_tokens for e in range(EXPERTS)]
    assert sum(routed_tokens) == ids.numel() * 2  # top-2: every token reaches two experts
    assert torch.equal(result.model.layers[0].mlp.gate.weight, model.layers[0].mlp.gate.weight)  # router dense


@pytest.mark.parametrize("policy", ["magnitude", "dense"])
def test_an_expert_no_token_reaches_is_reported_and_handled_as_asked(policy: str) -> None:
    model = moe_only()
    never_routed_to_last_expert(model)
    ids = torch.randint(0, TOY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    config = prunekit.PruneConfig(method="wanda", underused_experts=policy)
    result = prunekit.prune(model, config, ids, progress=False)
    last = [layer for layer in result.layers if layer.expert == EXPERTS - 1]
    assert [layer.calibration_tokens for layer in last] == [0, 0, 0]
    assert all("0 routed calibration tokens < expert_min_tokens=16" in layer.note for layer in last)
    pruned, dense = result.model.layers[0].mlp.experts, model.layers[0].mlp.experts
    if policy == "dense":
        assert all(layer.method == "dense" and layer.sparsity == 0.0 for layer in last)
        assert torch.equal(pruned.gate_up_proj[-1], dense.gate_up_proj[-1])
        assert torch.equal(pruned.down_proj[-1], dense.down_proj[-1])
    else:
        assert all(layer.method == "magnitude" and layer.sparsity == 0.5 for layer in last)
        w = dense.down_proj[-1]
        assert torch.equal(pruned.down_proj[-1] != 0, keep_half_per_row(w.abs()))
    others = [layer for layer in result.layers if layer.expert != EXPERTS - 1]
    assert all(layer.method == "wanda" and not layer.note for layer in others)


def test_expert_matrices_are_views_named_per_expert() -> None:
    model = moe_only()
    blocks_name, _ = find_decoder_blocks(model)
    targets = find_targets(model, blocks_name)
    assert [t.name for t in targets[:3]] == [
        "layers.0.mlp.experts.0.gate_proj",
        "layers.0.mlp.experts.0.up_proj",
        "layers.0.mlp.experts.0.down_proj",
    ]
    assert len(targets) == EXPERTS * 3 and [t.expert for t in targets[::3]] == list(range(EXPERTS))
    experts = model.layers[0].mlp.experts
    up = targets[4].module
    assert isinstance(up, ExpertMatrix) and targets[4].shape == (WIDTH, HIDDEN)
    assert up.matrix().data_ptr() == experts.gate_up_proj[1, WIDTH:].data_ptr()  # a view, not a copy
    assert dict(model.named_parameters()).keys() == {"embed.weight", "layers.0.mlp.gate.weight"} | {
        "layers.0.mlp.experts.gate_up_proj",
        "layers.0.mlp.experts.down_proj",
    }


def test_transposed_interleaved_layout_views_the_right_entries() -> None:
    """GPT-OSS stores ``gate_up_proj`` as ``(E, H, 2I)`` with gate and up interleaved by column."""
    model = tiny_model("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    layout = fused_layout(experts)
    assert layout is not None and layout.transposed and not layout.concatenated and layout.has_bias
    gate = ExpertMatrix(experts, layout, 2, "gate").matrix()
    up = ExpertMatrix(experts, layout, 2, "up").matrix()
    down = ExpertMatrix(experts, layout, 2, "down").matrix()
    assert torch.equal(gate, experts.gate_up_proj[2][:, 0::2].t())
    assert torch.equal(up, experts.gate_up_proj[2][:, 1::2].t())
    assert torch.equal(down, experts.down_proj[2].t())
    assert gate.shape == (32, 32) and down.shape == (32, 32)


def test_linear_routers_are_not_targets() -> None:
    model = tiny_model("qwen2_moe")
    routers = router_linears(model)
    assert routers == {"model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"}
    blocks_name, _ = find_decoder_blocks(model)
    names = [t.name for t in find_targets(model, blocks_name)]
    assert not routers & set(names)
    assert "model.layers.0.mlp.shared_expert.down_proj" in names


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_moe_family_prunes_its_experts_saves_and_reloads(
    family: str, tokenizer: Any, calibration: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model(family)
    result = prunekit.prune(model, prunekit.PruneConfig(method="wanda", sparsity=0.5), calibration, progress=False)
    pruned = result.model
    stacked = {n: p for n, p in pruned.named_parameters() if p.dim() == 3}
    assert stacked, "a MoE family stores its experts as 3-D parameters"
    for name, tensor in stacked.items():
        assert float((tensor == 0).float().mean()) == pytest.approx(0.5), name
    assert any(layer.expert is not None for layer in result.layers)
    assert result.overall_sparsity == pytest.approx(0.5)

    out = save_pretrained(pruned, tokenizer, tmp_path / family)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for name, tensor in pruned.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(pruned(calibration[:2]).logits, reloaded(calibration[:2]).logits)


def test_sparsegpt_and_two_four_inside_experts(calibration: torch.Tensor) -> None:
    config = prunekit.PruneConfig(method="sparsegpt", pattern="2:4", block_size=16)
    result = prunekit.prune(tiny_model("mixtral"), config, calibration, progress=False)
    experts = result.model.model.layers[1].mlp.experts
    groups = (experts.down_proj != 0).reshape(-1, 4).sum(-1)
    assert torch.equal(groups, torch.full_like(groups, 2))
    assert all(layer.relative_error is not None for layer in result.layers if layer.calibration_tokens >= 16)


def test_an_expert_layout_the_view_does_not_reproduce_is_refused(
    calibration: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = MixtralExperts.forward
    monkeypatch.setattr(MixtralExperts, "forward", lambda self, *args: 2 * forward(self, *args))
    with pytest.raises(TargetError, match=r"experts of 'model.layers.0.mlp.experts'.*not reproduce"):
        prunekit.prune(tiny_model("mixtral"), prunekit.PruneConfig(method="wanda"), calibration, progress=False)


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.bank = nn.Parameter(torch.ones(2, 4, 4))  # 3-D but not a known experts layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + x @ self.bank[0]


def test_an_unknown_stacked_parameter_is_refused_not_left_dense() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([Stacked(), Stacked()])
    with pytest.raises(TargetError, match=r"cannot see as matrices \(layers.0.bank, layers.1.bank\).*--include"):
        find_targets(model, "layers")
    assert [t.name for t in find_targets(model, "layers", include=["proj"])] == ["layers.0.proj", "layers.1.proj"]


def test_cli_prunes_experts_and_reports_underused_ones(tmp_path: Path) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "mixtral")
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text())
    out = tmp_path / "out"
    argv = ["-q", "prune", str(source), "--calib", str(calib), "--nsamples", "2", "--seqlen", "32", "--out", str(out)]
    assert main([*argv, "--expert-min-tokens", "1000", "--underused-experts", "dense", "--no-routing-weighted"]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    dense = transformers.AutoModelForCausalLM.from_pretrained(source)
    experts = reloaded.model.layers[0].mlp.experts
    assert torch.equal(experts.down_proj, dense.model.layers[0].mlp.experts.down_proj)  # every expert left dense
    assert float((reloaded.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    report = (out / "prunekit-report" / "report.md").read_text()
    assert "MoE: 24 expert matrices pruned from their own routed tokens; 24 had too few tokens" in report
    assert "< expert_min_tokens=1000: left dense |" in report
    recipe = (out / "prunekit-report" / "report.json").read_text()
    assert '"routing_weighted": false' in recipe and '"underused_experts": "dense"' in recipe


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lazy_equals_in_memory_bit_for_bit(family: str, calibration: torch.Tensor, tmp_path: Path) -> None:
    """Streamed block by block from disk, whether the checkpoint stores the experts fused (GPT-OSS) or one
    by one (the others, as transformers saves them and fuses them again at load: read through its own
    conversion), the result equals the in-memory one and reloads with plain transformers."""
    source = save_tiny_checkpoint(tmp_path / "in", family)
    config = prunekit.PruneConfig(method="wanda")
    expected = prunekit.prune(tiny_model(family), config, calibration, progress=False).model
    result = prune_checkpoint(source, tmp_path / "out", config, calibration, progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in expected.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert any(layer.expert is not None for layer in result.layers)
