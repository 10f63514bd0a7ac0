"""A pruned model of every family saves with prunekit and reloads with plain transformers, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import prunekit
from models import FAMILIES, sample_text, tiny_model, tiny_tokenizer
from prunekit.io.saving import save_pretrained


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calibration(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(sample_text())
    return prunekit.calibration_windows(tokenizer, path, nsamples=4, seqlen=32, seed=0)


@pytest.fixture(scope="module")
def input_ids(tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(sample_text(4_000)[1_000:], add_special_tokens=False).input_ids[:48]
    return torch.tensor([ids, ids[::-1]])


def snapshot(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_reloads_with_identical_logits(
    family: str, tokenizer: Any, calibration: torch.Tensor, input_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model(family)
    before = snapshot(model)
    result = prunekit.prune(model, prunekit.PruneConfig(method="wanda", sparsity=0.5), calibration, progress=False)
    pruned = result.model
    assert pruned is not model
    assert snapshot(model) == before, "inplace=False must leave the input model bit-identical"
    assert result.layers and all(layer.sparsity == pytest.approx(0.5) for layer in result.layers)

    out = save_pretrained(pruned, tokenizer, tmp_path / family)
    assert (out / "model.safetensors").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(pruned)

    expected, got = pruned.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    with torch.no_grad():
        want = pruned(input_ids).logits
        have = reloaded(input_ids).logits
    assert torch.equal(want, have)
    with torch.no_grad():
        dense = model(input_ids).logits
    assert not torch.equal(dense, want)  # the pruning did change the model

    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "to be, or not to be"
    assert reloaded_tokenizer(text).input_ids == tokenizer(text).input_ids
