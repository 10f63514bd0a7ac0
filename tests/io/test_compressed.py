"""Compressed sparse checkpoints (``--save-format``): exact round trip, real size savings, clear errors.

Sparse models come from magnitude pruning of the tiny models (the on-disk size depends only on the pattern).
"Exact" means every tensor comes back with the same dtype and the same bits, except that a zero's sign is
not stored: pruning by multiplying with the mask leaves ``-0.0`` where a negative weight was removed, and it
reloads as ``+0.0`` (see :mod:`prunekit.io.compressed`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import prunekit
from models import FAMILIES, save_tiny_checkpoint, tiny_model, tiny_tokenizer
from prunekit.cli import main
from prunekit.core.errors import ConfigError, ModelLoadError
from prunekit.core.patterns import NM, Unstructured
from prunekit.io.compressed import (
    BITMASK,
    DENSE,
    SPARSE_24,
    check_save_format,
    checkpoint_format,
    checkpoint_size_bytes,
    pattern_fits_24,
    plan_compression,
)
from prunekit.io.saving import save_pretrained
from prunekit.io.sparse_encoding import (
    bitmask_compress,
    bitmask_decompress,
    pack_bits,
    sparse24_compress,
    sparse24_decompress,
    unpack_bits,
)

PATTERNS = {"unstructured": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def pruned(family: str = "llama", pattern: str = "unstructured") -> torch.nn.Module:
    model = tiny_model(family)
    config = prunekit.PruneConfig(method="magnitude", **PATTERNS[pattern])
    return prunekit.prune(model, config, progress=False).model


def canonical(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes with ``-0.0`` written as ``+0.0`` (adding ``+0.0`` changes nothing else)."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor + 0.0
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].dtype == got[name].dtype, name
        assert torch.equal(expected[name], got[name]), name
        assert canonical(expected[name]) == canonical(got[name]), name


def payload_bytes(file: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus the 8-byte length and the JSON header)."""
    with open(file, "rb") as handle:
        (header,) = struct.unpack("<Q", handle.read(8))
    return file.stat().st_size - 8 - header


# --- the round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_prunekit_is_exact(family: str, pattern: str, tokenizer: Any, tmp_path: Path) -> None:
    model = pruned(family, pattern)
    out = save_pretrained(model, tokenizer, tmp_path / "c", save_format="compressed")
    # GPT-2's Conv1D stores its weight transposed (in x out), so its 2:4 groups are not along the stored rows
    expected = SPARSE_24 if pattern == "2:4" and family != "gpt2" else BITMASK
    assert checkpoint_format(out) == expected
    loaded = prunekit.load_model(out)
    assert type(loaded.model) is type(model)
    assert_same_weights(model.state_dict(), loaded.model.state_dict())
    if model.config.tie_word_embeddings:  # the tie survives
        assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
    text = "to be, or not to be"
    assert loaded.tokenizer(text).input_ids == tokenizer(text).input_ids


def test_reloaded_model_gives_the_same_logits(tokenizer: Any, tmp_path: Path) -> None:
    model = pruned("llama", "2:4")
    out = save_pretrained(model, tokenizer, tmp_path / "c", save_format="compressed")
    reloaded = prunekit.load_model(out).model
    ids = torch.arange(40).reshape(2, 20) % 256
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_bfloat16_round_trip_and_dtype_choice(tokenizer: Any, tmp_path: Path) -> None:
    model = pruned("qwen2").to(torch.bfloat16)
    out = save_pretrained(model, tokenizer, tmp_path / "c", save_format="compressed")
    loaded = prunekit.load_model(out).model
    assert loaded.dtype == torch.bfloat16
    assert_same_weights(model.state_dict(), loaded.state_dict())
    as_float = prunekit.load_model(out, dtype="float32").model
    assert as_float.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.float(), as_float.state_dict()[name]), name


