"""``prunekit experts`` end to end on a tiny Mixtral checkpoint: remove experts, prune inside the rest to a
budget (STUN), save, report; and every bad input refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from models import sample_text, save_tiny_checkpoint
from prunekit.cli import main
from prunekit.io.hub import read_card_metadata


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("experts")
    save_tiny_checkpoint(root / "mixtral", "mixtral")
    save_tiny_checkpoint(root / "llama", "llama")
    (root / "calib.txt").write_text(sample_text())
    return root


def base(workspace: Path, model: str = "mixtral") -> list[str]:
    calib = str(workspace / "calib.txt")
    return ["-q", "experts", str(workspace / model), "--calib", calib, "--nsamples", "4", "--seqlen", "32"]


def test_stun_end_to_end(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = workspace / "stun"
    argv = [*base(workspace), "--remove", "0.25", "--criterion", "reap", "--then", "wanda", "--budget", "0.5"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "experts per layer: 4 -> 3 (reap)" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 3
    experts = [model.model.layers[i].mlp.experts for i in range(2)]
    tensors = [t for e in experts for t in (e.gate_up_proj, e.down_proj)]
    assert all(t.shape[0] == 3 for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    assert report["expert_zeros"] == zeros
    assert report["expert_params_before"] == 4 * sum(t.numel() for t in tensors) // 3
    removed = report["expert_params_removed_fraction"]
    assert removed == pytest.approx(
        (report["expert_params_before"] - sum(t.numel() for t in tensors) + zeros) / report["expert_params_before"]
    )
    assert 0.45 < removed <= 0.5  # the budget, less each row's rounding down
    assert report["oneshot_method"] == "wanda" and report["oneshot"]["sparsity"] == pytest.approx(1 / 3)
    card = read_card_metadata(out)  # the model card, written with the model
    assert card["base_model"] == str(workspace / "mixtral")
    assert card["tags"] == ["pruned", "prunekit", "reap", "expert-pruning", "moe", "wanda", "unstructured"]
    text = (out / "README.md").read_text()
    assert "| routed experts per layer | 4 | 3 |" in text
    assert f"| parameters | {report['params_before']:,} | {report['params_after']:,} |" in text
    assert report["oneshot"]["include"] == [r"\.experts\.\d+\."]
    kept_rows = [row for row in report["experts"] if row["kept"]]
    assert len(kept_rows) == 6 and all(row["sparsity"] > 0.3 for row in kept_rows)
    assert sum(not row["kept"] for row in report["experts"]) == 2
    assert (out / "prunekit-report" / "layers.png").is_file()
    assert "| model.layers.0.mlp |" in (out / "prunekit-report" / "report.md").read_text()
    # the attention was not pruned: only the experts are the one-shot step's targets
    dense = transformers.AutoModelForCausalLM.from_pretrained(workspace / "mixtral")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize(
    ("extra", "model", "message"),
    [
        (["--remove", "0.75"], "mixtral", "fewer than the 2 each token is routed to"),
        (["--remove", "1.5"], "mixtral", "remove"),
        ([], "llama", "no mixture-of-experts layer"),
        (["--budget", "0.5"], "mixtral", "give `then` too"),
        (["--sparsity", "0.5"], "mixtral", "add --then METHOD"),
        (["--then", "wanda", "--budget", "0.1"], "mixtral", "budget 0.1 is below"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(
    workspace: Path, extra: list[str], model: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace / "refused"
    assert main([*base(workspace, model), *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_calibration_too_small(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = workspace / "tiny-calib"
    argv = ["-q", "experts", str(workspace / "mixtral"), "--calib", str(workspace / "calib.txt")]
    assert main([*argv, "--nsamples", "1", "--seqlen", "1", "--out", str(out)]) == 2
    assert "cannot reach all 4 experts" in capsys.readouterr().err and not out.exists()


def test_recipe_and_print_recipe(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = workspace / "recipe.yaml"
    recipe.write_text("experts:\n  criterion: stun\n  remove: 0.5\nthen:\n  method: magnitude\n")
    assert main([*base(workspace), "--recipe", str(recipe), "--criterion", "frequency", "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert "criterion: frequency" in text and "remove: 0.5" in text and "method: magnitude" in text
