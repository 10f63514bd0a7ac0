"""Lottery tickets: IMP rounds, exact rewinding and the reinitialisation controls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.training import (
    LotteryConfig,
    LotteryTicket,
    capture_rewind_point,
    imp_round,
    random_reinit,
    rewind,
    rounds_to_reach,
    scratch_init,
)


def model_with_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, after_step=None) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def test_imp_round_prunes_a_fraction_of_the_remaining_weights():
    weights = {"a": torch.tensor([[1.0, -2.0, 3.0, 4.0, 5.0]]), "b": torch.tensor([[0.5, 6.0, -7.0, 8.0, 9.0]])}
    masks = {"a": torch.tensor([[False, True, True, True, True]]), "b": torch.ones(1, 5, dtype=torch.bool)}
    # 9 remaining, ceil(0.2 * 9) = 2 go: the smallest kept |W| are b's 0.5 and a's 2 (a's 1 is already pruned).
    g = imp_round(masks, weights, 0.2, "global")
    assert g["a"].tolist() == [[False, False, True, True, True]]
    assert g["b"].tolist() == [[False, True, True, True, True]]
    # Per layer: a 4 remaining -> ceil(0.8) = 1 goes (2); b 5 remaining -> 1 goes (0.5).
    per_layer = imp_round(masks, weights, 0.2, "layer")
    assert per_layer["a"].tolist() == [[False, False, True, True, True]]
    assert per_layer["b"].tolist() == [[False, True, True, True, True]]
    weights["b"][0, 0] = 100.0  # a pruned weight that has grown stays pruned
    assert imp_round(g, weights, 0.2, "global")["b"][0, 0].item() is False


def test_rewind_restores_exactly_the_step_k_weights_on_kept_positions():
    model = model_with_bn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, range(2))
    snapshot = capture_rewind_point(model)  # k = 2
    train(model, optimizer, range(2, 6))
    masks = {name: torch.ones_like(model.get_parameter(name), dtype=torch.bool) for name in ("0.weight", "3.weight")}
    masks = imp_round(masks, {n: model.get_parameter(n) for n in masks}, 0.2)
    rewind(model, snapshot, masks)
    for name, value in model.state_dict().items():
        if name in masks:
            assert torch.equal(value[masks[name]], snapshot[name][masks[name]]), name
            assert torch.all(value[~masks[name]] == 0)
        else:
            assert torch.equal(value, snapshot[name]), name  # biases and batch-norm statistics too


def test_random_reinit_keeps_masks_draws_fresh_weights_and_leaves_the_global_rng_alone():
    model = model_with_bn()
    masks = {"0.weight": torch.rand(10, 6, generator=torch.Generator().manual_seed(0)) > 0.5}
    before = model[0].weight.detach().clone()
    state = torch.get_rng_state()
    random_reinit(model, masks, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.all(model[0].weight[~masks["0.weight"]] == 0)
    assert not torch.equal(model[0].weight[masks["0.weight"]], before[masks["0.weight"]])
    again = model_with_bn()
    random_reinit(again, masks, seed=7)
    assert torch.equal(again[0].weight, model[0].weight)  # seeded: reproducible


def test_scratch_init_is_the_same_architecture_freshly_initialised():
    model = model_with_bn()
    fresh = scratch_init(model, seed=1)
    assert fresh is not model and [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    assert not torch.equal(fresh[0].weight, model[0].weight)
    assert torch.equal(scratch_init(model, seed=1)[3].weight, fresh[3].weight)


def test_controls_use_the_models_own_initialiser_when_given():
    def init(model: torch.nn.Module) -> None:
        for p in model.parameters():
            torch.nn.init.constant_(p, 0.5)

    model = model_with_bn()
    masks = {"0.weight": torch.rand(10, 6, generator=torch.Generator().manual_seed(0)) > 0.5}
    random_reinit(model, masks, seed=3, init=init)
    kept = masks["0.weight"]
    assert torch.all(model[0].weight[kept] == 0.5) and torch.all(model[0].weight[~kept] == 0)
    fresh = scratch_init(model_with_bn(), seed=3, init=init)
    assert all(torch.all(p == 0.5) for p in fresh.parameters())


def test_cifar_init_weights_redraws_kaiming_fan_out_not_pytorchs_default():
    from prunekit.training.cifar.models import init_weights, resnet20

    fresh = scratch_init(resnet20(), seed=5, init=init_weights)
    again = scratch_init(resnet20(), seed=5, init=init_weights)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values(), strict=True))
    # a 16 -> 16 3x3 conv: Kaiming normal fan-out has std sqrt(2 / 144) = 0.118; PyTorch's default
    # (uniform, bound 1 / sqrt(fan_in) = 1/12) would give 0.048
    std = float(fresh.blocks[0].conv1.weight.std())
    assert 0.105 < std < 0.131


def test_lottery_ticket_reaches_the_target_density_in_the_expected_rounds():
    assert rounds_to_reach(0.8**5, 0.2) == 5
    assert rounds_to_reach(0.5, 0.2) == 4  # 0.8^3 = 0.512 > 0.5 >= 0.8^4
    model = model_with_bn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, LotteryConfig(rate=0.2, target_density=0.8**5, exclude=(r"^3\.",)))
    ticket.capture()  # k = 0: the original initialisation
    init = model[0].weight.detach().clone()
    train(model, optimizer, range(3))
    densities = []
    while not ticket.done:
        densities.append(ticket.prune_round())
        ticket.rewind()
        assert torch.equal(model[0].weight[ticket.masks["0.weight"].keep], init[ticket.masks["0.weight"].keep])
        train(model, optimizer, range(3), after_step=ticket.apply_masks)
        assert torch.all(model[0].weight[~ticket.masks["0.weight"].keep] == 0)
    # 60 weights: 60 -> 48 -> 38 -> 30 -> 24 -> 19 (ceil of 20% removed each round); 19/60 <= 0.8^5.
    assert [round(d * 60) for d in densities] == [48, 38, 30, 24, 19]
    assert ticket.rounds == 5


@pytest.mark.parametrize(
    "make",
    [
        lambda: LotteryConfig(rate=0.0),
        lambda: LotteryConfig(rate=1.0),
        lambda: LotteryConfig(target_density=0.0),
        lambda: LotteryConfig(scope="row"),
    ],
)
def test_bad_lottery_settings_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()
