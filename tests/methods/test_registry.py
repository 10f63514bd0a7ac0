"""A method registered in a test is found by the configuration, the recipe and the command line without
any other module knowing it; a method's own options belong to it alone."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from pydantic import Field

import prunekit
from models import save_tiny_checkpoint, tiny_model
from prunekit.cli import main
from prunekit.core.errors import ConfigError
from prunekit.methods import LayerStatistics, MethodConfig, ScoreMethod, method_names, registered


class KeepFirstConfig(MethodConfig):
    reverse: bool = Field(False, description="keep-first: keep the last columns of each group instead")


class KeepFirst(ScoreMethod):
    """Scores fall with the column index (or rise, with ``reverse``): at 2:4 each group of four keeps its
    first two columns (its last two). Needs no calibration."""

    name = "keep-first"
    summary = "test method: earlier input columns first"
    config_class = KeepFirstConfig

    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        order = torch.arange(weight.shape[1], dtype=torch.float32)
        column_score = order if self.config.reverse else -order
        return column_score.expand(weight.shape[0], -1).clone()


@pytest.fixture
def keep_first():
    with registered(KeepFirst):
        yield KeepFirst
    assert "keep-first" not in method_names()


def _expected_keep(columns: int, reverse: bool) -> torch.Tensor:
    within = torch.arange(columns) % 4
    return within >= 2 if reverse else within < 2


@pytest.mark.parametrize("reverse", [False, True])
def test_a_registered_method_prunes_through_the_api(keep_first, reverse):
    config = prunekit.PruneConfig(method="keep-first", pattern="2:4", reverse=reverse)
    assert isinstance(config.options, KeepFirstConfig) and config.options.reverse is reverse
    result = prunekit.prune(tiny_model("llama"), config, progress=False)
    assert result.layers and all(layer.method == "keep-first" for layer in result.layers)
    for layer in result.layers:
        weight = result.model.get_submodule(layer.name).weight
        kept = weight != 0
        assert torch.equal(kept, _expected_keep(weight.shape[1], reverse).expand_as(kept))


def test_a_registered_method_is_read_from_a_recipe_and_dumped_flat(keep_first, tmp_path):
    file = tmp_path / "recipe.yaml"
    file.write_text("prune:\n  method: keep-first\n  reverse: true\n  pattern: '2:4'\n")
    recipe = prunekit.Recipe.from_yaml(file)
    assert recipe.prune.options == KeepFirstConfig(reverse=True)
    dumped = yaml.safe_load(recipe.to_yaml())["prune"]
    assert dumped["method"] == "keep-first" and dumped["reverse"] is True and "options" not in dumped
    assert prunekit.Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_a_registered_method_runs_from_the_command_line(keep_first, tmp_path: Path):
    source = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(
            [
                "-q",
                "prune",
                str(source),
                "--method",
                "keep-first",
                "--reverse",
                "--pattern",
                "2:4",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert rc == 0, buffer.getvalue()
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    weight = pruned.model.layers[0].mlp.down_proj.weight
    assert torch.equal(weight != 0, _expected_keep(weight.shape[1], True).expand_as(weight))


def test_the_command_line_offers_the_registered_methods_options(keep_first):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "keep-first" in buffer.getvalue() and "--reverse" in buffer.getvalue()


def test_another_methods_option_is_an_error_naming_its_owner():
    with pytest.raises(ConfigError, match="block_size is an option of method sparsegpt, not of wanda"):
        prunekit.PruneConfig(method="wanda", block_size=64)
    with pytest.raises(ConfigError, match="dampening is an option of method alps or sparsegpt, not of wanda"):
        prunekit.PruneConfig(method="wanda", dampening=0.1)
    with pytest.raises(ConfigError, match="unknown method 'keep-first'"):
        prunekit.PruneConfig(method="keep-first")


def test_sparsegpt_options_live_on_its_own_config():
    config = prunekit.PruneConfig(method="sparsegpt", dampening=0.05, block_size=64)
    assert config.options.dampening == 0.05 and config.options.block_size == 64
    assert prunekit.PruneConfig(method="wanda").model_dump().keys().isdisjoint({"dampening", "block_size"})


def test_assigning_another_method_keeps_options_consistent():
    config = prunekit.PruneConfig(method="sparsegpt")
    config.method = "wanda"  # default options: replaced by the new method's
    assert type(config.options) is MethodConfig
    tuned = prunekit.PruneConfig(method="sparsegpt", dampening=0.02)
    with pytest.raises(ConfigError, match="are not options of method wanda"):
        tuned.method = "wanda"
    assert tuned.method == "sparsegpt" and tuned.options.dampening == 0.02  # unchanged by the refused assignment


def test_a_recipe_written_before_methods_had_own_options_still_loads(caplog):
    # old recipes and reports listed SparseGPT's defaults for every method: default values are dropped
    old = {"method": "wanda", "dampening": 0.01, "block_size": 128, "hessian_dtype": "float32"}
    assert prunekit.PruneConfig(**old) == prunekit.PruneConfig(method="wanda")
    assert "ignoring dampening=0.01" in caplog.text
    with pytest.raises(ConfigError, match="dampening is an option of method alps or sparsegpt, not of wanda"):
        prunekit.PruneConfig(method="wanda", dampening=0.02)


class Clashing(KeepFirst):
    name = "clashing"

    class config_class(MethodConfig):
        seed: int = 3


def test_a_method_option_named_like_a_common_key_is_refused():
    with registered(Clashing), pytest.raises(ConfigError, match="options named like common keys \\(seed\\)"):
        prunekit.PruneConfig(method="clashing")


def test_method_flag_replaces_the_recipes_method_and_its_options(tmp_path):
    from prunekit.cli import build_parser
    from prunekit.cli.prune import recipe_from_args

    file = tmp_path / "r.yaml"
    file.write_text("prune:\n  method: sparsegpt\n  dampening: 0.05\n")
    args = build_parser().parse_args(["prune", "--recipe", str(file), "--method", "wanda"])
    assert recipe_from_args(args).prune == prunekit.PruneConfig(method="wanda")
    args = build_parser().parse_args(["prune", "--recipe", str(file), "--block-size", "64"])
    assert recipe_from_args(args).prune.options.model_dump() == {
        "dampening": 0.05,
        "block_size": 64,
        "hessian_dtype": "float32",
    }
