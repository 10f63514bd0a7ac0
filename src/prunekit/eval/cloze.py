"""A small deterministic zero-shot task built from any plain text: 4-way next-sentence cloze.

Each item is a sentence of a paragraph (the context) and four candidate continuations: the sentence that
really follows it, and three sentences drawn from other paragraphs (seeded). A model picks the candidate of
highest log-likelihood given the context, as lm-evaluation-harness scores multiple-choice tasks: ``acc``
compares the summed log-probabilities of the candidates' tokens, ``acc_norm`` the sums divided by the
candidates' lengths in characters. Chance is 25%. Offline and reproducible: the same text and seed give the
same items, so a pruned model and its dense original are scored on the very same questions.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.core.devices import device_of
from prunekit.core.errors import CalibrationError

log = logging.getLogger(__name__)

#: A sentence ends at `` . `` / `` ! `` / `` ? `` (WikiText's spaced punctuation) or the usual ``. `` form.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(<])")


@dataclass(frozen=True)
class ClozeItem:
    """One question: the context, the candidate continuations and the index of the true one."""

    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class ClozeResult:
    """Accuracy on a cloze set: by summed log-likelihood (``acc``) and per character (``acc_norm``)."""

    accuracy: float
    accuracy_norm: float
    items: int
    chance: float


def sentences_by_paragraph(text: str, min_words: int = 6, max_words: int = 40) -> list[list[str]]:
    """The text's paragraphs (non-empty lines that are not ``= headings =``) split into sentences; only
    sentences of ``min_words`` to ``max_words`` words are kept."""
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        sentences = [s.strip() for s in _SENTENCE_END.split(line)]
        paragraphs.append([s for s in sentences if min_words <= len(s.split()) <= max_words])
    return paragraphs


def build_cloze(text: str, items: int = 200, seed: int = 0, choices: int = 4) -> list[ClozeItem]:
    """``items`` questions from ``text`` (see the module docstring), deterministic given ``seed``."""
    paragraphs = sentences_by_paragraph(text)
    pairs = [(p, i) for p, sentences in enumerate(paragraphs) for i in range(len(sentences) - 1)]
    pool = [(p, s) for p, sentences in enumerate(paragraphs) for s in sentences]
    if len(pairs) < items:
        raise CalibrationError(
            f"the text holds {len(pairs)} pairs of consecutive sentences of 6-40 words, fewer than the {items} "
            "cloze items asked for: give a longer text (e.g. wikitext2_test.txt) or ask for fewer items"
        )
    rng = random.Random(seed)
    out = []
    for p, i in rng.sample(pairs, items):
        context, truth = paragraphs[p][i], paragraphs[p][i + 1]
        elsewhere = sorted({sentence for q, sentence in pool if q != p and sentence != truth})
        if len(elsewhere) < choices - 1:
            raise CalibrationError(
                f"the text has {len(elsewhere)} usable sentences outside one of its paragraphs, fewer than the "
                f"{choices - 1} wrong answers a question needs: give a text of more paragraphs"
            )
        distractors = rng.sample(elsewhere, choices - 1)
        answer = rng.randrange(choices)
        options = [*distractors[:answer], truth, *distractors[answer:]]
        out.append(ClozeItem(context, tuple(options), answer))
    return out


def continuation_logprob(model: nn.Module, tokenizer: Any, context: str, continuation: str) -> float:
    """``log p(continuation | context)``: the summed log-probabilities of the continuation's tokens (the
    context and the continuation joined by a space, tokenized once; the continuation's tokens are those past
    the context's)."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    full_ids = tokenizer(context + " " + continuation, add_special_tokens=False).input_ids
    start = len(context_ids)
    if full_ids[:start] != context_ids:  # the join changed the context's last token: split at the last match
        start = next(k for k in range(min(len(context_ids), len(full_ids))) if full_ids[k] != context_ids[k])
    if start == 0 or start >= len(full_ids):
        raise CalibrationError(f"cannot score the continuation {continuation[:40]!r}: it adds no token to its context")
    ids = torch.tensor([full_ids], device=device_of(model))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    return float(picked[start - 1 :].sum())


def cloze_accuracy(model: nn.Module, tokenizer: Any, items: list[ClozeItem], progress: bool = True) -> ClozeResult:
    """Score every item's candidates by :func:`continuation_logprob`; the fraction answered right."""
    if not items:
        raise CalibrationError("no cloze items to score")
    right = right_norm = 0
    was_training = model.training
    model.eval()
    try:
        for item in tqdm(items, desc="cloze", unit="item", disable=not progress):
            scores = [continuation_logprob(model, tokenizer, item.context, c) for c in item.choices]
            norm = [s / max(1, len(c)) for s, c in zip(scores, item.choices, strict=True)]
            right += int(max(range(len(scores)), key=scores.__getitem__) == item.answer)
            right_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.answer)
    finally:
        model.train(was_training)
    n = len(items)
    return ClozeResult(right / n, right_norm / n, n, 1.0 / len(items[0].choices))
