"""``prunekit structured`` reads the same strict, YAML-able configuration as ``prunekit prune``: a recipe runs
exactly like the equivalent flags, flags override it, and a typo is an error that names the key."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from safetensors.torch import load_file

from models import sample_text, save_tiny_checkpoint
from prunekit.cli import main
from prunekit.core.errors import ConfigError
from prunekit.structured.config import StructuredConfig


def test_a_recipe_runs_like_the_equivalent_flags(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    (tmp_path / "calib.txt").write_text(sample_text())
    flags = ["--ratio", "0.3", "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32"]
    assert main(["-q", "structured", str(model_dir), *flags, "--out", str(tmp_path / "by-flags")]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {model_dir}\nratio: 0.5\ncalib: {tmp_path / 'calib.txt'}\nnsamples: 4\nseqlen: 32\n"
        f"out: {tmp_path / 'by-recipe'}\n"
    )
    # the file says 0.5; the flag given on the command line wins
    assert main(["-q", "structured", "--recipe", str(recipe), "--ratio", "0.3"]) == 0
    by_flags = load_file(tmp_path / "by-flags" / "model.safetensors")
    by_recipe = load_file(tmp_path / "by-recipe" / "model.safetensors")
    assert by_flags.keys() == by_recipe.keys()
    assert all((by_flags[k] == by_recipe[k]).all() for k in by_flags)


def test_print_recipe_round_trips(tmp_path):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert (
            main(["structured", "--torchvision", "resnet18", "--ratio", "0.4", "--no-reconstruct", "--print-recipe"])
            == 0
        )
    (tmp_path / "r.yaml").write_text(buffer.getvalue())
    config = StructuredConfig.from_yaml(tmp_path / "r.yaml")
    assert config == StructuredConfig(torchvision="resnet18", ratio=0.4, reconstruct=False)


def test_an_unknown_or_invalid_key_names_itself(tmp_path):
    (tmp_path / "r.yaml").write_text("ratoi: 0.3\n")
    with pytest.raises(ConfigError, match="ratoi: unknown key"):
        StructuredConfig.from_yaml(tmp_path / "r.yaml")
    assert main(["structured", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(ConfigError, match="mode: Input should be 'width', 'depth' or 'search'"):
        StructuredConfig(mode="height")
    assert not (tmp_path / "o").exists()


def test_model_flags_are_config_keys():
    from prunekit.cli import build_parser
    from prunekit.cli.structured import config_from_args

    args = build_parser().parse_args(["structured", "--trust-remote-code", "--dtype", "bfloat16", "--out", "x"])
    config = config_from_args(args)
    assert config.trust_remote_code is True and config.dtype == "bfloat16"


def test_the_shipped_recipes_are_valid_configs():
    recipes = Path(__file__).resolve().parents[2] / "bench" / "recipes"
    width = StructuredConfig.from_yaml(recipes / "structured-25-width.yaml")
    assert (width.mode, width.ratio, width.criterion, width.reconstruct) == ("width", 0.25, "obs", True)
    search = StructuredConfig.from_yaml(recipes / "structured-25.yaml")
    assert (search.mode, search.ratio, search.nsamples, search.search.generations) == ("search", 0.25, 32, 12)