def test_saving_leaves_the_model_untouched(tokenizer: Any, tmp_path: Path) -> None:
    model = pruned("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(model, tokenizer, tmp_path / "c", save_format="compressed")
    after = model.state_dict()
    for name in before:  # bit for bit, -0.0 included
        assert before[name].view(torch.uint8).equal(after[name].view(torch.uint8)), name


def test_explicit_bitmask_on_a_24_model(tokenizer: Any, tmp_path: Path) -> None:
    model = pruned("llama", "2:4")
    out = save_pretrained(model, tokenizer, tmp_path / "c", save_format="sparse-bitmask")
    assert checkpoint_format(out) == BITMASK
    assert_same_weights(model.state_dict(), prunekit.load_model(out).model.state_dict())
    out24 = save_pretrained(model, tokenizer, tmp_path / "c24", save_format="sparse-24")
    assert checkpoint_format(out24) == SPARSE_24


# --- what is on disk --------------------------------------------------------------------------------------


def test_config_records_the_format_like_compressed_tensors(tokenizer: Any, tmp_path: Path) -> None:
    model = pruned("llama", "2:4")
    out = save_pretrained(model, tokenizer, tmp_path / "c", save_format="compressed")
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "compressed-tensors"
    assert entry["version"] == "0.14.0"
    sparsity = entry["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]  # lm_head stays dense
    state = model.state_dict()
    zeros = sum(int((t == 0).sum()) for t in state.values())
    assert sparsity["global_sparsity"] == pytest.approx(zeros / sum(t.numel() for t in state.values()))
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" in stored and "model.embed_tokens.weight" in stored
    assert "model.layers.0.mlp.up_proj.weight" not in stored
    up = "model.layers.0.mlp.up_proj"
    assert stored[f"{up}.compressed"].shape == (64, 16) and stored[f"{up}.bitmask"].shape == (64, 4)
    assert stored[f"{up}.bitmask"].dtype == torch.uint8 and stored[f"{up}.shape"].tolist() == [[64], [32]]


def test_a_tied_head_stays_dense_and_is_listed_as_ignored(tokenizer: Any, tmp_path: Path) -> None:
    model = pruned("gemma")
    assert model.config.tie_word_embeddings
    out = save_pretrained(model, tokenizer, tmp_path / "c", save_format="compressed")
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
    stored = load_file(str(out / "model.safetensors"))
    assert "model.embed_tokens.weight" in stored and not any(k.startswith("lm_head") for k in stored)


def test_compressed_checkpoint_is_smaller_by_the_expected_bytes(tokenizer: Any, tmp_path: Path) -> None:
    """Exact payload: each compressed float32 layer costs 4 bytes per kept value + 1 bit per weight (+ row
    offsets and shape for the bitmask format); everything else is stored as before."""
    for pattern, fmt in (("unstructured", "sparse-bitmask"), ("2:4", "sparse-24")):
        model = pruned("llama", pattern)  # untied: every tensor is saved
        dense = save_pretrained(model, tokenizer, tmp_path / f"dense-{fmt}")
        comp = save_pretrained(model, tokenizer, tmp_path / f"comp-{fmt}", save_format=fmt)
        plan = plan_compression(model, fmt)
        assert len(plan.modules) == 14 and "lm_head" not in plan.modules
        state = model.state_dict()
        expected = sum(t.numel() * t.element_size() for t in state.values())
        assert payload_bytes(dense / "model.safetensors") == expected
        for name in plan.modules:
            weight = state[f"{name}.weight"]
            rows, cols = weight.shape
            bits = rows * math.ceil(cols / 8)
            if fmt == "sparse-bitmask":
                compressed = int((weight != 0).sum()) * 4 + bits + rows * 8 + 2 * 8
            else:
                compressed = rows * cols // 2 * 4 + bits + 2 * 8
            expected += compressed - weight.numel() * 4
        assert payload_bytes(comp / "model.safetensors") == expected
        assert checkpoint_size_bytes(comp) < checkpoint_size_bytes(dense)


def test_plain_transformers_does_not_decompress(tokenizer: Any, tmp_path: Path) -> None:
    """transformers (and compressed-tensors >= 0.15) no longer read sparse formats: the compressed weights
    are reported missing (and left randomly initialised), which is why prunekit's loader decompresses.
    (Without compressed-tensors installed, transformers refuses the checkpoint outright.)"""
    pytest.importorskip("compressed_tensors")
    model = pruned("llama")
    out = save_pretrained(model, tokenizer, tmp_path / "c", save_format="compressed")
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)
    try:
        _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    finally:
        transformers_logger.setLevel(level)
    compressed = {f"{name}.weight" for name in plan_compression(model, "compressed").modules}
    assert set(info["missing_keys"]) == compressed


def test_compressed_tensors_reads_the_config_and_the_bitmasks() -> None:
    """Cross-check with the installed compressed-tensors: format names, config schema, bit packing."""
    ct_config = pytest.importorskip("compressed_tensors.config")
    ct_utils = pytest.importorskip("compressed_tensors.utils")
    assert ct_config.CompressionFormat.sparse_bitmask.value == BITMASK
    assert ct_config.CompressionFormat.sparse_24_bitmask.value == SPARSE_24
    for fmt, structure in ((BITMASK, "unstructured"), (SPARSE_24, "2:4")):
        parsed = ct_config.SparsityCompressionConfig.load_from_registry(
            fmt, format=fmt, targets=["Linear"], ignore=["lm_head"], global_sparsity=0.4, sparsity_structure=structure
        )
        assert parsed.format == fmt and parsed.sparsity_structure == structure
    mask = torch.rand(7, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(pack_bits(mask), ct_utils.pack_bitmasks(mask))
    assert torch.equal(unpack_bits(pack_bits(mask), (7, 21)), ct_utils.unpack_bitmasks(pack_bits(mask), [7, 21]))


def test_checkpoint_size_counts_only_top_level_weight_files(tmp_path: Path) -> None:
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 50)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 7)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "prunekit-report").mkdir()
    (tmp_path / "prunekit-report" / "extra.safetensors").write_bytes(b"x" * 1000)
    assert checkpoint_size_bytes(tmp_path) == 157
    assert checkpoint_format(tmp_path) == DENSE


