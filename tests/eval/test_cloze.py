"""The next-sentence cloze task: deterministic items, log-likelihood scoring checked by an identity and by hand."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from models import SHARED, save_tiny_checkpoint, tiny_model, tiny_tokenizer
from prunekit.cli import main
from prunekit.core.errors import CalibrationError
from prunekit.eval.cloze import ClozeItem, build_cloze, cloze_accuracy, continuation_logprob, sentences_by_paragraph

TEXT = "\n".join(
    [
        " = Heading = ",
        " The first paragraph starts with this sentence here . Then the second sentence of it follows on . "
        "A third sentence closes the first paragraph now .",
        " Another paragraph talks about something else entirely today . It has a second sentence about it too .",
        " The last paragraph is about birds and their songs . Birds sing in the morning and at dusk .",
    ]
)


def test_paragraphs_and_sentences() -> None:
    paragraphs = sentences_by_paragraph(TEXT)
    assert len(paragraphs) == 3  # the heading is not a paragraph
    assert paragraphs[0][1] == "Then the second sentence of it follows on ."


def test_items_are_deterministic_and_hold_the_true_next_sentence() -> None:
    items = build_cloze(TEXT, items=3, seed=1, choices=3)
    assert items == build_cloze(TEXT, items=3, seed=1, choices=3)
    paragraphs = sentences_by_paragraph(TEXT)
    follows = {p[i]: p[i + 1] for p in paragraphs for i in range(len(p) - 1)}
    for item in items:
        assert item.choices[item.answer] == follows[item.context]
        own = next(p for p in paragraphs if item.context in p)
        assert all(c not in own for k, c in enumerate(item.choices) if k != item.answer)  # from elsewhere
        assert len(set(item.choices)) == 3


def test_real_text_gives_many_items_and_a_short_one_is_refused() -> None:
    wikitext = SHARED / "wikitext2_test.txt"
    if not wikitext.is_file():
        pytest.skip("../shared/data/wikitext2_test.txt is not here")
    items = build_cloze(wikitext.read_text(), items=50, seed=0)
    assert len(items) == 50 and all(len(item.choices) == 4 for item in items)
    assert {item.answer for item in items} == {0, 1, 2, 3}
    with pytest.raises(CalibrationError, match="fewer than the 10 cloze items"):
        build_cloze(TEXT, items=10)


def sequence_logprob(model: nn.Module, ids: list[int]) -> float:
    """``sum_k log p(t_k | t_<k)`` over a whole sequence, from one forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return float(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum())


def test_continuation_logprob_is_the_joint_minus_the_context() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    context, continuation = "To be or not to be", "that is the question"
    full = tokenizer(context + " " + continuation, add_special_tokens=False).input_ids
    head = tokenizer(context, add_special_tokens=False).input_ids
    assert full[: len(head)] == head  # a clean split, so the identity holds exactly
    expected = sequence_logprob(model, full) - sequence_logprob(model, head)
    assert continuation_logprob(model, tokenizer, context, continuation) == pytest.approx(expected, abs=1e-4)


class LovesA(nn.Module):
    """Next-token logits 1 for the character 'a' and 0 for every other byte, whatever came before."""

    def forward(self, input_ids: torch.Tensor) -> Any:
        logits = torch.zeros(*input_ids.shape, 256)
        logits[..., ord("a")] = 1.0
        return SimpleNamespace(logits=logits)


class Bytes:
    def __call__(self, text: str, add_special_tokens: bool = False) -> Any:
        return SimpleNamespace(input_ids=list(text.encode()))


def test_accuracy_by_hand() -> None:
    # log p(char) = 1 - Z for 'a', -Z otherwise, Z = log(255 + e): a candidate scores (#a) - len * Z
    z = math.log(255 + math.e)
    items = [
        ClozeItem("xx", ("aa", "bb", "cc"), 0),  # acc: 'aa' wins (2 - 2z) -> right
        ClozeItem("xx", ("bbb", "ab", "b"), 2),  # acc: 'b' (-z) beats 'ab' (1 - 2z) -> right; norm: 'ab' -> wrong
        ClozeItem("xx", ("b", "aaaa", "cc"), 0),  # acc: 'b' (-z) beats 'aaaa' (4 - 4z) -> right; norm: 'aaaa'
    ]
    assert 1 - 2 * z < -z and 4 - 4 * z < -z  # the hand comparisons above
    result = cloze_accuracy(LovesA(), Bytes(), items, progress=False)
    assert result.accuracy == pytest.approx(3 / 3) and result.accuracy_norm == pytest.approx(1 / 3)
    assert result.items == 3 and result.chance == pytest.approx(1 / 3)


def test_cli_eval_reports_cloze_accuracy(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    source = save_tiny_checkpoint(tmp_path / "model", "llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["-q", "eval", str(source), "--cloze", str(text), "--cloze-items", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cloze"]["items"] == 3 and result["cloze"]["chance"] == pytest.approx(0.25)
    assert 0.0 <= result["cloze"]["accuracy"] <= 1.0 and "perplexity" not in result
    assert main(["-q", "eval", str(source)]) == 2
    assert "--ppl FILE (perplexity), --cloze FILE" in capsys.readouterr().err
