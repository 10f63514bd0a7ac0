"""Pruning a checkpoint block by block from disk gives exactly the in-memory result, as a sharded checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import prunekit
from models import FAMILIES, sample_text, save_tiny_checkpoint, tiny_model, tiny_tokenizer
from prunekit.calibration.data import tokenize_text
from prunekit.core.errors import ConfigError, ModelLoadError, OutputError
from prunekit.io.streaming import INDEX_FILE, build_skeleton, shard_name
from prunekit.oneshot import prune_checkpoint


@pytest.fixture(scope="module")
def calibration():
    tokens = tokenize_text(tiny_tokenizer(), sample_text())
    return prunekit.calibration.sample_windows(tokens, nsamples=4, seqlen=32, seed=0)


def _state_bytes(model):
    return {k: v.detach().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("family", "method", "pattern"),
    [(f, "wanda", "unstructured") for f in FAMILIES] + [("llama", "sparsegpt", "2:4"), ("gpt2", "sparsegpt", "2:4")],
)
def test_lazy_equals_in_memory_bit_for_bit(family, method, pattern, calibration, tmp_path):
    source = save_tiny_checkpoint(tmp_path / "in", family)
    options = {"block_size": 16} if method == "sparsegpt" else {}
    config = prunekit.PruneConfig(method=method, pattern=pattern, **options)
    expected = prunekit.prune(tiny_model(family), config, calibration, progress=False).model
    result = prune_checkpoint(source, tmp_path / "out", config, calibration, progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    assert _state_bytes(reloaded) == _state_bytes(expected)
    assert [r.name for r in result.layers] == [
        r.name for r in prunekit.prune(tiny_model(family), config, calibration, progress=False).layers
    ]
    assert result.overall_sparsity == pytest.approx(0.5)


def test_output_is_sharded_one_block_per_file_and_the_input_is_untouched(calibration, tmp_path):
    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    prune_checkpoint(source, tmp_path / "out", prunekit.PruneConfig(), calibration, progress=False)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    n_blocks = tiny_model("llama").config.num_hidden_layers
    files = set(index["weight_map"].values())
    assert shard_name(1, len(files)) in files
    assert all(
        index["weight_map"][f"model.layers.{i}.mlp.down_proj.weight"] == shard_name(i + 1, len(files))
        for i in range(n_blocks)
    )
    assert {f.name: f.read_bytes() for f in source.iterdir()} == before


def test_magnitude_without_calibration_streams_too(tmp_path):
    source = save_tiny_checkpoint(tmp_path / "in", "qwen2")
    config = prunekit.PruneConfig(method="magnitude", sparsity=0.25)
    expected = prunekit.prune(tiny_model("qwen2"), config, progress=False).model
    prune_checkpoint(source, tmp_path / "out", config, progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert _state_bytes(reloaded) == _state_bytes(expected)


def test_skeleton_holds_no_weights(tmp_path):
    model, checkpoint = build_skeleton(save_tiny_checkpoint(tmp_path / "in", "llama"))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in checkpoint


def test_clear_errors_and_nothing_written(calibration, tmp_path):
    with pytest.raises(ModelLoadError, match=r"no \.safetensors files"):
        prune_checkpoint(tmp_path, tmp_path / "out", prunekit.PruneConfig(), calibration, progress=False)
    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        prune_checkpoint(source, tmp_path / "busy", prunekit.PruneConfig(), calibration, progress=False)
    with pytest.raises(ConfigError, match="outside the decoder blocks"):
        prune_checkpoint(
            source, tmp_path / "o2", prunekit.PruneConfig(include=["lm_head"]), calibration, progress=False
        )
    assert not (tmp_path / "o2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_nan_in_a_streamed_block_names_the_layer(calibration, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "in")
    with pytest.raises(prunekit.core.errors.NonFiniteError, match=r"layers\.1\.mlp\.up_proj"):
        prune_checkpoint(tmp_path / "in", tmp_path / "out", prunekit.PruneConfig(), calibration, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_lazy_end_to_end_and_its_errors(tmp_path, capsys):
    from prunekit.cli import main
    from prunekit.io.hub import read_card_metadata

    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text())
    common = [str(source), "--lazy", "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "-q"]
    assert main(["prune", *common, "--out", str(tmp_path / "out")]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    assert (tmp_path / "out" / "prunekit-report" / "report.json").is_file()
    card = read_card_metadata(tmp_path / "out")  # the model card lands with the shards
    assert card["base_model"] == str(source) and card["tags"] == ["pruned", "prunekit", "wanda", "unstructured"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = prunekit.prune(
        tiny_model("llama"), prunekit.PruneConfig(), prunekit.calibration_windows(tiny_tokenizer(), calib, 4, 32)
    ).model
    assert _state_bytes(reloaded) == _state_bytes(expected)
    assert main(["prune", *common]) == 2
    assert "pass --out DIR" in capsys.readouterr().err
    assert main(["prune", *common, "--out", str(tmp_path / "o2"), "--ppl", str(calib)]) == 2
    assert "prunekit eval OUT" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_streamed_safetensors_writer_and_mapped_reader_round_trip(dtype, tmp_path):
    from safetensors.torch import load_file

    from prunekit.io.safetensors_files import SafetensorsCheckpoint, write_safetensors

    tensors = {
        "b.weight": (torch.arange(24).reshape(4, 6) % 3).to(dtype),
        "a.scalar": torch.tensor(1).to(dtype),
        "c.empty": torch.zeros(0, 3, dtype=dtype),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    loaded = load_file(tmp_path / "x.safetensors")  # the official reader agrees
    checkpoint = SafetensorsCheckpoint(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == dtype
        mapped = checkpoint.map(name)
        assert torch.equal(mapped, tensor) and mapped.dtype == dtype
    checkpoint.map("b.weight").fill_(0)  # copy-on-write: the file is unchanged
    assert torch.equal(checkpoint.read("b.weight"), tensors["b.weight"])
