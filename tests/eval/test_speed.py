"""``prunekit.eval.speed`` and ``prunekit bench-speed``: what is measured, never how fast (no timing assertions)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import prunekit
from models import save_tiny_checkpoint, tiny_model, tiny_tokenizer
from prunekit.cli import main
from prunekit.core.errors import ConfigError
from prunekit.eval.speed import (
    PhaseTiming,
    compare_results,
    compare_speed,
    greedy_decode,
    measure_decode,
    measure_prefill,
    measure_speed,
    random_prompt,
    semi_structured_plan,
    semi_structured_unsupported,
    size_stats,
)
from prunekit.io.saving import save_pretrained

N_TARGETS = 2 * 7  # tiny llama: 2 blocks x (q, k, v, o, gate, up, down)


def magnitude_pruned(model: torch.nn.Module, **config: object) -> torch.nn.Module:
    return prunekit.prune(model, prunekit.PruneConfig(method="magnitude", **config), progress=False).model


class ForwardCounter:
    """Records the ``input_ids`` shape of every top-level forward call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))


def assert_sane(timing: PhaseTiming, tokens: int, warmup: int, repeats: int) -> None:
    assert timing.tokens == tokens
    assert timing.warmup == warmup
    assert timing.repeats == repeats == len(timing.seconds)
    assert all(s > 0 and math.isfinite(s) for s in timing.seconds)
    assert timing.min_s <= timing.median_s <= timing.max_s
    assert timing.tokens_per_s > 0 and math.isfinite(timing.tokens_per_s)
    assert timing.tokens_per_s == pytest.approx(tokens / timing.median_s)
    assert timing.spread >= 0 and math.isfinite(timing.spread)


@pytest.fixture(scope="module")
def llama() -> transformers.PreTrainedModel:
    return tiny_model("llama")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_greedy_decode_is_generate_with_exactly_g_new_tokens(family: str) -> None:
    model = tiny_model(family)
    prompt = random_prompt(model, 2, 9, seed=3)
    ours = greedy_decode(model, prompt, 6)
    assert ours.shape == (2, 9 + 6)
    assert torch.equal(ours[:, :9], prompt)
    with torch.inference_mode():
        mask = torch.ones_like(prompt)  # no padding: the random prompt may hold any id, the pad id too
        reference = model.generate(
            prompt, attention_mask=mask, do_sample=False, min_new_tokens=6, max_new_tokens=6, pad_token_id=0
        )
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_static_cache_decode_gives_the_tokens_of_the_eager_decode(family: str) -> None:
    from prunekit.eval.speed.decode import _decode_run_static, _static_step

    model = tiny_model(family)
    prompt = random_prompt(model, 2, 9, seed=3)
    with torch.inference_mode():
        seconds, tokens = _decode_run_static(model, prompt, 6, _static_step)  # the step compiled_decode uses
    assert seconds > 0 and torch.equal(tokens, greedy_decode(model, prompt, 6))


def test_compiled_decode_refuses_what_it_cannot_time(llama: transformers.PreTrainedModel) -> None:
    with pytest.raises(ConfigError, match="warmup >= 1"):
        measure_decode(llama, prompt_tokens=8, new_tokens=2, warmup=0, repeats=1, compiled=True)
    no_position = torch.nn.Module()
    no_position.forward = lambda input_ids, cache=None, use_cache=True: None  # type: ignore[method-assign]
    no_position.config = llama.config
    no_position.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ConfigError, match="takes no position_ids"):
        measure_decode(no_position, prompt_tokens=8, new_tokens=2, warmup=1, repeats=1, compiled=True)


@pytest.mark.slow
def test_compiled_decode_measures_the_eager_tokens(llama: transformers.PreTrainedModel) -> None:
    timing = measure_decode(llama, prompt_tokens=8, new_tokens=4, warmup=1, repeats=2, compiled=True)
    assert_sane(timing, tokens=4, warmup=1, repeats=2)


def test_decode_times_exactly_g_one_token_steps_per_run(llama: transformers.PreTrainedModel) -> None:
    counter = ForwardCounter(llama)
    try:
        timing = measure_decode(llama, batch_size=2, prompt_tokens=8, new_tokens=5, warmup=2, repeats=3)
    finally:
        counter.handle.remove()
    assert_sane(timing, tokens=2 * 5, warmup=2, repeats=3)
    runs = 2 + 3
    assert counter.shapes.count((2, 7)) == runs  # the prompt minus its last token, prefilled untimed
    assert counter.shapes.count((2, 1)) == runs * 5  # G decode steps of one token per sequence
    assert len(counter.shapes) == runs * (1 + 5)


def test_prefill_runs_one_forward_over_the_prompt_per_run(llama: transformers.PreTrainedModel) -> None:
    counter = ForwardCounter(llama)
    try:
        timing = measure_prefill(llama, batch_size=3, prompt_tokens=16, warmup=0, repeats=4)
    finally:
        counter.handle.remove()
    assert_sane(timing, tokens=3 * 16, warmup=0, repeats=4)
    assert counter.shapes == [(3, 16)] * 4