# --- single weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_weight_round_trip(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(9, 13, generator=generator).to(dtype)
    weight[torch.rand(9, 13, generator=generator) < 0.6] = 0
    weight[0] = 0  # an empty row
    weight[1, 3] = -0.0
    parts = bitmask_compress(weight)
    assert parts["compressed"].numel() == int((weight != 0).sum()) and parts["compressed"].dtype == dtype
    assert parts["row_offsets"].tolist()[:2] == [0, 0]
    back = bitmask_decompress(parts)
    assert back.dtype == dtype and canonical(back) == canonical(weight)


def test_sparse24_weight_round_trip_with_short_groups() -> None:
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 16, generator=generator)
    groups = weight.view(6, 4, 4)
    groups[..., 1::2] = 0  # 2 of 4 kept
    groups[0, 0] = 0  # a group with no value
    groups[1, 1, 0] = 0  # a group with one value
    parts = sparse24_compress(weight)
    assert parts["compressed"].shape == (6, 8)
    assert int(unpack_bits(parts["bitmask"], (6, 16)).sum()) == 6 * 8  # exactly 2 of every 4 marked
    assert torch.equal(sparse24_decompress(parts), weight)


def test_pattern_fits_24() -> None:
    assert pattern_fits_24(NM(2, 4)) and pattern_fits_24(NM(1, 4)) and pattern_fits_24(NM(2, 8))
    assert pattern_fits_24(NM(1, 2))
    assert not pattern_fits_24(NM(3, 4)) and not pattern_fits_24(NM(4, 8)) and not pattern_fits_24(NM(2, 3))
    assert not pattern_fits_24(Unstructured(0.5))
    check_save_format("sparse-24", NM(2, 4))
    check_save_format("compressed", Unstructured(0.5))
    with pytest.raises(ConfigError, match="--pattern 2:4"):
        check_save_format("sparse-24-bitmask", Unstructured(0.5))


# --- errors -----------------------------------------------------------------------------------------------


