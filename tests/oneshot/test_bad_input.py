"""Bad input is refused with a clear error that names the problem and the fix; nothing is written and the
input is left untouched.

Cases go through the Python API (``prune``, ``run_recipe``, ``load_model``, ``Recipe``) and, for a few,
through the CLI (exit status 2, message on stderr).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import prunekit
from models import sample_text, save_tiny_checkpoint, tiny_model, tiny_tokenizer
from prunekit import (
    CalibrationError,
    ConfigError,
    ModelLoadError,
    NonFiniteError,
    OutputError,
    PruneConfig,
    Recipe,
    TargetError,
)
from prunekit.cli import main

# ---------------------------------------------------------------- helpers and fixtures


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself when it is a file)."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def bits(model: nn.Module) -> dict[str, bytes]:
    """The exact bytes of every state_dict tensor (NaN-safe, unlike ``torch.equal``)."""
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


@contextmanager
def nothing_written(inputs: list[Path], out: Path | None = None) -> Iterator[None]:
    """Inputs are byte-identical afterwards; ``out`` was not created and nothing was left beside it."""
    before = {p: tree_digest(p) for p in inputs}
    siblings = sorted(os.listdir(out.parent)) if out is not None and out.parent.is_dir() else None
    yield
    for p in inputs:
        assert tree_digest(p) == before[p], f"{p} was modified"
    if out is not None:
        assert not out.exists(), f"{out} was written"
        if siblings is not None:
            assert sorted(os.listdir(out.parent)) == siblings, "temporary files were left behind"


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "llama", "llama")


@pytest.fixture
def checkpoint(base_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny llama checkpoint, free to corrupt."""
    return Path(shutil.copytree(base_checkpoint, tmp_path / "model"))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(sample_text())
    return path


@pytest.fixture(scope="module")
def calibration(tokenizer: Any, calib_file: Path) -> torch.Tensor:
    return prunekit.calibration_windows(tokenizer, calib_file, nsamples=4, seqlen=32, seed=0)


