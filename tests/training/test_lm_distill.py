"""Distilling a pruned causal LM from its dense original: the held-out KL falls, the zeros stay, a resumed run
ends exactly where an uninterrupted one does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers

import prunekit
from models import sample_text, tiny_model, tiny_tokenizer
from prunekit.calibration.data import tokenize_text
from prunekit.cli import main
from prunekit.core.errors import CalibrationError, ConfigError
from prunekit.io.hub import read_card_metadata
from prunekit.io.saving import save_pretrained
from prunekit.training import lm_distill
from prunekit.training.lm_distill import LMDistillConfig, distill_lm, learning_rate, sparse_masks
from prunekit.training.lm_distill_job import checkpoint_folder

CONFIG = LMDistillConfig(tokens=6 * 2 * 32, seqlen=32, batch_size=2, lr=1e-3, heldout_windows=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return tokenize_text(tiny_tokenizer(), sample_text(20_000))


@pytest.fixture(scope="module")
def pruned() -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = tiny_model("llama")
    with torch.no_grad():  # a confident teacher: a random tiny model's next-token distribution is near uniform
        teacher.lm_head.weight.mul_(30.0)
    windows = tokenize_text(tiny_tokenizer(), sample_text(20_000))[: 4 * 32].reshape(4, 32)
    student = prunekit.prune(teacher, prunekit.PruneConfig(method="wanda"), windows, progress=False).model
    return teacher, student


def test_the_heldout_kl_falls_and_the_zeros_stay(pruned, tokens) -> None:
    teacher, student = pruned
    student = copy.deepcopy(student)
    masks = sparse_masks(student)
    assert masks and all(float((~m).float().mean()) == pytest.approx(0.5) for m in masks.values())
    result = distill_lm(student, copy.deepcopy(teacher), tokens, CONFIG, progress=False)
    assert result.steps == 6 and result.tokens == 6 * 2 * 32 and len(result.losses) == 6
    assert result.kl_after < result.kl_before
    params = dict(student.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name  # pruned weights stay pruned
    assert any(not torch.equal(params[n], dict(pruned[1].named_parameters())[n]) for n in masks)  # it trained


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(pruned, tokens, tmp_path: Path, monkeypatch) -> None:
    teacher, student = pruned
    straight = copy.deepcopy(student)
    uninterrupted = distill_lm(straight, copy.deepcopy(teacher), tokens, CONFIG, progress=False)

    interrupted = copy.deepcopy(student)
    real_batch = lm_distill._batch

    def failing_batch(stream, step, config):
        if step == 4:
            raise KeyboardInterrupt
        return real_batch(stream, step, config)

    monkeypatch.setattr(lm_distill, "_batch", failing_batch)
    with pytest.raises(KeyboardInterrupt):
        distill_lm(
            interrupted, copy.deepcopy(teacher), tokens, CONFIG, checkpoint_dir=tmp_path / "ckpt", progress=False
        )
    monkeypatch.setattr(lm_distill, "_batch", real_batch)

    resumed = copy.deepcopy(student)  # a fresh process would load the pruned model again
    result = distill_lm(
        resumed, copy.deepcopy(teacher), tokens, CONFIG, checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False
    )
    assert result.resumed_from == 3 and len(result.losses) == 6
    assert result.kl_before == uninterrupted.kl_before and result.kl_after == uninterrupted.kl_after
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_input(pruned, tokens, tmp_path: Path) -> None:
    teacher, student = pruned
    with pytest.raises(ConfigError, match="no checkpoint"):
        distill_lm(copy.deepcopy(student), teacher, tokens, CONFIG, checkpoint_dir=tmp_path / "none", resume=True)
    distill_lm(copy.deepcopy(student), teacher, tokens, CONFIG, checkpoint_dir=tmp_path / "c", progress=False)
    other = CONFIG.model_copy(update={"lr": 5e-4})
    with pytest.raises(ConfigError, match="other settings"):
        distill_lm(copy.deepcopy(student), teacher, tokens, other, checkpoint_dir=tmp_path / "c", resume=True)
    with pytest.raises(CalibrationError, match="needs at least 128 tokens"):
        distill_lm(copy.deepcopy(student), teacher, tokens[:100], CONFIG)
    with pytest.raises(ConfigError, match="tokens"):
        LMDistillConfig(tokens=0)


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    config = LMDistillConfig(lr=1.0, warmup=0.1)
    assert learning_rate(0, 100, config) == pytest.approx(0.1)
    assert learning_rate(9, 100, config) == pytest.approx(1.0)
    assert learning_rate(10, 100, config) == pytest.approx(1.0)
    assert learning_rate(100, 100, config) == pytest.approx(0.1)


def test_cli_distills_a_saved_pruned_model_and_keeps_its_zeros(pruned, tmp_path: Path, capsys) -> None:
    teacher, student = pruned
    tokenizer = tiny_tokenizer()
    save_pretrained(teacher, tokenizer, tmp_path / "teacher")
    save_pretrained(student, tokenizer, tmp_path / "student")
    text = tmp_path / "text.txt"
    text.write_text(sample_text(20_000))
    out = tmp_path / "out"
    argv = ["-q", "distill", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--text", str(text)]
    flags = ["--tokens", "384", "--seqlen", "32", "--batch-size", "2", "--lr", "3e-4", "--out", str(out)]
    assert main([*argv, *flags]) == 0
    assert "distilled 6 steps (384 tokens): held-out KL" in capsys.readouterr().out
    distilled = transformers.AutoModelForCausalLM.from_pretrained(out)
    before = dict(student.named_parameters())
    for name, mask in sparse_masks(student).items():
        assert torch.all(dict(distilled.named_parameters())[name][~mask] == 0), name
        assert not torch.equal(dict(distilled.named_parameters())[name], before[name])
    report = json.loads((out / "prunekit-report" / "report.json").read_text())
    assert report["result"]["steps"] == 6 and report["result"]["kl_after"] < report["result"]["kl_before"]
    card = read_card_metadata(out)  # the student has no card of its own: its path is the base model
    assert card["base_model"] == str(tmp_path / "student")
    assert card["tags"] == ["pruned", "prunekit", "distillation", "recovery"]
    kl = f"| held-out KL(teacher ‖ student) per token | {report['result']['kl_before']:.4f} | "
    assert kl + f"{report['result']['kl_after']:.4f} |" in (out / "README.md").read_text()
    assert not checkpoint_folder(out).exists()  # removed once the model is saved
    assert main([*argv, *flags]) == 2  # refuses to clobber the output