def test_prompt_is_seeded_and_in_the_vocabulary(llama: transformers.PreTrainedModel) -> None:
    a, b = random_prompt(llama, 2, 50, seed=1), random_prompt(llama, 2, 50, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_prompt(llama, 2, 50, seed=2))
    assert a.shape == (2, 50) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < llama.config.vocab_size


def test_size_of_a_magnitude_pruned_model_is_exact(llama: transformers.PreTrainedModel) -> None:
    dense = size_stats(llama)
    pruned = size_stats(magnitude_pruned(llama, sparsity=0.5))
    hidden, inter = 32, 64
    per_block = 2 * hidden * hidden + 2 * (hidden // 2) * hidden + 3 * hidden * inter  # q+o, k+v (2 of 4 heads), mlp
    assert dense.target_parameters == pruned.target_parameters == 2 * per_block
    assert dense.target_nonzeros == dense.target_parameters and dense.target_sparsity == 0.0
    assert pruned.target_nonzeros == pruned.target_parameters // 2
    assert pruned.target_sparsity == 0.5
    assert pruned.parameters == dense.parameters == sum(p.numel() for p in llama.parameters())
    assert pruned.nonzero_parameters == dense.nonzero_parameters - pruned.target_parameters // 2
    assert pruned.dense_bytes == dense.dense_bytes == 4 * dense.parameters  # dense storage: no smaller
    assert pruned.nonzero_value_bytes == 4 * pruned.nonzero_parameters


def test_measure_speed_on_cpu_says_why_speed_is_equal(llama: transformers.PreTrainedModel) -> None:
    result = measure_speed(llama, batch_size=1, prompt_tokens=8, new_tokens=3, warmup=1, repeats=2)
    assert result.device == "cpu" and result.dtype == "float32" and result.threads >= 1
    assert_sane(result.prefill, tokens=8, warmup=1, repeats=2)
    assert_sane(result.decode, tokens=3, warmup=1, repeats=2)
    assert result.semi_structured is None
    assert "no CPU kernels that skip zero weights" in result.note
    assert "equal speed is expected" in result.note
    json.dumps(result.to_dict())  # JSON-ready


def test_compare_speed_gives_ratios_of_the_two_measurements(llama: transformers.PreTrainedModel) -> None:
    pruned = magnitude_pruned(llama, pattern="2:4")
    cmp = compare_speed(llama, pruned, prompt_tokens=8, new_tokens=2, warmup=0, repeats=2)
    assert cmp.prefill_speedup == pytest.approx(cmp.pruned.prefill.tokens_per_s / cmp.dense.prefill.tokens_per_s)
    assert cmp.decode_speedup == pytest.approx(cmp.pruned.decode.tokens_per_s / cmp.dense.decode.tokens_per_s)
    assert cmp.semi_structured_prefill_speedup is None and cmp.semi_structured_decode_speedup is None
    assert cmp.nonzero_ratio == pytest.approx(cmp.pruned.size.nonzero_parameters / cmp.dense.size.nonzero_parameters)
    assert cmp.pruned.size.target_sparsity == 0.5
    assert "CPU" in cmp.note
    other = measure_speed(llama, prompt_tokens=4, new_tokens=2, warmup=0, repeats=1)
    with pytest.raises(ConfigError, match="prompt_tokens"):
        compare_results(cmp.dense, other)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_tokens": 0}, "prompt_tokens"),
        ({"prompt_tokens": -3}, "prompt_tokens"),
        ({"prompt_tokens": 250, "new_tokens": 10}, "longer than the model's context of 256"),
        ({"prompt_tokens": 257, "new_tokens": 1}, "longer than the model's context of 256"),
        ({"new_tokens": 0}, "new_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_bad_arguments_are_config_errors(llama: transformers.PreTrainedModel, kwargs: dict, match: str) -> None:
    settings = {"prompt_tokens": 8, "new_tokens": 2, "warmup": 0, "repeats": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        measure_speed(llama, **settings)


def test_prefill_alone_may_fill_the_whole_context(llama: transformers.PreTrainedModel) -> None:
    timing = measure_prefill(llama, prompt_tokens=256, warmup=0, repeats=1)
    assert timing.tokens == 256
    with pytest.raises(ConfigError, match="context of 256"):
        measure_prefill(llama, prompt_tokens=257, warmup=0, repeats=1)


def test_semi_structured_asked_for_on_cpu_is_an_error_naming_the_fix(llama: transformers.PreTrainedModel) -> None:
    with pytest.raises(ConfigError, match=r"CUDA GPU of compute capability >= 8\.0.*--device cuda.*--semi-structured"):
        measure_speed(llama, prompt_tokens=8, new_tokens=2, semi_structured=True)
    assert semi_structured_unsupported("cpu", torch.float16) is not None


def llama_2of4_half() -> torch.nn.Module:
    """A llama whose every block weight is a multiple of (32, 64), pruned 2:4, in float16."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return magnitude_pruned(model, pattern="2:4").half()


def test_semi_structured_plan_says_which_layers_qualify_and_why_not() -> None:
    plan = semi_structured_plan(llama_2of4_half())
    blocks = {name: reason for name, reason in plan.items() if name.startswith("model.layers.")}
    assert len(blocks) == N_TARGETS and all(reason is None for reason in blocks.values())
    assert "not 2:4" in plan["lm_head"]  # never pruned

    plan32 = semi_structured_plan(magnitude_pruned(tiny_model("llama"), pattern="2:4"))
    assert all("float16/bfloat16" in reason for reason in plan32.values())

    small = semi_structured_plan(magnitude_pruned(tiny_model("llama"), pattern="2:4").half())
    assert small["model.layers.0.self_attn.q_proj"] == "shape (32, 32) is not a multiple of (32, 64)"

    gpt2 = semi_structured_plan(tiny_model("gpt2").half())
    assert "Conv1D" in gpt2["transformer.h.0.attn.c_attn"]
    assert "shared" in gpt2["lm_head"]  # tied to the input embeddings


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU of compute capability >= 8.0",
)
def test_semi_structured_on_cuda_converts_measures_and_restores() -> None:
    model = llama_2of4_half().cuda()
    weights = {name: p for name, p in model.named_parameters()}
    result = measure_speed(
        model, batch_size=2, prompt_tokens=64, new_tokens=4, warmup=1, repeats=2, semi_structured=True
    )
    semi = result.semi_structured
    assert semi is not None
    assert len(semi.converted) + sum("refused" in r for r in semi.skipped.values()) == N_TARGETS
    assert "lm_head" in semi.skipped
    if semi.converted:
        assert semi.prefill is not None and semi.decode is not None
        assert semi.max_abs_logit_diff is not None and semi.max_abs_logit_diff < 0.5
        assert "2:4 sparse kernels" in result.note
    restored = dict(model.named_parameters())
    assert all(restored[name] is weights[name] for name in weights)


# CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("speed")
    dense = save_tiny_checkpoint(root / "dense", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(dense)
    save_pretrained(magnitude_pruned(model, sparsity=0.5), tiny_tokenizer(), root / "pruned")
    return dense, root / "pruned"


def run_cli(*argv: str | Path) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main([str(a) for a in argv])
    return rc, buffer.getvalue()


FAST = ("--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "2", "--warmup", "1")


def test_cli_bench_speed_json_against_a_baseline(checkpoints: tuple[Path, Path]) -> None:
    dense, pruned = checkpoints
    rc, out = run_cli("-q", "bench-speed", pruned, "--baseline", dense, "--batch-size", "2", *FAST, "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["model"] == str(pruned) and data["baseline"] == str(dense)
    for side in ("dense", "pruned"):
        assert data[side]["batch_size"] == 2 and data[side]["prompt_tokens"] == 8
        assert data[side]["decode"]["tokens"] == 2 * 3 and data[side]["decode"]["repeats"] == 2
        assert data[side]["prefill"]["tokens"] == 2 * 8 and data[side]["prefill"]["warmup"] == 1
    assert data["dense"]["size"]["target_sparsity"] == 0.0
    assert data["pruned"]["size"]["target_sparsity"] == 0.5
    assert data["prefill_speedup"] > 0 and data["decode_speedup"] > 0
    assert 0 < data["nonzero_ratio"] < 1
    assert "equal speed is expected" in data["note"]


def test_cli_bench_speed_table(checkpoints: tuple[Path, Path]) -> None:
    dense, pruned = checkpoints
    rc, out = run_cli("-q", "bench-speed", pruned, "--baseline", dense, *FAST)
    assert rc == 0
    assert "prefill tok/s" in out and "decode tok/s" in out
    lines = out.splitlines()
    assert any(line.startswith("baseline") for line in lines)
    assert any(line.startswith("ratio model / baseline") for line in lines)
    assert "note: CPU: stock PyTorch has no CPU kernels" in out

    rc, single = run_cli("-q", "bench-speed", pruned, *FAST, "--json")
    assert rc == 0 and json.loads(single)["baseline"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--semi-structured",), "--semi-structured"),
        (("--prompt-tokens", "0"), "--prompt-tokens"),
        (("--prompt-tokens", "300"), "context of 256"),
        (("--new-tokens", "0"), "--new-tokens"),
        (("--compile", "--warmup", "0"), "--warmup >= 1"),
    ],
)
def test_cli_bench_speed_bad_input_exits_2(
    checkpoints: tuple[Path, Path], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    rc = main(["-q", "bench-speed", str(checkpoints[1]), "--device", "cpu", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
