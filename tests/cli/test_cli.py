"""The ``prunekit`` command end to end on a tiny llama checkpoint: prune, save, report, recipe, eval."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from models import sample_text, save_tiny_checkpoint
from prunekit.cli import build_parser, main

TARGET = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
N_TARGETS = 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_cli(*argv: str | Path) -> tuple[int, str]:
    """``main(argv)`` with its stdout captured (usable from module-scoped fixtures)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main([str(a) for a in argv])
    return rc, buffer.getvalue()


def load_plain(directory: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def state(directory: Path) -> dict[str, torch.Tensor]:
    return load_plain(directory).state_dict()


class Workspace:
    def __init__(self, root: Path) -> None:
        text = sample_text()
        self.model = save_tiny_checkpoint(root / "tiny-llama", "llama")
        self.calib = root / "calib.txt"
        self.calib.write_text(text[: len(text) // 2])
        self.ppl = root / "ppl.txt"
        self.ppl.write_text(text[len(text) // 2 :])
        self.root = root
        self.digest = tree_digest(self.model)

    def prune_args(self, out: Path, *extra: str | Path) -> list[str | Path]:
        calib = ["--calib", self.calib, "--nsamples", "4", "--seqlen", "32", "--seed", "0"]
        return ["-q", "prune", self.model, "--method", "wanda", *calib, "--out", out, *extra]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def wanda_run(ws: Workspace) -> tuple[int, str, Path]:
    out = ws.root / "wanda50"
    rc, stdout = run_cli(
        *ws.prune_args(out, "--sparsity", "0.5", "--ppl", ws.ppl, "--ppl-seqlen", "64", "--ppl-windows", "2")
    )
    return rc, stdout, out


@pytest.fixture(scope="module")
def nm_run(ws: Workspace) -> tuple[int, Path]:
    out = ws.root / "nm24"
    rc, _ = run_cli(*ws.prune_args(out, "--pattern", "2:4"))
    return rc, out


def test_prune_succeeds_and_prints_a_summary(wanda_run: tuple[int, str, Path]) -> None:
    rc, stdout, out = wanda_run
    assert rc == 0
    assert f"pruned {N_TARGETS} layers: sparsity 50.00%" in stdout
    assert "perplexity before:" in stdout and "perplexity after:" in stdout
    assert f"checkpoint: {out.resolve()}" in stdout


def test_output_is_a_plain_transformers_checkpoint(wanda_run: tuple[int, str, Path], ws: Workspace) -> None:
    _, _, out = wanda_run
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "auto_map" not in config
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = load_plain(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("to be or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()


def test_every_target_row_is_exactly_half_zero(wanda_run: tuple[int, str, Path]) -> None:
    _, _, out = wanda_run
    pruned = state(out)
    targets = [k for k in pruned if TARGET.match(k)]
    assert len(targets) == N_TARGETS
    for name in targets:
        weight = pruned[name]
        zeros_per_row = (weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == weight.shape[1] // 2), name


def test_everything_else_is_bit_identical(wanda_run: tuple[int, str, Path], ws: Workspace) -> None:
    _, _, out = wanda_run
    dense, pruned = state(ws.model), state(out)
    assert dense.keys() == pruned.keys()
    others = [k for k in dense if not TARGET.match(k)]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(others)
    assert any("layernorm" in k for k in others)
    for name in others:
        assert dense[name].dtype == pruned[name].dtype
        assert torch.equal(dense[name], pruned[name]), name
    for name in dense:  # pruning only removes: surviving weights are unchanged
        if TARGET.match(name):
            kept = pruned[name] != 0
            assert torch.equal(pruned[name][kept], dense[name][kept]), name


def test_report_files(wanda_run: tuple[int, str, Path]) -> None:
    _, _, out = wanda_run
    report_dir = out / "prunekit-report"
    for name in ("report.json", "report.md", "layers.png"):
        assert (report_dir / name).is_file() and (report_dir / name).stat().st_size > 0, name
    assert (report_dir / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((report_dir / "report.json").read_text())
    for when in ("before", "after"):
        ppl = report["perplexity"][when]
        assert math.isfinite(ppl["perplexity"]) and ppl["perplexity"] > 1
        assert ppl["windows"] == 2 and ppl["seqlen"] == 64
    assert report["perplexity"]["before"]["perplexity"] != report["perplexity"]["after"]["perplexity"]
    assert report["method"] == "wanda" and report["refit_steps"] == 0
    assert report["calibration"] == {"windows": 4, "seqlen": 32}
    layers = report["layers"]
    assert len(layers) == N_TARGETS == report["summary"]["layers"]
    for layer in layers:
        assert TARGET.match(layer["name"] + ".weight")
        assert layer["sparsity"] == pytest.approx(0.5)
        assert layer["relative_error"] is not None and layer["relative_error"] >= 0
    assert report["summary"]["overall_sparsity"] == pytest.approx(0.5)
    md = (report_dir / "report.md").read_text()
    assert "perplexity before" in md and "model.layers.0.self_attn.q_proj" in md


def test_pattern_2_4_gives_two_zeros_in_every_group_of_four(nm_run: tuple[int, Path]) -> None:
    rc, out = nm_run
    assert rc == 0
    pruned = state(out)
    targets = [k for k in pruned if TARGET.match(k)]
    assert len(targets) == N_TARGETS
    for name in targets:
        weight = pruned[name]
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert torch.all((groups == 0).sum(dim=-1) == 2), name
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    assert report["pattern"] == "2:4"


def test_yaml_recipe_gives_the_same_weights_as_flags(ws: Workspace, wanda_run: tuple[int, str, Path]) -> None:
    _, _, flags_out = wanda_run
    recipe = ws.root / "recipe.yaml"
    out = ws.root / "from-recipe"
    recipe.write_text(
        f"model:\n  source: {ws.model}\n"
        "prune:\n  method: wanda\n  sparsity: 0.5\n"
        f"calibration:\n  path: {ws.calib}\n  nsamples: 4\n  seqlen: 32\n  seed: 0\n"
        f"output:\n  dir: {out}\n"
    )
    rc, _ = run_cli("-q", "prune", "--recipe", recipe)
    assert rc == 0
    a, b = load_file(str(flags_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_print_recipe_shows_flags_over_recipe(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = ws.root / "base.yaml"
    recipe.write_text("prune:\n  method: magnitude\n  sparsity: 0.3\ncalibration:\n  nsamples: 8\n")
    assert main(["prune", str(ws.model), "--recipe", str(recipe), "--sparsity", "0.6", "--print-recipe"]) == 0
    printed = capsys.readouterr().out
    assert "method: magnitude" in printed and "sparsity: 0.6" in printed and "nsamples: 8" in printed


def test_refit_steps_flag_reaches_the_recipe(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", str(ws.model), "--method", "wanda", "--refit-steps", "3", "--print-recipe"]) == 0
    assert "refit_steps: 3" in capsys.readouterr().out


def test_eval_prints_json_perplexity(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "eval", str(ws.model), "--ppl", str(ws.ppl), "--seqlen", "64", "--windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    assert result["windows"] == 2 and result["seqlen"] == 64 and result["tokens_scored"] == 2 * 63


def test_eval_matches_the_report(ws: Workspace, wanda_run: tuple[int, str, Path], capsys) -> None:
    _, _, out = wanda_run
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    for model, when in ((ws.model, "before"), (out, "after")):
        assert main(["-q", "eval", str(model), "--ppl", str(ws.ppl), "--seqlen", "64", "--windows", "2", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["perplexity"] == pytest.approx(report["perplexity"][when]["perplexity"], rel=1e-5)


def test_quiet_flag_after_the_subcommand() -> None:
    args = build_parser().parse_args(["prune", "model-dir", "-q"])
    assert args.quiet is True


def test_report_records_the_command(wanda_run: tuple[int, str, Path]) -> None:
    _, _, out = wanda_run
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    assert report["command"].startswith("prunekit -q prune ")
    assert "--sparsity 0.5" in report["command"]


def test_input_directory_is_unchanged(
    ws: Workspace, wanda_run: tuple[int, str, Path], nm_run: tuple[int, Path]
) -> None:
    assert wanda_run[0] == 0 and nm_run[0] == 0
    assert tree_digest(ws.model) == ws.digest