def test_sparse24_on_unstructured_weights_is_an_error_and_writes_nothing(tokenizer: Any, tmp_path: Path) -> None:
    model = pruned("llama", "unstructured")
    target = tmp_path / "new" / "out"
    with pytest.raises(ConfigError, match=r"not 2:4.*--pattern 2:4.*--save-format compressed") as error:
        save_pretrained(model, tokenizer, target, save_format="sparse-24")
    assert "model.layers.0.self_attn.q_proj" in str(error.value)
    assert not (tmp_path / "new").exists()


def test_sparse24_without_sparse_layers_is_an_error(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no linear layer has enough zeros"):
        save_pretrained(tiny_model("llama"), tokenizer, tmp_path / "out", save_format="sparse-24")
    assert not (tmp_path / "out").exists()


def test_compressed_on_a_dense_model_saves_dense(
    tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        out = save_pretrained(model, tokenizer, tmp_path / "out", save_format="compressed")
    assert "no sparse linear layer" in caplog.text
    assert checkpoint_format(out) == DENSE
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert_same_weights(model.state_dict(), transformers.AutoModelForCausalLM.from_pretrained(out).state_dict())


def test_incomplete_compressed_checkpoint_is_a_clear_load_error(tokenizer: Any, tmp_path: Path) -> None:
    out = save_pretrained(pruned("llama"), tokenizer, tmp_path / "c", save_format="compressed")
    file = out / "model.safetensors"
    stored = load_file(str(file))
    del stored["model.layers.1.mlp.up_proj.bitmask"]
    save_file(stored, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"'model.layers.1.mlp.up_proj' .*lacks bitmask"):
        prunekit.load_model(out)


def test_recipe_key_is_validated() -> None:
    assert prunekit.Recipe.from_dict({"output": {"save_format": "sparse-24"}}).output.save_format == "sparse-24"
    with pytest.raises(ConfigError, match=r"output\.save_format"):
        prunekit.Recipe.from_dict({"output": {"save_format": "zip"}})


# --- the command line -------------------------------------------------------------------------------------


def run_cli(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_cli_compressed_end_to_end(tmp_path: Path) -> None:
    model_dir = save_tiny_checkpoint(tmp_path / "tiny-llama")
    prune = ["-q", "prune", model_dir, "--method", "magnitude", "--pattern", "2:4"]
    rc, _, _ = run_cli(*prune, "--out", tmp_path / "dense")
    assert rc == 0
    rc, stdout, _ = run_cli(*prune, "--out", tmp_path / "comp", "--save-format", "compressed")
    assert rc == 0
    comp = (tmp_path / "comp").resolve()
    size = checkpoint_size_bytes(comp)
    assert f"checkpoint: {comp} (sparse-24-bitmask, {size / 2**20:.1f} MiB of weights)" in stdout
    assert size < checkpoint_size_bytes(tmp_path / "dense")
    report = json.loads((comp / "prunekit-report" / "report.json").read_text())
    assert report["output"]["save_format"] == "compressed"
    assert report["output"]["written_format"] == "sparse-24-bitmask"
    assert report["output"]["size_bytes"] == size
    assert report["recipe"]["output"]["save_format"] == "compressed"
    assert "format **sparse-24-bitmask**" in (comp / "prunekit-report" / "report.md").read_text()
    dense_report = json.loads((tmp_path / "dense" / "prunekit-report" / "report.json").read_text())
    assert dense_report["output"]["written_format"] == "dense"
    assert dense_report["output"]["size_bytes"] == checkpoint_size_bytes(tmp_path / "dense")
    assert_same_weights(
        prunekit.load_model(tmp_path / "dense").model.state_dict(), prunekit.load_model(comp).model.state_dict()
    )


def test_cli_sparse24_on_unstructured_fails_before_pruning(tmp_path: Path) -> None:
    model_dir = save_tiny_checkpoint(tmp_path / "tiny-llama")
    out = tmp_path / "out"
    args = ["prune", model_dir, "--method", "magnitude", "--sparsity", "0.5", "--out", out]
    rc, stdout, stderr = run_cli("-q", *args, "--save-format", "sparse-24")
    assert rc == 2 and stdout == ""
    assert "prunekit: error:" in stderr and "--pattern 2:4" in stderr and "--save-format compressed" in stderr
    assert not out.exists()
