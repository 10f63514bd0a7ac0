"""The width search (Týr-the-Pruner) on tiny Llamas: the supernet's pruned layers, the parameter budget met
exactly, a fragile layer kept wider, determinism, and heterogeneous models that save and reload."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

import prunekit
from models import CONFIGS, VOCAB, sample_text, tiny_llama, tiny_model, tiny_tokenizer
from prunekit.core.errors import StructuralPruningError
from prunekit.models.dropped_attention import DroppedAttention
from prunekit.structured.llm.layer_widths import Ladder, layer_layout
from prunekit.structured.llm.search import WidthSearchConfig, search_widths
from prunekit.structured.llm.search_space import SearchSpace
from prunekit.structured.llm.supernet import build_supernet


def llama(layers: int = 4, seed: int = 0, kv_heads: int = 2) -> transformers.PreTrainedModel:
    return tiny_llama(layers, seed, num_key_value_heads=kv_heads)


def windows(n: int = 10, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def full_ladders(model: torch.nn.Module, step: int = 16) -> list[Ladder]:
    layers = model.config.num_hidden_layers
    mlp = tuple(range(step, 65, step))
    return [Ladder((1, 2) if i == 0 else (0, 1, 2), ((0,) if i else ()) + mlp) for i in range(layers)]


QUICK = {"generations": 3, "population": 6, "offspring": 6, "search_windows": 2, "iterations": 2}


def test_layouts_count_every_parameter_of_a_layer() -> None:
    model = llama(layers=2)
    layout = layer_layout(model.model.layers[0], 0)
    # GQA 4 heads / 2 groups of 2, head_dim 8: a unit is 2 query heads, 1 key and 1 value head, 16 o_proj columns
    assert (layout.units, layout.unit_heads, layout.head_dim, layout.channels) == (2, 2, 8, 64)
    assert layout.unit_params == 16 * 32 + 2 * 8 * 32 + 32 * 16
    assert layout.channel_params == 3 * 32
    assert layout.params((2, 64)) == sum(p.numel() for p in model.model.layers[0].parameters())
    assert layout.params((0, 64)) == 64 * 96 + 32  # no attention: its norm goes too
    assert layout.params((0, 0)) == 0
    mqa = layer_layout(llama(layers=1, kv_heads=1).model.layers[0], 0)
    assert (mqa.units, mqa.unit_heads, mqa.kv_per_unit) == (4, 1, 0)  # single query heads under MQA


def test_other_families_are_refused_with_the_alternative() -> None:
    with pytest.raises(StructuralPruningError, match="prune_causal_lm_width"):
        layer_layout(tiny_model("phi").model.layers[0], 0)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_a_genome_runs_as_its_materialised_model_with_the_counted_parameters(kv_heads: int) -> None:
    model = llama(kv_heads=kv_heads)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    supernet = build_supernet(model, windows(), full_ladders(model), progress=False)
    units = supernet.layouts[0].units
    genome = ((units, 48), (0, 32), (0, 0), (units - 1, 20))  # attention dropped, layer removed, odd widths
    ids = windows(2, 24, seed=5)
    with supernet.applied(genome) as running:
        expected = running(ids, use_cache=False).logits
    pruned = supernet.materialise(genome)
    assert sum(p.numel() for p in pruned.parameters()) == supernet.params(genome)
    assert len(pruned.model.layers) == 3 and pruned.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers if hasattr(layer.self_attn, "layer_idx")] == [
        0,
        2,
    ]
    assert isinstance(pruned.model.layers[1].self_attn, DroppedAttention)
    assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == [48, 32, 20]
    assert torch.allclose(pruned(ids, use_cache=False).logits, expected, atol=1e-5)
    # cached generation agrees with the full forward (layers renumbered for the KV cache)
    out = pruned.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    again = pruned.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, again)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched
    assert len(model.model.layers) == 4
    with pytest.raises(StructuralPruningError, match="layer 0 keeps its attention"):
        supernet.check(((0, 64), *genome[1:]))
    with pytest.raises(StructuralPruningError, match="an MLP goes only with its attention"):
        supernet.check((genome[0], (1, 0), *genome[2:]))


def test_widths_of_a_sublayer_are_prefixes_of_its_greedy_order_and_refitted() -> None:
    model = llama(layers=2)
    supernet = build_supernet(model, windows(), full_ladders(model), progress=False)
    fit = supernet.mlp[1]
    assert len(fit.order) == 64 - 16  # as deep as the narrowest width on the ladder
    kept = fit.kept(40)
    assert set(kept.tolist()) == set(range(64)) - set(fit.order[:24])
    mlp = supernet.block(1, (2, 40)).mlp
    assert torch.equal(mlp.gate_proj.weight, model.model.layers[1].mlp.gate_proj.weight[kept])
    dense = model.model.layers[1].mlp.down_proj.weight
    # refitted, not sliced: the kept columns absorb what the removed ones did on the calibration inputs
    assert not torch.allclose(mlp.down_proj.weight, dense[:, kept])
    with pytest.raises(ValueError, match="no local pruning keeps 8 of 64"):
        fit.kept(8)


def test_the_search_meets_the_parameter_target_to_one_channel_and_is_deterministic() -> None:
    model = llama()
    config = WidthSearchConfig(ratio=0.3, seed=3, **QUICK)
    first = search_widths(model, windows(), config, progress=False)
    second = search_widths(model, windows(), config, progress=False)
    target = first.dense_params - round(0.3 * first.dense_params)
    assert first.params == sum(p.numel() for p in first.model.parameters())
    assert target - first.layouts[0].channel_params < first.params <= target
    assert first.genome == second.genome and first.kl == second.kl
    ids = windows(2, 16, seed=9)
    assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert first.kl <= first.uniform_kl  # the uniform genome is in the first population
    for earlier, later in zip(first.history, first.history[1:], strict=False):  # elitism within an iteration
        assert later.iteration != earlier.iteration or later.best_kl <= earlier.best_kl
    other = search_widths(model, windows(), config.model_copy(update={"seed": 4}), progress=False)
    assert other.params <= target


def test_a_fragile_layer_is_left_wider_than_the_others() -> None:
    model = llama(layers=4, seed=2)
    fragile = model.model.layers[2].mlp
    with torch.no_grad():  # large weights on outlier inputs: its channels carry most of the output
        fragile.down_proj.weight.mul_(30.0)
        fragile.up_proj.weight[:, :4].mul_(8.0)
    config = WidthSearchConfig(ratio=0.3, seed=0, attention_drop=False, layer_removal=False, **QUICK)
    result = search_widths(model, windows(12, 48), config, progress=False)
    channels = [c for _, c in result.genome]
    assert channels[2] == max(channels) and channels[2] > sum(channels) / len(channels)


def test_a_searched_model_saves_with_save_pruned_and_reloads_with_identical_logits(tmp_path) -> None:
    model = llama()
    supernet = build_supernet(model, windows(), full_ladders(model), progress=False)
    pruned = supernet.materialise(((2, 48), (0, 32), (2, 64), (1, 20)))
    with pytest.raises(StructuralPruningError, match=r"prunekit\.save_pruned"):
        pruned.save_pretrained(tmp_path / "plain")
    prunekit.save_pruned(pruned, tmp_path / "pruned")
    tiny_tokenizer().save_pretrained(tmp_path / "pruned")
    reloaded = prunekit.load_model(str(tmp_path / "pruned")).model
    ids = windows(2, 20, seed=4)
    assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    with pytest.raises(StructuralPruningError, match=r"no attention|differ in"):
        reloaded.save_pretrained(tmp_path / "again")


def test_uneven_widths_refuse_save_pretrained_naming_the_fields(tmp_path) -> None:
    model = llama(layers=3)
    supernet = build_supernet(model, windows(), full_ladders(model), progress=False)
    pruned = supernet.materialise(((2, 48), (1, 64), (2, 32)))
    with pytest.raises(StructuralPruningError, match="differ in intermediate_size, num_attention_heads"):
        pruned.save_pretrained(tmp_path / "plain")
    assert model.config.intermediate_size == 64  # the input model's config is untouched
    uniform = supernet.materialise(((2, 48), (2, 48), (2, 48)))
    uniform.save_pretrained(tmp_path / "uniform")  # one width everywhere: a plain config says it
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "uniform")
    ids = windows(1, 12, seed=2)
    assert torch.allclose(plain(ids).logits, uniform(ids).logits, atol=1e-6)


def test_budget_repair_and_moves_stay_legal() -> None:
    model = llama()
    supernet = build_supernet(model, windows(), full_ladders(model), progress=False)
    dense = sum(p.numel() for p in model.parameters())
    space = SearchSpace(
        tuple(supernet.layouts), tuple(supernet.ladders), (16,) * 4, supernet.fixed_params, dense - 12_000
    )
    rng = random.Random(0)
    genome = space.uniform()
    assert genome is not None and space.meets_target(genome)
    assert len({c for _, c in genome}) <= 2  # the same share of every MLP, to a channel
    for _ in range(200):
        child = space.repair(space.mutate(genome, rng), rng)
        if child is None:
            continue
        assert space.meets_target(child)
        assert all(space.legal(i, c) for i, c in enumerate(child))
        assert child[0][0] > 0
        genome = child


def test_channel_multiple_keeps_every_searched_mlp_width_a_multiple_and_the_budget_within_one() -> None:
    model = llama()
    supernet = build_supernet(model, windows(), full_ladders(model), progress=False)
    dense = sum(p.numel() for p in model.parameters())
    space = SearchSpace(
        tuple(supernet.layouts),
        tuple(supernet.ladders),
        (16,) * 4,
        supernet.fixed_params,
        dense - 12_000,
        multiple=8,
    )
    rng = random.Random(0)
    genome = space.uniform()
    assert genome is not None and space.meets_target(genome)
    per = supernet.layouts[0].channel_params
    for _ in range(200):
        child = space.repair(space.mutate(genome, rng), rng)
        if child is None:
            continue
        assert all(c % 8 == 0 for _, c in child)  # 64 dense, so every width is a multiple
        kept = space.params(child)
        assert kept <= dense - 12_000 < kept + 8 * per
        genome = child
    config = WidthSearchConfig(ratio=0.3, seed=3, channel_multiple=8, **QUICK)
    result = search_widths(model, windows(), config, progress=False)
    assert all(c % 8 == 0 for _, c in result.genome)
    target = result.dense_params - round(0.3 * result.dense_params)
    assert target - 8 * per < result.params <= target


def test_the_structured_command_searches_widths_and_reports_them(tmp_path) -> None:
    import json

    from prunekit.cli import main

    model_dir = tmp_path / "tiny"
    llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "calib.txt").write_text(sample_text())
    out = tmp_path / "out"
    argv = [
        "-q",
        "structured",
        str(model_dir),
        "--mode",
        "search",
        "--ratio",
        "0.3",
        "--calib",
        str(tmp_path / "calib.txt"),
    ]
    argv += ["--nsamples", "6", "--seqlen", "32", "--search-generations", "2", "--search-population", "4"]
    argv += ["--search-windows", "2", "--search-iterations", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    summary, search = report["summary"], report["search"]
    target = summary["params_before"] - round(0.3 * summary["params_before"])
    assert target - 96 < summary["params_after"] <= target  # within one MLP channel (3 x 32 parameters)
    assert len(search["widths"]) == 4 and search["kl"] <= search["uniform_kl"]
    assert len(search["history"]) == 2 and (out / "prunekit-report" / "layers.png").stat().st_size > 0
    assert "Searched widths" in (out / "prunekit-report" / "report.md").read_text()
    reloaded = prunekit.load_model(out).model
    assert sum(p.numel() for p in reloaded.parameters()) == summary["params_after"]
    kept = [w["mlp_channels"] for w in search["widths"] if w["mlp_channels"]]
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == kept
    refused = [*argv[:-1], str(tmp_path / "refused"), "--drop-attention", "1"]
    assert main(refused) == 2 and not (tmp_path / "refused").exists()


@pytest.mark.parametrize(
    "genome",
    [((2, 40), (2, 48)), ((2, 40), (0, 0), (2, 48)), ((2, 40), (0, 32), (2, 48))],
    ids=["widths", "layer removed", "attention dropped"],
)
def test_prune_to_widths_fits_each_layer_on_the_outputs_of_the_pruned_layers_before_it(genome) -> None:
    from prunekit.calibration.hooks import first_input, observe
    from prunekit.reconstruction.least_squares import least_squares_refit
    from prunekit.structured.llm.supernet import prune_to_widths

    model, calib = llama(layers=len(genome)), windows()
    pruned = prune_to_widths(model, calib, genome, progress=False)
    # what the last layer's MLP receives in the pruned model (the layers before it already pruned, a removed
    # one passing its input on untouched), through the dense MLP
    inputs, activations = [], []
    with observe({"mlp": pruned.model.layers[-1].mlp}, on_input=lambda _n, a, k: inputs.append(first_input(a, k))):
        for row in calib:
            pruned(row[None], use_cache=False)
    dense_mlp = model.model.layers[-1].mlp
    with observe(
        {"down": dense_mlp.down_proj}, on_input=lambda _n, a, k: activations.append(first_input(a, k, "input"))
    ):
        for x in inputs:
            dense_mlp(x)
    flat = torch.cat([a.reshape(-1, 64) for a in activations]).float()
    got = pruned.model.layers[-1].mlp
    kept = torch.tensor([int((dense_mlp.gate_proj.weight == row).all(1).nonzero()) for row in got.gate_proj.weight])
    assert kept.tolist() == sorted(kept.tolist()) and len(kept) == 48
    expected = least_squares_refit(dense_mlp.down_proj.weight, flat.T @ flat, kept, 0.01)
    assert torch.allclose(got.down_proj.weight, expected, atol=1e-5)


class PerLayerLlama(transformers.LlamaForCausalLM):
    """A Llama whose decoder layers are built from ``config.per_layer_config`` (as transformers' dots3 and
    Step 3.7 build theirs): the family :func:`update_config` writes a per-layer config for."""

    def __init__(self, config: transformers.LlamaConfig) -> None:
        config.allow_global_per_layer_attribute_access = True
        super().__init__(config)
        layers = [
            transformers.models.llama.modeling_llama.LlamaDecoderLayer(config.per_layer_config[i], i)
            for i in range(config.num_hidden_layers)
        ]
        self.model.layers = torch.nn.ModuleList(layers)
        self.post_init()


def test_uneven_widths_go_into_per_layer_config_where_the_family_builds_from_it(tmp_path) -> None:
    config = CONFIGS["llama"]()
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = PerLayerLlama(config).eval()
    supernet = build_supernet(model, windows(), full_ladders(model)[:3], progress=False)
    pruned = supernet.materialise(((2, 48), (1, 64), (2, 32)))
    assert pruned.config.per_layer_config[2].intermediate_size == 32
    assert pruned.config.per_layer_config[1].num_attention_heads == 2
    pruned.save_pretrained(tmp_path / "plain")  # not refused: the config describes every layer
    plain = PerLayerLlama.from_pretrained(tmp_path / "plain").eval()
    ids = windows(2, 12, seed=3)
    assert torch.equal(plain(ids).logits, pruned(ids).logits)


def test_a_decode_speed_constraint_drops_attention_where_its_fixed_cost_dominates() -> None:
    from prunekit.structured.llm.decode_latency import DecodeLatencyModel, decode_features

    # a machine where each attention call costs a second and each MLP 0.2 s: dense 1 + 6 + 1.2 = 8.2 s per
    # token; 1.3x faster (<= 6.31 s) needs at least two attentions gone, which narrowing cannot replace
    latency = DecodeLatencyModel((1.0, 1.0, 0.0, 0.2, 0.0), error=0.0)
    model = llama(layers=6)
    config = WidthSearchConfig(ratio=0.2, seed=0, decode_speedup=1.3, **QUICK)
    result = search_widths(model, windows(), config, progress=False, latency=latency)
    assert result.decode_speedup is not None and result.decode_speedup >= 1.3
    assert result.decode_latency == latency.coefficients
    # the coefficients in a recipe reproduce the search exactly, with nothing measured
    again = search_widths(
        model, windows(), config.model_copy(update={"decode_latency": latency.coefficients}), progress=False
    )
    assert again.genome == result.genome and again.latency_fit_error is None
    assert latency.seconds(result.genome) <= 8.2 / 1.3
    assert decode_features(result.genome)[1] <= 4
    target = result.dense_params - round(0.2 * result.dense_params)
    assert target - result.layouts[0].channel_params < result.params <= target


def test_the_latency_model_fits_the_decode_time_of_each_feature() -> None:
    from prunekit.structured.llm.decode_latency import DecodeLatencyModel, decode_features, design_genomes

    model = llama(layers=4)
    supernet = build_supernet(model, windows(), full_ladders(model), progress=False)
    genomes = design_genomes(supernet)
    features = torch.tensor([decode_features(g) for g in genomes], dtype=torch.float64)
    assert torch.linalg.matrix_rank(features) == 5  # every coefficient is identified by the design
    assert decode_features(((2, 64), (0, 32), (0, 0), (1, 16))) == (1.0, 2.0, 3.0, 3.0, 112.0)
    latency = DecodeLatencyModel((1.0, 0.5, 0.25, 0.5, 0.01), error=0.0)
    assert latency.seconds(((2, 64), (0, 32), (0, 0), (1, 16))) == pytest.approx(1 + 1.0 + 0.75 + 1.5 + 1.12)


def test_ladder_weights_are_the_uniform_distribution_over_legal_choices() -> None:
    from prunekit.structured.llm.layer_widths import ladder_weights

    # legal: (0, 0), (0, 32), (0, 64), (1, 32), (1, 64), (2, 32), (2, 64): seven choices
    attention, dropped, mlp = ladder_weights(Ladder((0, 1, 2), (0, 32, 64)))
    assert attention == pytest.approx({1: 2 / 7, 2: 2 / 7}) and dropped == pytest.approx(2 / 7)
    assert mlp == pytest.approx({32: 3 / 7, 64: 3 / 7})  # the seventh is the layer removed: no MLP output
    assert ladder_weights(Ladder((0,), (0,))) == ({}, 0.0, {})  # a removed layer adds nothing, not a mean


def test_a_dropped_attention_refuses_save_pretrained_even_with_even_widths(tmp_path) -> None:
    model = llama()
    supernet = build_supernet(model, windows(), full_ladders(model), progress=False)
    pruned = supernet.materialise(((2, 64), (0, 64), (2, 64), (2, 64)))
    with pytest.raises(StructuralPruningError, match="without attention"):
        pruned.save_pretrained(tmp_path / "plain")