def recipe_dict(model: Path, calib: Path | None, out: Path | None, **overrides: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": {"source": str(model)},
        "prune": {"method": "wanda", "sparsity": 0.5},
        "calibration": {"path": None if calib is None else str(calib), "nsamples": 4, "seqlen": 32},
        "output": {"dir": None if out is None else str(out)},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return data


def run(data: dict[str, Any]) -> Any:
    return prunekit.run_recipe(Recipe.from_dict(data), command="test", progress=False)


def cli(*argv: str | Path) -> int:
    return main(["-q", *(str(a) for a in argv)])


def assert_cli_error(capsys: pytest.CaptureFixture[str], rc: int, pattern: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    line = next((x for x in err.splitlines() if x.startswith("prunekit: error: ")), None)
    assert line is not None, err
    assert re.search(pattern, line), err


# ---------------------------------------------------------------- settings: sparsity, N:M, method, pattern


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval(sparsity: float) -> None:
    with pytest.raises(ConfigError, match=re.escape("sparsity must be in [0, 1)") + ".*pass e.g. 0.5"):
        PruneConfig(method="magnitude", sparsity=sparsity)
    with pytest.raises(ConfigError, match=re.escape("sparsity must be in [0, 1)")):
        prunekit.Unstructured(sparsity)


@pytest.mark.parametrize("pattern", ["0:4", "4:4", "5:4", "-1:4"])
def test_nm_needs_one_le_n_lt_m(pattern: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("1 <= N < M") + f".*{pattern}.*use e.g. 2:4"):
        PruneConfig(pattern=pattern)
    with pytest.raises(ConfigError, match=re.escape("1 <= N < M")):
        prunekit.parse_pattern(pattern)


def test_nm_sparsity_must_agree_with_the_pattern() -> None:
    with pytest.raises(ConfigError, match=r"implies sparsity 0.5 but sparsity=0.7.*drop --sparsity"):
        PruneConfig(pattern="2:4", sparsity=0.7)


def test_nm_width_not_divisible_names_the_layer(calibration: torch.Tensor) -> None:
    model = tiny_model("llama")  # widths 32 and 64: not divisible by 3
    before = bits(model)
    with pytest.raises(ConfigError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' has 32 inputs.*M=3.*--exclude"):
        prunekit.prune(model, PruneConfig(pattern="2:3"), calibration, progress=False, inplace=True)
    assert bits(model) == before


@pytest.mark.parametrize("method", ["foo", "Wanda", "sparse-gpt"])
def test_unknown_method(method: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown method '{method}': choose one of .*wanda"):
        PruneConfig(method=method)


@pytest.mark.parametrize("pattern", ["structured", "2-4", "2:4:8", ""])
def test_unknown_pattern(pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown pattern .*use 'unstructured' or 'N:M'"):
        PruneConfig(pattern=pattern)


def test_wanda_without_calibration() -> None:
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"'wanda' needs calibration data"):
        prunekit.prune(model, PruneConfig(method="wanda"), None, progress=False)


# ---------------------------------------------------------------- targets


class NoLinear(nn.Module):
    """A stack of blocks with parameters but no linear map at all."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.LayerNorm(8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_model_without_prunable_linear() -> None:
    with pytest.raises(TargetError, match=r"NoLinear has no linear layer to prune"):
        prunekit.prune(NoLinear(), PruneConfig(method="magnitude"), progress=False)


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (PruneConfig(method="magnitude", include=["no_such_layer"]), "include pattern 'no_such_layer' matches no"),
        (PruneConfig(method="magnitude", exclude=["no_such_layer"]), "exclude pattern 'no_such_layer' matches no"),
        (PruneConfig(method="magnitude", include=["q_proj"], exclude=["proj"]), "leave no layer to prune"),
        (PruneConfig(method="magnitude", include=["(unclosed"]), "not a valid regular expression"),
    ],
    ids=["include", "exclude", "nothing-left", "bad-regex"],
)
def test_name_patterns_that_select_nothing(config: PruneConfig, pattern: str) -> None:
    model = tiny_model("llama")
    before = bits(model)
    with pytest.raises(TargetError, match=pattern):
        prunekit.prune(model, config, progress=False, inplace=True)
    assert bits(model) == before


# ---------------------------------------------------------------- calibration data (API)


def test_calibration_file_missing_empty_or_short(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"calibration file .*missing.txt' not found: pass an existing"):
        prunekit.calibration_windows(tokenizer, tmp_path / "missing.txt", nsamples=4, seqlen=32)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n ")
    with pytest.raises(CalibrationError, match=r"calibration file .*empty.txt' is empty: pass a file with text"):
        prunekit.calibration_windows(tokenizer, empty, nsamples=4, seqlen=32)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(CalibrationError, match=r"fewer than nsamples x seqlen = 4 x 32 = 128.*longer text"):
        prunekit.calibration_windows(tokenizer, short, nsamples=4, seqlen=32)


@pytest.mark.parametrize(
    ("nsamples", "seqlen", "pattern"),
    [
        (0, 32, "nsamples must be a positive whole number, got 0"),
        (-3, 32, "nsamples must be a positive whole number, got -3"),
        (4, 0, "seqlen must be a positive whole number, got 0"),
        (4, -1, "seqlen must be a positive whole number, got -1"),
    ],
)
def test_window_counts_must_be_positive(
    tokenizer: Any, calib_file: Path, nsamples: int, seqlen: int, pattern: str
) -> None:
    with pytest.raises(CalibrationError, match=pattern):
        prunekit.calibration_windows(tokenizer, calib_file, nsamples=nsamples, seqlen=seqlen)


def test_seqlen_above_context_api(tokenizer: Any, calib_file: Path) -> None:
    with pytest.raises(CalibrationError, match=r"seqlen 257 is longer than the model's context of 256.*--seqlen 256"):
        prunekit.calibration_windows(tokenizer, calib_file, nsamples=4, seqlen=257, max_context=256)
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match=r"perplexity seqlen 512 is longer than the model's context of 256"):
        prunekit.perplexity(model, tokenizer, calib_file, seqlen=512, progress=False)


@pytest.mark.parametrize(("seqlen", "windows"), [(0, None), (1, 2), (-5, None), (64, 0)])
def test_perplexity_window_args_must_be_positive(
    tokenizer: Any, calib_file: Path, seqlen: int, windows: int | None
) -> None:
    with pytest.raises(CalibrationError, match=r"(seqlen|windows) must be"):
        prunekit.perplexity(tiny_model("llama"), tokenizer, calib_file, seqlen=seqlen, max_windows=windows)


# ---------------------------------------------------------------- calibration and eval data (whole run)


def _missing(tmp: Path) -> Path:
    return tmp / "missing.txt"


def _write(text: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "calib-bad.txt"
        path.write_text(text)
        return path

    return make


RUN_CASES = [
    # id, calibration file maker (None: the good file), overrides, error, message
    ("calib-missing", _missing, {}, CalibrationError, r"calibration file .* not found"),
    ("calib-empty", _write(""), {}, CalibrationError, r"calibration file .* is empty"),
    ("calib-short", _write("too short"), {}, CalibrationError, r"fewer than nsamples x seqlen.*fewer/shorter"),
    ("nsamples-0", None, {"calibration": {"nsamples": 0}}, CalibrationError, "nsamples must be a positive"),
    ("nsamples-neg", None, {"calibration": {"nsamples": -2}}, CalibrationError, "nsamples must be a positive"),
    ("seqlen-0", None, {"calibration": {"seqlen": 0}}, CalibrationError, "seqlen must be a positive"),
    ("seqlen-long", None, {"calibration": {"seqlen": 257}}, CalibrationError, "context of 256 tokens: use --seqlen"),
    ("no-calib", None, {"calibration": {"path": None}}, CalibrationError, "needs calibration text: pass --calib"),
    ("ppl-missing", None, {"eval": {"ppl": "/nonexistent/ppl.txt"}}, CalibrationError, "evaluation file .* not found"),
    ("ppl-long", None, {"eval": {"ppl": "CALIB", "seqlen": 300}}, CalibrationError, "use --ppl-seqlen 256 or less"),
    ("include", None, {"prune": {"include": ["nope"]}}, TargetError, "include pattern 'nope' matches no linear"),
    ("exclude", None, {"prune": {"exclude": ["nope"]}}, TargetError, "exclude pattern 'nope' matches no"),
    ("nm-width", None, {"prune": {"pattern": "2:3", "sparsity": None}}, ConfigError, r"layer 'model\.layers\.0\."),
]


@pytest.mark.parametrize(
    ("maker", "overrides", "error", "pattern"), [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES]
)
def test_run_recipe_refuses_bad_data_and_writes_nothing(
    checkpoint: Path,
    calib_file: Path,
    tmp_path: Path,
    maker: Callable[[Path], Path] | None,
    overrides: dict[str, dict[str, Any]],
    error: type[Exception],
    pattern: str,
) -> None:
    calib = calib_file if maker is None else maker(tmp_path)
    if overrides.get("eval", {}).get("ppl") == "CALIB":
        overrides = {**overrides, "eval": {**overrides["eval"], "ppl": str(calib_file)}}
    out = tmp_path / "out"
    data = recipe_dict(checkpoint, calib, out, **overrides)
    watched = [checkpoint, calib_file] + ([calib] if calib.exists() else [])
    with nothing_written(watched, out), pytest.raises(error, match=pattern):
        run(data)


# ---------------------------------------------------------------- model files


def test_missing_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=r"model path '.*no-such-model' does not exist: check the path"):
        prunekit.load_model(missing)
    with pytest.raises(ModelLoadError, match=r"GGUF file '.*nope\.gguf' not found: check the path"):
        prunekit.load_model(tmp_path / "nope.gguf")
    assert not missing.exists()


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config.json: it is not a Hugging Face model directory"):
        prunekit.load_model(tmp_path / "empty-model")


def test_plain_file_is_not_a_model(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"is a file, not a model: pass a Hugging Face model directory"):
        prunekit.load_model(file)


def _corrupt(file: Path) -> None:
    file.write_bytes(b"\x07garbage, not safetensors\x00" * 64)


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_corrupt, _truncate], ids=["corrupt", "truncated"])
def test_damaged_safetensors(
    checkpoint: Path, calib_file: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    weights = checkpoint / "model.safetensors"
    damage(weights)
    message = r"safetensors file '.*model\.safetensors' is corrupt or truncated .*re-download or re-save it"
    with nothing_written([checkpoint]), pytest.raises(ModelLoadError, match=message):
        prunekit.load_model(checkpoint)
    out = tmp_path / "out"
    with nothing_written([checkpoint], out), pytest.raises(ModelLoadError, match=message):
        run(recipe_dict(checkpoint, calib_file, out))


def test_corrupt_gguf(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="loading .gguf needs the gguf package")
    file = tmp_path / "x.gguf"
    file.write_bytes(b"this is not a gguf file at all" * 32)
    with (
        nothing_written([file]),
        pytest.raises(ModelLoadError, match=r"GGUF file '.*x\.gguf' could not be read.*corrupt"),
    ):
        prunekit.load_model(file)


def test_truncated_gguf(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf", reason="writing a GGUF needs the gguf package")
    import numpy as np

    whole = tmp_path / "whole.gguf"
    writer = gguf.GGUFWriter(str(whole), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(32)
    writer.add_tensor("token_embd.weight", np.arange(256 * 32, dtype=np.float32).reshape(256, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = whole.read_bytes()
    assert gguf.GGUFReader(str(whole)).tensors  # the whole file is a valid GGUF
    file = tmp_path / "cut.gguf"
    file.write_bytes(data[: len(data) // 2])
    with (
        nothing_written([file]),
        pytest.raises(ModelLoadError, match=r"GGUF file '.*cut\.gguf' could not be read.*truncated"),
    ):
        prunekit.load_model(file)


# ---------------------------------------------------------------- outputs


def test_existing_non_empty_output(checkpoint: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    data = recipe_dict(checkpoint, calib_file, out)
    with nothing_written([checkpoint, out]), pytest.raises(OutputError, match=r"exists and is not empty.*--overwrite"):
        run(data)
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]

    data["output"]["overwrite"] = True
    result = run(data)
    assert result.output_dir == out.resolve()
    assert (out / "config.json").is_file() and (out / "prunekit-report" / "report.json").is_file()
    assert not (out / "keep.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]  # no temporary siblings left


def test_existing_empty_output_directory_is_fine(checkpoint: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    run(recipe_dict(checkpoint, calib_file, out, prune={"method": "magnitude"}))
    assert (out / "model.safetensors").is_file()


def test_existing_non_empty_report_dir(checkpoint: Path, calib_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    report.mkdir()
    (report / "old.json").write_text("{}")
    out = tmp_path / "out"
    data = recipe_dict(checkpoint, calib_file, out, output={"report_dir": str(report)})
    with nothing_written([checkpoint, report], out), pytest.raises(OutputError, match=r"not empty.*--overwrite"):
        run(data)


def test_output_is_a_file(checkpoint: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    with (
        nothing_written([checkpoint, out]),
        pytest.raises(OutputError, match=r"exists and is a file: choose a directory"),
    ):
        run(recipe_dict(checkpoint, calib_file, out))


BLOCKED = r"blocker' is a file, not a directory"


def test_output_under_a_regular_file(checkpoint: Path, calib_file: Path, tmp_path: Path) -> None:
    """Unwritable for everyone, root included: the output's parent is a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker / "sub" / "out"
    with nothing_written([checkpoint, blocker]), pytest.raises(OutputError, match=BLOCKED):
        run(recipe_dict(checkpoint, calib_file, out))
    assert blocker.is_file()


def test_output_under_an_executable_regular_file(checkpoint: Path, calib_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("#!/bin/sh\n")
    blocker.chmod(0o755)
    out = blocker / "sub" / "out"
    with nothing_written([checkpoint, blocker]), pytest.raises(OutputError, match=BLOCKED):
        run(recipe_dict(checkpoint, calib_file, out))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_in_read_only_directory(checkpoint: Path, calib_file: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        out = locked / "out"
        with nothing_written([checkpoint], out), pytest.raises(OutputError, match=r"permission denied.*writable"):
            run(recipe_dict(checkpoint, calib_file, out))
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- non-finite weights and activations


def test_nan_weight_names_the_layer(calibration: torch.Tensor) -> None:
    model = tiny_model("llama")
    model.model.layers[1].self_attn.q_proj.weight.data[3, 5] = float("nan")
    before = bits(model)
    message = r"NaN or Inf in the weights of layer 'model\.layers\.1\.self_attn\.q_proj'.*float32"
    with pytest.raises(NonFiniteError, match=message):
        prunekit.prune(model, PruneConfig(), calibration, progress=False)
    with pytest.raises(NonFiniteError, match=message):
        prunekit.prune(model, PruneConfig(method="magnitude"), progress=False, inplace=True)
    assert bits(model) == before


def test_inf_activation_names_the_layer(calibration: torch.Tensor) -> None:
    model = tiny_model("llama")
    model.model.layers[1].input_layernorm.weight.data[0] = float("inf")
    before = bits(model)
    message = r"NaN or Inf in the inputs of layer 'model\.layers\.1\.self_attn\.[qkv]_proj'"
    with pytest.raises(NonFiniteError, match=message):
        prunekit.prune(model, PruneConfig(), calibration, progress=False)  # inplace=False: a copy is pruned
    assert bits(model) == before


def test_nan_weight_in_checkpoint_writes_nothing(
    tmp_path: Path, tokenizer: Any, calib_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj.weight.data[0, 0] = float("nan")
    checkpoint = tmp_path / "nan-model"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    out = tmp_path / "out"
    with nothing_written([checkpoint], out):
        rc = cli("prune", checkpoint, "--calib", calib_file, "--nsamples", "4", "--seqlen", "32", "--out", out)
    assert_cli_error(capsys, rc, r"NaN or Inf in the weights of layer 'model\.layers\.0\.mlp\.down_proj'")


# ---------------------------------------------------------------- recipes


def test_recipe_unknown_key(tmp_path: Path) -> None:
    file = tmp_path / "recipe.yaml"
    file.write_text("prune:\n  method: wanda\n  sparsty: 0.5\n")
    with pytest.raises(ConfigError, match=r"prune(\.|: )sparsty: unknown key; check the spelling"):
        Recipe.from_yaml(file)
    with pytest.raises(ConfigError, match=r"calibration(\.|: )nsample: unknown key"):
        Recipe.from_dict({"calibration": {"nsample": 4}})
    with pytest.raises(ConfigError, match=r"dir_out: unknown key"):
        prunekit.OutputConfig(dir_out="x")


def test_recipe_unknown_section(tmp_path: Path) -> None:
    file = tmp_path / "recipe.yaml"
    file.write_text("pruning:\n  method: wanda\n")
    with pytest.raises(ConfigError, match=r"pruning: unknown key; check the spelling"):
        Recipe.from_yaml(file)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("prune: [1, 2\n", "is not valid YAML"),
        ("- a list\n- of things\n", "must be a mapping of sections"),
        ("prune:\n  sparsity: 2.0\n", re.escape("sparsity must be in [0, 1)")),
        ("prune:\n  method: obs\n", "unknown method 'obs'"),
        ("eval:\n  seqlen: 0\n", r"eval(\.|: )seqlen: .*greater than 0"),
    ],
    ids=["bad-yaml", "not-mapping", "sparsity", "method", "eval-seqlen"],
)
def test_recipe_bad_values(tmp_path: Path, text: str, pattern: str) -> None:
    file = tmp_path / "recipe.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        Recipe.from_yaml(file)


def test_recipe_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"recipe file '.*nope\.yaml' not found"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- the CLI: exit status 2, message on stderr


def _flags(calib: Path, out: Path) -> list[str | Path]:
    return ["--calib", calib, "--nsamples", "4", "--seqlen", "32", "--out", out]


CLI_CASES = [
    ("sparsity", ["--sparsity", "1.5"], re.escape("sparsity must be in [0, 1), got 1.5")),
    ("nm", ["--pattern", "4:4"], re.escape("1 <= N < M, got 4:4")),
    ("pattern", ["--pattern", "dense"], "unknown pattern 'dense'"),
    ("nm-width", ["--pattern", "1:3"], r"layer 'model\.layers\.0\.self_attn\.q_proj' has 32 inputs"),
    ("nsamples", ["--nsamples", "0"], "nsamples must be a positive whole number"),
    ("seqlen", ["--seqlen", "1000"], "longer than the model's context of 256 tokens: use --seqlen 256"),
    ("include", ["--include", "attn_typo"], "include pattern 'attn_typo' matches no linear layer"),
    ("exclude", ["--exclude", "mlp_typo"], "exclude pattern 'mlp_typo' matches no selected layer"),
    ("calib", ["--calib", "/nonexistent/calib.txt"], r"calibration file '/nonexistent/calib\.txt' not found"),
]


@pytest.mark.parametrize(("extra", "pattern"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_prune_bad_flags(
    checkpoint: Path,
    calib_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    pattern: str,
) -> None:
    out = tmp_path / "out"
    with nothing_written([checkpoint, calib_file], out):
        rc = cli("prune", checkpoint, *_flags(calib_file, out), *extra)
    assert_cli_error(capsys, rc, pattern)


def test_cli_missing_model(tmp_path: Path, calib_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with nothing_written([calib_file], out):
        rc = cli("prune", tmp_path / "no-model", *_flags(calib_file, out))
    assert_cli_error(capsys, rc, r"model path '.*no-model' does not exist: check the path")
    rc = cli("eval", tmp_path / "no-model", "--ppl", calib_file, "--seqlen", "32")
    assert_cli_error(capsys, rc, "does not exist")


def test_cli_corrupt_checkpoint(
    checkpoint: Path, calib_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _corrupt(checkpoint / "model.safetensors")
    out = tmp_path / "out"
    with nothing_written([checkpoint], out):
        rc = cli("prune", checkpoint, *_flags(calib_file, out))
    assert_cli_error(capsys, rc, "is corrupt or truncated")


def test_cli_existing_output_and_overwrite(
    checkpoint: Path, calib_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with nothing_written([checkpoint, out]):
        rc = cli("prune", checkpoint, *_flags(calib_file, out))
    assert_cli_error(capsys, rc, "exists and is not empty: choose another or pass --overwrite")
    assert cli("prune", checkpoint, *_flags(calib_file, out), "--overwrite") == 0
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()


def test_cli_recipe_unknown_key(
    checkpoint: Path, calib_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  source: {checkpoint}\nprune:\n  metod: wanda\n")
    out = tmp_path / "out"
    with nothing_written([checkpoint], out):
        rc = cli("prune", "--recipe", recipe, *_flags(calib_file, out))
    assert_cli_error(capsys, rc, r"prune(\.|: )metod: unknown key; check the spelling")


def test_cli_eval_seqlen_above_context(checkpoint: Path, calib_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with nothing_written([checkpoint]):
        rc = cli("eval", checkpoint, "--ppl", calib_file, "--seqlen", "512")
    assert_cli_error(capsys, rc, "perplexity seqlen 512 is longer than the model's context of 256")


def test_cli_unknown_method_is_a_usage_error(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli("prune", checkpoint, "--method", "obs")
    assert exc.value.code == 2
    assert "invalid choice: 'obs'" in capsys.readouterr().err
