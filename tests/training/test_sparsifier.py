"""Pruning during training: schedules, distributions, GraNet regrowth and the Sparsifier, on tiny exact examples."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError, TargetError
from prunekit.core.patterns import NM
from prunekit.training import (
    CubicSchedule,
    LinearSchedule,
    OneShotSchedule,
    Sparsifier,
    SparsifierConfig,
    cosine_regrow_fraction,
    erk_densities,
    global_magnitude_masks,
    gradient_regrowth,
    is_update_step,
    layer_keep_counts,
    magnitude_death,
    prune_and_regrow,
    sparsity_at,
)

# -- schedules --------------------------------------------------------------------------------------------------

CUBIC = CubicSchedule(initial_sparsity=0.0, final_sparsity=0.9, start_step=0, end_step=100, frequency=10)  # n = 10
CUBIC_LATE = CubicSchedule(initial_sparsity=0.5, final_sparsity=0.9, start_step=20, end_step=60, frequency=10)
LINEAR = LinearSchedule(initial_sparsity=0.2, final_sparsity=0.6, start_step=10, end_step=50, frequency=10)
ONE_SHOT = OneShotSchedule(sparsity=0.5, step=7)


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        # Zhu & Gupta eq. 1: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3, here 0.9 - 0.9 (1 - t/100)^3.
        (CUBIC, 0, 0.0),
        (CUBIC, 10, 0.9 - 0.9 * 0.9**3),  # 0.243900
        (CUBIC, 50, 0.9 - 0.9 * 0.5**3),  # 0.7875
        (CUBIC, 55, 0.9 - 0.9 * 0.5**3),  # held between update steps
        (CUBIC, 59, 0.9 - 0.9 * 0.5**3),
        (CUBIC, 90, 0.9 - 0.9 * 0.1**3),  # 0.8991
        (CUBIC, 100, 0.9),
        (CUBIC, 1000, 0.9),  # s_f after the end
        # t0 = 20, nΔt = 40: s_i before t0; step 30 -> 0.9 + (0.5 - 0.9)(1 - 10/40)^3 = 0.9 - 0.4 * 0.421875.
        (CUBIC_LATE, 0, 0.5),
        (CUBIC_LATE, 20, 0.5),
        (CUBIC_LATE, 30, 0.9 - 0.4 * 0.75**3),
        (CUBIC_LATE, 39, 0.9 - 0.4 * 0.75**3),
        (CUBIC_LATE, 61, 0.9),
        # Linear 0.2 -> 0.6 over steps 10..50: step 30 is halfway.
        (LINEAR, 5, 0.2),
        (LINEAR, 30, 0.4),
        (LINEAR, 39, 0.4),
        (LINEAR, 50, 0.6),
        (ONE_SHOT, 6, 0.0),
        (ONE_SHOT, 7, 0.5),
        (ONE_SHOT, 100, 0.5),
    ],
)
def test_schedule_hits_the_formula_and_holds_between_updates(schedule, step, expected):
    assert sparsity_at(step, schedule) == pytest.approx(expected, abs=1e-12)
    assert schedule.sparsity_at(step) == sparsity_at(step, schedule)


@pytest.mark.parametrize(
    ("schedule", "steps"),
    [
        (CUBIC, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]),
        (CUBIC_LATE, [20, 30, 40, 50, 60]),
        (LINEAR, [10, 20, 30, 40, 50]),
        (ONE_SHOT, [7]),
    ],
)
def test_update_steps_are_t0_plus_k_delta(schedule, steps):
    assert [t for t in range(200) if is_update_step(t, schedule)] == steps


# -- distributions ----------------------------------------------------------------------------------------------


def test_global_mp_keeps_the_per_layer_floor_and_the_exact_total():
    big = torch.arange(1.0, 17.0).reshape(4, 4)  # |W| = 1..16
    tiny = 0.001 * torch.arange(1.0, 9.0).reshape(2, 4)  # all smaller than any weight of `big`
    scores = {"big": big, "tiny": tiny}
    # 24 weights at sparsity 0.5 -> keep 12. Without a floor, the 12 largest are all in `big` (5..16).
    no_floor = global_magnitude_masks(scores, 0.5)
    assert no_floor["tiny"].sum() == 0
    assert no_floor["big"].reshape(-1).tolist() == [False] * 4 + [True] * 12
    # Floor 0.25: `tiny` keeps ceil(0.25 * 8) = 2 (its two largest, flat indices 6 and 7), `big` the other 10 (7..16).
    floored = global_magnitude_masks(scores, 0.5, min_density=0.25)
    assert floored["tiny"].reshape(-1).nonzero().squeeze(1).tolist() == [6, 7]
    assert floored["big"].reshape(-1).tolist() == [False] * 6 + [True] * 10
    assert sum(int(m.sum()) for m in floored.values()) == 12


def test_erk_densities_follow_the_formula_and_a_layer_over_one_is_dense():
    # raw (Σ dims)/(Π dims): a 4/4 = 1, b 32/256 = 0.125, c 24/128 = 0.1875. Target 0.5 * 388 = 194 weights.
    # First ε = 194 / (4 + 32 + 24) gives a 3.23 > 1: `a` becomes dense, then ε = (194 - 4) / (32 + 24).
    shapes = {"a": (2, 2), "b": (16, 16), "c": (8, 16)}
    d = erk_densities(shapes, 0.5)
    epsilon = 190 / 56
    assert d["a"] == 1.0
    assert d["b"] == pytest.approx(epsilon * 0.125)
    assert d["c"] == pytest.approx(epsilon * 0.1875)
    assert d["c"] / d["b"] == pytest.approx(1.5)
    assert sum(d[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(194)
    counts = layer_keep_counts(shapes, 0.5, "erk")
    assert counts["a"] == 4 and sum(counts.values()) == 194


def test_erk_counts_kernel_dimensions():
    # conv (4, 2, 3, 3): (4 + 2 + 3 + 3) / 72 = 1/6; linear (8, 8): 16/64 = 1/4 -> density ratio 2/3.
    d = erk_densities({"conv": (4, 2, 3, 3), "fc": (8, 8)}, 0.2)
    assert d["conv"] / d["fc"] == pytest.approx((1 / 6) / (1 / 4))
    assert d["conv"] * 72 + d["fc"] * 64 == pytest.approx(0.2 * 136)


# -- GraNet regrowth --------------------------------------------------------------------------------------------


def test_granet_drops_smallest_and_regrows_largest_gradient_positions():
    keep = torch.tensor([[True, True, False, False], [True, False, False, True]])
    weight = torch.tensor([[0.5, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, -0.1]])
    grad = torch.tensor([[-9.0, 9.0, 1.0, 5.0], [0.0, -7.0, 7.0, 0.0]])
    # fraction 0.5 of 4 kept -> drop ceil(2) = 2 smallest |W|: (1, 3) = 0.1 and (0, 0) = 0.5.
    dropped = magnitude_death(keep, weight, 2)
    assert dropped.nonzero().tolist() == [[0, 1], [1, 0]]
    # Regrow 2 among the zeros by |grad|: (0, 0) = 9, then the tie 7 = 7 goes to the lower index (1, 1).
    regrown = gradient_regrowth(dropped, grad, 2)
    assert regrown.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    combined, count = prune_and_regrow(keep, weight, grad, 0.5)
    assert count == 2 and torch.equal(combined, regrown)
    assert int(combined.sum()) == int(keep.sum())  # density constant


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.5), (50, 0.25), (100, 0.0), (101, 0.0), (25, 0.25 * (1 + math.cos(math.pi / 4)))]
)
def test_cosine_regrow_fraction(step, expected):
    # RigL eq. 1: α/2 (1 + cos(π t / T_end)), α = 0.5, T_end = 100.
    assert cosine_regrow_fraction(step, 0.5, 100) == pytest.approx(expected)


# -- the Sparsifier ---------------------------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"0.weight": model[0].weight, "2.weight": model[2].weight}


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adam-l2", "adamw"],
)
def test_pruned_weights_and_optimizer_state_stay_exactly_zero(make_optimizer):
    model = mlp()
    optimizer = make_optimizer(model.parameters())
    # Prune once, at step 2, after the optimizer has built up momentum at every position.
    sparsifier = Sparsifier(model, SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5, step=2)), optimizer)
    for step in range(8):
        train_step(model, optimizer, step)
        if step >= 2:  # masked gradients + masked state: the optimizer itself cannot move a pruned weight
            for name, w in weights(model).items():
                assert torch.all(w[~sparsifier.masks[name].keep] == 0), name
        sparsifier.step()
        for name, w in weights(model).items():
            keep = sparsifier.masks[name].keep
            assert torch.all(w[~keep] == 0)
            for value in optimizer.state[w].values():
                if value.shape == w.shape:
                    assert torch.all(value[~keep] == 0)
    assert sparsifier.sparsity_report().sparsity == 0.5
    assert [layer.sparsity for layer in sparsifier.sparsity_report().layers] == [0.5, 0.5]


def test_without_gradient_masking_step_still_zeroes_pruned_weights():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = SparsifierConfig(schedule=OneShotSchedule(sparsity=0.75), mask_gradients=False)
    sparsifier = Sparsifier(model, config)
    for step in range(3):
        train_step(model, optimizer, step)
        sparsifier.step()
        assert all(torch.all(w[~sparsifier.masks[n].keep] == 0) for n, w in weights(model).items())


def test_global_mp_through_the_sparsifier_respects_the_floor():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 17.0).reshape(4, 4))
        model[1].weight.copy_(-0.001 * torch.arange(1.0, 9.0).reshape(2, 4))
    config = SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), distribution="global", min_density=0.25)
    sparsifier = Sparsifier(model, config)
    masks = sparsifier.masks
    assert masks["1.weight"].keep.reshape(-1).nonzero().squeeze(1).tolist() == [6, 7]
    assert masks["0.weight"].kept == 10 and sparsifier.sparsity_report().kept == 12


def test_gradual_nm_keeps_exactly_n_of_every_m_in_the_flattened_conv_view():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 2), nn.Flatten(), nn.Linear(36, 8))  # conv view (4, 2*2*2) = (4, 8)
    schedule = LinearSchedule(final_sparsity=0.5, start_step=0, end_step=2, frequency=1)  # 0, 0.25 (3:4), 0.5 (2:4)
    sparsifier = Sparsifier(model, SparsifierConfig(schedule=schedule, granularity=NM(2, 4)))
    for step, kept_per_group in [(1, 3), (2, 2), (3, 2)]:
        sparsifier.step()
        assert sparsity_at(step, schedule) == [0.25, 0.5, 0.5][step - 1]
        for name, mask in sparsifier.masks.items():
            groups = mask.keep.reshape(mask.shape[0], -1, 4)
            assert torch.all(groups.sum(-1) == kept_per_group), name
        conv_w = model[0].weight.reshape(4, -1, 4)
        assert torch.all((conv_w != 0).sum(-1) <= kept_per_group)


def test_nm_on_transformers_conv1d_groups_the_input_dimension():
    transformers = pytest.importorskip("transformers")
    from models import CONFIGS

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(CONFIGS["gpt2"]())
    config = SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), granularity=NM(2, 4), include=(r"\.h\.\d+\.",))
    sparsifier = Sparsifier(model, config)
    assert len(sparsifier.masks) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks; not the tied lm_head
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D stores (in, out) = (32, 128): groups run along dim 0
    keep = sparsifier.masks["transformer.h.0.mlp.c_fc.weight"].keep
    assert keep.shape == (32, 128)
    assert torch.all(keep.t().reshape(128, 8, 4).sum(-1) == 2)
    assert torch.all(c_fc.weight[~keep] == 0)


def test_nm_accepts_a_string_pattern_at_the_boundary():
    config = SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), granularity="2:4")
    assert config.granularity == NM(2, 4)


def test_channel_granularity_zeroes_whole_rows_with_the_smallest_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.ones(4, 3, 3, 3) * torch.tensor([3.0, 1.0, 4.0, 2.0]).view(4, 1, 1, 1))
        model[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, -0.5, 0.5]]))
    config = SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), granularity="channel")
    Sparsifier(model, config)
    filters_alive = model[0].weight.reshape(4, -1).ne(0)
    assert filters_alive.all(1).tolist() == [True, False, True, False]  # filters 1 and 3 (norms 1, 2) gone entirely
    assert not filters_alive[[1, 3]].any()
    assert model[2].weight.ne(0).all(1).tolist() == [True, False]  # row norms 2 vs 1: the second row goes


def test_granet_keeps_the_scheduled_count_and_regrows_at_zero():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = CubicSchedule(initial_sparsity=0.5, final_sparsity=0.75, start_step=2, end_step=6, frequency=2)
    config = SparsifierConfig(
        schedule=schedule, method="granet", distribution="global", init="erk", regrow_fraction=0.3, regrow_end_step=12
    )
    sparsifier = Sparsifier(model, config, optimizer)
    total = 8 * 16 + 16 * 4
    assert sparsifier.sparsity_report().kept == total - math.floor(0.5 * total)  # ERK sparse init at s_i
    regrown_somewhere = False
    for step in range(1, 11):
        before = {n: m.keep for n, m in sparsifier.masks.items()}
        train_step(model, optimizer, step)
        sparsifier.step()
        target = sparsity_at(step, schedule)
        assert sparsifier.sparsity_report().kept == total - math.floor(target * total + 1e-9)
        for name, w in weights(model).items():
            keep = sparsifier.masks[name].keep
            new = keep & ~before[name]
            regrown_somewhere |= bool(new.any())
            assert torch.all(w[new] == 0)  # zero-cost: regrown connections start at 0
            assert torch.all(w[~keep] == 0)
    assert regrown_somewhere
    assert sparsifier.sparsity_report().sparsity == pytest.approx(math.floor(0.75 * total) / total)


def run(model, optimizer, sparsifier, steps):
    for step in steps:
        train_step(model, optimizer, step)
        sparsifier.step()


def granet_config() -> SparsifierConfig:
    schedule = CubicSchedule(initial_sparsity=0.3, final_sparsity=0.8, start_step=2, end_step=10, frequency=2)
    return SparsifierConfig(schedule=schedule, method="granet", init="erk", regrow_end_step=14, seed=3)


def test_resume_gives_the_masks_and_weights_of_an_uninterrupted_run():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sparsifier = Sparsifier(model, granet_config(), optimizer)
    run(model, optimizer, sparsifier, range(12))

    first = mlp()
    first_opt = torch.optim.Adam(first.parameters(), lr=0.01)
    first_sp = Sparsifier(first, granet_config(), first_opt)
    run(first, first_opt, first_sp, range(5))  # stop mid-way, just before a regrowth step (6)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict(), "sp": first_sp.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second = mlp(seed=123)  # different weights until the checkpoint is loaded
    second_opt = torch.optim.Adam(second.parameters(), lr=0.01)
    second_sp = Sparsifier(second, granet_config(), second_opt)
    second.load_state_dict(saved["model"])
    second_opt.load_state_dict(saved["opt"])
    second_sp.load_state_dict(saved["sp"])
    assert second_sp.step_count == 5
    run(second, second_opt, second_sp, range(5, 12))

    for name in sparsifier.masks:
        assert torch.equal(sparsifier.masks[name].keep, second_sp.masks[name].keep), name
    for (name, a), b in zip(model.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_another_configuration():
    model = mlp()
    state = Sparsifier(model, granet_config()).state_dict()
    other = SparsifierConfig(schedule=granet_config().schedule, method="granet", init="erk", seed=3)
    with pytest.raises(ConfigError, match="regrow_end_step"):
        Sparsifier(mlp(), other).load_state_dict(state)


def test_remove_leaves_a_plain_model_with_zeros_and_no_hooks():
    model = mlp()
    keys_before = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5)), optimizer)
    run(model, optimizer, sparsifier, range(2))
    masks = sparsifier.masks
    assert model[0].weight._backward_hooks  # the gradient-masking hook is there while pruning
    assert sparsifier.remove() is model
    for module in model.modules():
        assert not torch.nn.utils.parametrize.is_parametrized(module)
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    for name, w in weights(model).items():
        assert not w._backward_hooks
        assert torch.all(w[~masks[name].keep] == 0)
    assert list(model.state_dict()) == keys_before and type(model[0]) is nn.Linear
    x, y = batch(99)
    nn.functional.mse_loss(model(x), y).backward()
    assert model[0].weight.grad[~masks["0.weight"].keep].abs().sum() > 0  # gradients are no longer masked
    with pytest.raises(RuntimeError, match="removed"):
        sparsifier.step()


def test_selection_by_type_and_name_and_logging(caplog):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 4), nn.Linear(4, 4))
    config = SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5, step=1), exclude=(r"^3\.",))
    with caplog.at_level(logging.INFO, logger="prunekit.training.sparsifier"):
        sparsifier = Sparsifier(model, config)
        sparsifier.step()
    assert [layer.name for layer in sparsifier.sparsity_report().layers] == ["0.weight", "2.weight"]
    assert "step 1: sparsity 0.5000 (target 0.5000)" in caplog.text
    only_linear = SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), module_types=(nn.Linear,))
    assert list(Sparsifier(model, only_linear).masks) == ["2.weight", "3.weight"]
    mha = nn.MultiheadAttention(8, 2)
    with_attention = SparsifierConfig(
        schedule=OneShotSchedule(sparsity=0.5), module_types=(nn.MultiheadAttention, nn.Linear)
    )
    assert list(Sparsifier(mha, with_attention).masks) == ["in_proj_weight", "out_proj.weight"]


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CubicSchedule(final_sparsity=1.0, start_step=0, end_step=10), r"final_sparsity must be in \[0, 1\)"),
        (lambda: CubicSchedule(final_sparsity=-0.1, start_step=0, end_step=10), "final_sparsity"),
        (lambda: CubicSchedule(final_sparsity=0.5, start_step=10, end_step=10), "end_step .* must be after start_step"),
        (lambda: LinearSchedule(final_sparsity=0.5, start_step=0, end_step=10, frequency=0), "frequency must be"),
        (lambda: CubicSchedule(final_sparsity=0.5, start_step=0, end_step=10, frequency=3), "set end_step to 9 or 12"),
        (
            lambda: CubicSchedule(initial_sparsity=0.6, final_sparsity=0.5, start_step=0, end_step=10),
            "exceeds final_sparsity",
        ),
        (lambda: OneShotSchedule(sparsity=0.5, step=-1), "step must be"),
        (lambda: SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), granularity="4:4"), "1 <= N < M"),
        (lambda: SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), granularity="2:8"), "schedule's final"),
        (lambda: SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), method="granet"), "CubicSchedule"),
        (lambda: SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), method="rigl"), "method must be one of"),
        (lambda: SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), distribution="owl"), "distribution"),
        (lambda: SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), include=("(",)), "not a valid regular"),
        (
            lambda: SparsifierConfig(
                schedule=OneShotSchedule(sparsity=0.5), granularity="channel", distribution="global"
            ),
            "not comparable",
        ),
        (lambda: SparsifierConfig(schedule=0.5), "schedule must be"),
    ],
)
def test_bad_configuration_is_a_clear_config_error(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), include=("attn",)),
            "include pattern 'attn' matches no",
        ),
        (
            SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), exclude=("head",)),
            "exclude pattern 'head' matches no",
        ),
        (SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), exclude=(".",)), "leave no weight"),
        (SparsifierConfig(schedule=OneShotSchedule(sparsity=0.5), module_types=(nn.LSTM,)), "no weight to prune"),
        (
            SparsifierConfig(schedule=OneShotSchedule(sparsity=0.9), distribution="global", min_density=0.5),
            "lower min_density",
        ),
        (SparsifierConfig(schedule=OneShotSchedule(sparsity=0.75), granularity=NM(1, 4)), None),  # fits: 8 and 16 % 4
        (SparsifierConfig(schedule=OneShotSchedule(sparsity=2 / 3), granularity=NM(1, 3)), "not divisible by M=3"),
    ],
)
def test_bad_targets_are_clear_errors(config, message):
    if message is None:
        Sparsifier(mlp(), config)
        return
    with pytest.raises(ConfigError, match=message) as caught:
        Sparsifier(mlp(), config)
    if "pattern" in message or "weight" in message:
        assert isinstance(caught.value, TargetError)  # name selection errors are also TargetErrors, as in one-shot
