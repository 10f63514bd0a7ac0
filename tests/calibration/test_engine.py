"""The sequential engine on tiny models of every supported family, against an independent oracle."""

import pytest
import torch
from torch import nn

import prunekit
from models import FAMILIES, tiny_model
from oracles import first_block_inputs, true_sequential_oracle
from prunekit.calibration.lockstep import LockstepRunner
from prunekit.core.patterns import unstructured_mask
from prunekit.methods.wanda.scores import wanda_scores
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import find_targets, weight_matrix


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_target_reaches_exact_sparsity_and_the_rest_is_untouched(family, pattern, calibration):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = prunekit.PruneConfig(method="wanda", sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern)
    result = prunekit.prune(model, config, calibration, progress=False)
    pruned = result.model
    blocks_name, _ = find_decoder_blocks(pruned)
    targets = find_targets(pruned, blocks_name)
    assert len(result.layers) == len(targets) > 0
    target_weights = set()
    for target in targets:
        w = weight_matrix(target.module)
        rows, cols = w.shape
        if pattern == "2:4":
            assert ((w.reshape(rows, cols // 4, 4) == 0).sum(-1) == 2).all(), target.name
        else:
            assert ((w == 0).sum(1) == cols // 2).all(), target.name
        target_weights.add(target.name + ".weight")
    for key, value in pruned.state_dict().items():
        if key not in target_weights:
            assert torch.equal(value, before[key]), key
    for key, value in model.state_dict().items():  # inplace=False: the input model is untouched
        assert torch.equal(value, before[key]), key
    assert all(layer.relative_error is not None and 0 < layer.relative_error < 1 for layer in result.layers)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_one_pass_engine_equals_the_many_pass_oracle(family, calibration):
    model = tiny_model(family)
    ours = prunekit.prune(
        model,
        prunekit.PruneConfig(method="wanda", sparsity=0.5, batch_size=2, propagation="sequential"),
        calibration,
        progress=False,
    )

    def wanda(w, x_all):
        return w * unstructured_mask(wanda_scores(w, x_all.pow(2).sum(0)), 0.5)

    oracle = true_sequential_oracle(tiny_model(family), calibration, wanda)
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), oracle.state_dict().items(), strict=True):
        assert torch.equal(a == 0, b == 0), f"masks differ at {name}"
        assert torch.allclose(a, b), name


def test_batch_size_does_not_change_the_masks(calibration):
    model = tiny_model("llama")
    masks = []
    for batch_size in (1, 4, 6):
        result = prunekit.prune(model, prunekit.PruneConfig(batch_size=batch_size), calibration, progress=False)
        masks.append([(v == 0) for v in result.model.state_dict().values()])
    for other in masks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(masks[0], other, strict=True))


def test_magnitude_without_calibration_matches_the_pure_function():
    model = tiny_model("llama")
    result = prunekit.prune(
        model, prunekit.PruneConfig(method="magnitude", sparsity=0.25, scope="layer"), progress=False
    )
    w = model.model.layers[1].mlp.down_proj.weight
    keep = unstructured_mask(w.abs(), 0.25, "layer")
    assert torch.equal(result.model.model.layers[1].mlp.down_proj.weight, w * keep)
    assert all(layer.relative_error is None for layer in result.layers)


class _RoutedBlock(nn.Module):
    """Batch 1 skips layer ``a`` (data-dependent routing), the others use a then b."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x, skip_a):
        return self.b(x if skip_a else self.a(x))


def test_lockstep_pools_in_batch_order_and_survives_skipped_layers():
    block = _RoutedBlock()
    seen = []
    arrivals = []

    def collect(module, args, state):
        arrivals.append((module, float(args[0][0, 0])))
        return (state or []) + [float(args[0].sum())]

    runner = LockstepRunner([block.a, block.b], collect, lambda m, state, batches: seen.append((m, state, batches)))
    xs = [torch.full((1, 2), float(i)) for i in range(3)]
    outs = runner.run([lambda i=i: block(xs[i], skip_a=(i == 1)) for i in range(3)])
    assert [m for m, _, _ in seen] == [block.a, block.b]
    assert seen[0][2] == [0, 2]  # batch 1 never reached a
    assert seen[0][1] == [0.0, 4.0]  # a's pooled state: batches 0 and 2, in batch order
    assert seen[1][2] == [0, 1, 2]
    assert [x for m, x in arrivals if m is block.a] == [0.0, 2.0]
    assert all(torch.equal(o, block(x, skip_a=(i == 1))) for i, (o, x) in enumerate(zip(outs, xs, strict=True)))


def test_lockstep_reraises_a_failure_and_unwinds_the_other_batches():
    block = _RoutedBlock()

    def finalize(module, state, batches):
        raise RuntimeError("boom in finalize")

    runner = LockstepRunner([block.a], lambda m, a, s: None, finalize)
    with pytest.raises(RuntimeError, match="boom in finalize"):
        runner.run([lambda: block(torch.ones(1, 2), skip_a=False) for _ in range(3)])
    assert not block.a._forward_pre_hooks  # hooks removed


def _oracle_block_wanda(model, calibration, sparsity, propagate):
    """Reference of the Wanda code: each block runs dense over all windows for statistics, all its layers
    are pruned, then (``propagate``) its pruned outputs, or (not) its dense outputs, feed the next block."""
    blocks_name, blocks = find_decoder_blocks(model)
    targets = find_targets(model, blocks_name)
    hidden, rest = first_block_inputs(model, blocks, calibration)

    def run(block):
        with torch.no_grad():
            outs = [block(x, *args, **kwargs) for x, (args, kwargs) in zip(hidden, rest, strict=True)]
        return [o if isinstance(o, torch.Tensor) else o[0] for o in outs]

    for index, block in enumerate(blocks):
        mine = [t for t in targets if t.block_index == index]
        seen = {t.name: [] for t in mine}
        handles = [
            t.module.register_forward_pre_hook(lambda m, a, s=seen[t.name]: s.append(a[0].reshape(-1, a[0].shape[-1])))
            for t in mine
        ]
        dense_out = run(block)
        for h in handles:
            h.remove()
        for t in mine:
            w = weight_matrix(t.module)
            x_all = torch.cat(seen[t.name])
            w.masked_fill_(~unstructured_mask(wanda_scores(w, x_all.pow(2).sum(0)), sparsity), 0)
        hidden = run(block) if propagate else dense_out
    return model


@pytest.mark.parametrize(("propagation", "propagate"), [("block", True), ("dense", False)])
def test_block_and_dense_propagation_equal_their_oracles(propagation, propagate, calibration):
    config = prunekit.PruneConfig(method="wanda", sparsity=0.5, propagation=propagation)
    ours = prunekit.prune(tiny_model("llama"), config, calibration, progress=False)
    oracle = _oracle_block_wanda(tiny_model("llama"), calibration, 0.5, propagate)
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), oracle.state_dict().items(), strict=True):
        assert torch.equal(a == 0, b == 0), f"masks differ at {name}"
    sequential = prunekit.prune(
        tiny_model("llama"), prunekit.PruneConfig(propagation="sequential"), calibration, progress=False
    )
    differs = [
        name
        for (name, a), (_, b) in zip(
            ours.model.state_dict().items(), sequential.model.state_dict().items(), strict=True
        )
        if not torch.equal(a == 0, b == 0)
    ]
    assert differs  # the modes are really different: o_proj, mlp and block-1 layers see other inputs
    assert all(".layers.0.self_attn.q_proj" not in n for n in differs)  # block 0's first input is the same


def test_offloading_activations_does_not_change_the_result(calibration):
    plain = prunekit.prune(tiny_model("qwen2"), prunekit.PruneConfig(), calibration, progress=False)
    offloaded = prunekit.prune(
        tiny_model("qwen2"), prunekit.PruneConfig(offload_activations=True, batch_size=2), calibration, progress=False
    )
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), offloaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


class _SharedInputBlock(nn.Module):
    """b and c receive the very same tensor (like q/k/v), d receives a new one."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(2, 2) for _ in range(4))

    def forward(self, x):
        h = self.a(x)
        return self.d(self.b(h) + self.c(h))


def test_layers_fed_the_same_tensor_share_one_pooled_state():
    block = _SharedInputBlock()
    collected, finalized = [], {}

    def collect(module, args, state):
        collected.append(module)
        return (state or []) + [float(args[0].detach().sum())]

    def finalize(module, state, batches):
        finalized[module] = state

    runner = LockstepRunner([block.a, block.b, block.c, block.d], collect, finalize)
    with torch.no_grad():
        runner.run([lambda i=i: block(torch.full((1, 2), float(i))) for i in range(3)])
    assert [collected.count(m) for m in (block.a, block.b, block.c, block.d)] == [3, 3, 0, 3]
    assert finalized[block.c] is finalized[block.b]
    assert finalized[block.d] is not finalized[block.b]


@pytest.mark.parametrize("propagation", ["sequential", "block"])
def test_pruning_leaves_the_callers_grad_mode_as_it_was(propagation, calibration):
    # every batch runs in its own greenlet and grad mode is one per thread: jobs parked inside their own
    # ``no_grad`` blocks used to restore each other's saved modes out of order and leave autograd off
    assert torch.is_grad_enabled()
    config = prunekit.PruneConfig(method="wanda", sparsity=0.5, propagation=propagation, batch_size=2)
    prunekit.prune(tiny_model("llama"), config, calibration, progress=False)
    assert torch.is_grad_enabled()
    with torch.no_grad():
        prunekit.prune(tiny_model("llama"), config, calibration, progress=False)
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("propagation", ["sequential", "block", "dense"])
def test_every_block_forward_runs_without_autograd(propagation, calibration):
    # a forward with autograd on keeps every activation for a backward that never comes: the second pass of
    # ``block`` once did, and its peak memory grew from 1.2 to 21.7 GiB on SmolLM2
    model = tiny_model("llama")
    grad_modes: list[bool] = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda _m, _a, out: grad_modes.append(torch.is_grad_enabled()))
    config = prunekit.PruneConfig(method="wanda", sparsity=0.5, propagation=propagation)
    prunekit.prune(model, config, calibration, inplace=True, progress=False)
    passes = 2 if propagation == "block" else 1
    assert len(grad_modes) >= passes * len(model.model.layers) * calibration.shape[0]
    assert not any(grad_modes)


@pytest.mark.parametrize(
    ("method", "pattern", "expected"),
    [
        ("wanda", "unstructured", "dense"),
        ("wanda", "2:4", "sequential"),
        ("sparsegpt", "unstructured", "sequential"),
        ("sparsegpt", "2:4", "sequential"),
        ("magnitude", "unstructured", "sequential"),
    ],
)
def test_auto_propagation_resolves_by_method_and_pattern(method, pattern, expected, calibration):
    config = prunekit.PruneConfig(method=method, pattern=pattern)
    assert config.propagation == "auto" and config.resolved_propagation() == expected
    assert prunekit.PruneConfig(method=method, pattern=pattern, propagation="block").resolved_propagation() == "block"
    if method == "wanda":  # and the engine runs that mode: same masks as asking for it by name
        auto = prunekit.prune(tiny_model("llama"), config, calibration, progress=False)
        named = prunekit.PruneConfig(method=method, pattern=pattern, propagation=expected)
        explicit = prunekit.prune(tiny_model("llama"), named, calibration, progress=False)
        for (name, a), (_, b) in zip(auto.model.state_dict().items(), explicit.model.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
