"""Task accuracy through lm-evaluation-harness, on a 3-question task defined locally and scored by hand."""

from __future__ import annotations

import json
import os

import pytest

from models import tiny_model, tiny_tokenizer
from prunekit.core.errors import ConfigError
from prunekit.eval.cloze import continuation_logprob
from prunekit.eval.tasks import evaluate_tasks

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's dataset is a local file: never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The capital of France is:", ["Paris", "a river", "blue"]),
    ("Two plus two makes:", ["four", "seven", "a chair"]),
    ("Snow is usually:", ["white", "green", "loud"]),
]


def write_task(folder, golds: list[int]) -> None:
    rows = [{"question": q, "choices": c, "answer": g} for (q, c), g in zip(QUESTIONS, golds, strict=True)]
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy.yaml").write_text(
        "task: prunekit_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'toy.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def test_a_local_task_scores_the_accuracy_computed_by_hand(tmp_path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    # the model's own pick per question, by the summed log-probability of each choice after the context
    picks = [
        max(range(3), key=lambda k, q=q, c=c: continuation_logprob(model, tokenizer, q, c[k])) for q, c in QUESTIONS
    ]
    golds = [picks[0], picks[1], (picks[2] + 1) % 3]  # right, right, wrong: 2/3 by hand
    write_task(tmp_path, golds)
    scores = evaluate_tasks(model, tokenizer, ["prunekit_toy"], include_path=tmp_path)
    assert scores["prunekit_toy"]["acc"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="knows no task no_such_task"):
        evaluate_tasks(model, tokenizer, ["no_such_task"], include_path=tmp_path, builtin=False)
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_tasks(model, tokenizer, ["prunekit_toy"], include_path=tmp_path / "missing")


def test_prunekit_eval_reports_task_accuracy(tmp_path, capsys) -> None:
    import prunekit
    from models import save_tiny_checkpoint
    from prunekit.cli import main

    model_dir = save_tiny_checkpoint(tmp_path / "tiny")
    loaded = prunekit.load_model(str(model_dir))
    picks = [
        max(range(3), key=lambda k, q=q, c=c: continuation_logprob(loaded.model, loaded.tokenizer, q, c[k]))
        for q, c in QUESTIONS
    ]
    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks", [(p + 1) % 3 for p in picks[:2]] + picks[2:])  # wrong, wrong, right: 1/3
    argv = ["-q", "eval", str(model_dir), "--tasks", "prunekit_toy", "--tasks-path", str(tmp_path / "tasks")]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tasks"]["prunekit_toy"]["acc"] == pytest.approx(1 / 3)
