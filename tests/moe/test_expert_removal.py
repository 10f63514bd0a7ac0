"""Whole-expert removal: the surgery (router rows, expert tensors, config counts), the routing it leaves, and
every MoE family saved and reloaded with plain transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import prunekit
from models import (
    EXPERTS,
    MOE_FAMILIES,
    TOY_VOCAB,
    moe_only,
    never_routed_to_last_expert,
    tiny_model,
)
from prunekit.calibration.hooks import observe
from prunekit.core.errors import CalibrationError, ConfigError, TargetError
from prunekit.io.saving import save_pretrained
from prunekit.models.moe_layers import find_moe_layers, merge_into, remove_experts
from prunekit.moe import ExpertPruneConfig, prune_experts


def ids(rows: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TOY_VOCAB, (rows, 16), generator=torch.Generator().manual_seed(seed))


def test_removing_an_expert_no_token_selects_leaves_the_outputs_bit_identical() -> None:
    model = moe_only()
    never_routed_to_last_expert(model)
    result = prune_experts(model, ExpertPruneConfig(remove=0.34, criterion="frequency"), ids(), progress=False)
    assert result.layers[0].removed == [EXPERTS - 1] and result.layers[0].counts[-1] == 0
    pruned = result.model.layers[0].mlp
    assert pruned.experts.gate_up_proj.shape[0] == EXPERTS - 1 and pruned.gate.weight.shape[0] == EXPERTS - 1
    assert pruned.gate.num_experts == pruned.experts.num_experts == EXPERTS - 1
    held_out = ids(3, seed=7)
    with torch.no_grad():
        assert torch.equal(model(held_out), result.model(held_out))  # Mixtral renormalises the top-k weights
    assert result.layers[0].relative_error == 0.0


def test_router_slicing_keeps_the_top_k_choice_among_the_kept_experts() -> None:
    model = moe_only(seed=3)
    layer = find_moe_layers(model)[0]
    keep = [0, 2]
    x = model.embed(ids(2, seed=5)).reshape(-1, 8)
    with torch.no_grad():
        logits = x @ layer.router.weight.t()
        logits[:, 1] = float("-inf")  # expert 1 removed: the best two of the others
        expected = logits.topk(2, dim=-1).indices.sort(dim=-1).values
    pruned = prunekit.moe.remove.sliced_copy(layer, keep)
    seen: list[torch.Tensor] = []
    with (
        observe({"experts": pruned.experts}, on_input=lambda name, args, kwargs: seen.append(args[1])),
        torch.no_grad(),
    ):
        pruned(x.unsqueeze(0))
    chosen = torch.tensor(keep)[seen[0]].sort(dim=-1).values  # back to the original indices
    assert torch.equal(chosen, expected)


def test_merge_is_the_routing_mass_weighted_mean() -> None:
    model = moe_only()
    layer = find_moe_layers(model)[0]
    w0, w1 = layer.experts.down_proj[0].clone(), layer.experts.down_proj[1].clone()
    merge_into(layer, {0: [(1, 3.0)]}, {0: 1.0, 1: 3.0, 2: 0.0})
    assert torch.allclose(layer.experts.down_proj[0], 0.25 * w0 + 0.75 * w1)
    remove_experts(model, layer, [0, 2])
    assert torch.allclose(layer.experts.down_proj[0], 0.25 * w0 + 0.75 * w1)
    assert layer.num_experts == 2


def test_merge_option_records_where_each_removed_expert_went() -> None:
    model = moe_only()
    config = ExpertPruneConfig(remove=0.34, criterion="frequency", merge=True)
    result = prune_experts(model, config, ids(4), progress=False)
    record = result.layers[0]
    (removed,) = record.removed
    assert set(record.merged_into) == {removed} and record.merged_into[removed] in record.kept


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_moe_family_loses_experts_saves_and_reloads(
    family: str, tokenizer: Any, calibration: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model(family)
    before = find_moe_layers(model)[0].num_experts
    result = prune_experts(model, ExpertPruneConfig(remove=0.25, criterion="reap"), calibration, progress=False)
    after = before - before // 4
    assert result.experts_after == after and all(len(layer.kept) == after for layer in result.layers)
    assert all(layer.num_experts == after for layer in find_moe_layers(result.model))
    assert result.params_after < result.params_before
    assert find_moe_layers(model)[0].num_experts == before  # the input model is untouched
    out = save_pretrained(result.model, tokenizer, tmp_path / family)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(getattr(reloaded.config, key) == after for key in result.config_keys)
    with torch.no_grad():
        assert torch.equal(result.model(calibration[:2]).logits, reloaded(calibration[:2]).logits)


def test_grouped_routing_keeps_every_group_the_same_size(calibration: torch.Tensor) -> None:
    result = prune_experts(tiny_model("deepseek_v3"), ExpertPruneConfig(remove=0.25), calibration, progress=False)
    (layer,) = result.layers  # the first layer is dense
    assert sum(e < 4 for e in layer.kept) == sum(e >= 4 for e in layer.kept) == 3
    with pytest.raises(ConfigError, match="multiple of 2"):
        prune_experts(tiny_model("deepseek_v3"), ExpertPruneConfig(remove=0.125), calibration, progress=False)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ExpertPruneConfig(remove=0.75), r"fewer than the 2 each token is routed to.*remove at most 2"),
        (ExpertPruneConfig(remove=0.1), r"rounds to 0 experts per layer: one expert is 0.250"),
    ],
)
def test_removals_the_routing_cannot_take_are_refused(
    config: ExpertPruneConfig, message: str, calibration: torch.Tensor
) -> None:
    with pytest.raises(ConfigError, match=message):
        prune_experts(tiny_model("mixtral"), config, calibration, progress=False)


@pytest.mark.parametrize("remove", [-0.1, 1.0, 1.5])
def test_remove_outside_the_unit_interval(remove: float) -> None:
    with pytest.raises(ConfigError, match="remove"):
        ExpertPruneConfig(remove=remove)


def test_a_dense_model_is_refused(calibration: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match=r"no mixture-of-experts layer.*prunekit prune"):
        prune_experts(tiny_model("llama"), ExpertPruneConfig(), calibration, progress=False)


def test_calibration_too_small_to_reach_every_expert() -> None:
    with pytest.raises(CalibrationError, match=r"1 calibration tokens cannot reach all 4 experts.*at least 2 tokens"):
        prune_experts(tiny_model("mixtral"), ExpertPruneConfig(), torch.tensor([[5]]), progress=False)


def test_a_layer_whose_router_cannot_be_told_apart_is_refused() -> None:
    model = moe_only()
    mlp = model.layers[0].mlp
    mlp.second_gate = torch.nn.Linear(8, EXPERTS, bias=False)  # two children score the experts: which routes?
    with pytest.raises(TargetError, match=r"'layers.0.mlp' \(MixtralSparseMoeBlock\) has 2 candidate routers"):
        prune_experts(model, ExpertPruneConfig(remove=0.34), ids(), progress=False)


def test_dense_propagation_scores_every_layer_on_the_unpruned_model(calibration: torch.Tensor) -> None:
    sequential = prune_experts(
        tiny_model("mixtral"), ExpertPruneConfig(criterion="frequency"), calibration, progress=False
    )
    dense = prune_experts(
        tiny_model("mixtral"),
        ExpertPruneConfig(criterion="frequency", propagation="dense"),
        calibration,
        progress=False,
    )
    assert sequential.layers[0].counts == dense.layers[0].counts  # the first layer sees the same inputs
    assert [len(layer.kept) for layer in dense.layers] == [3, 3]
