"""Accuracy on tasks through EleutherAI's lm-evaluation-harness (``pip install 'prunekit[eval]'``).

The model is handed to the harness as it is (its ``HFLM`` wrapper around an already built model), so a model
that only :func:`prunekit.load_model` can rebuild (dropped attention, layers of different widths) is scored
exactly like a dense one. Tasks are the harness's own names (``hellaswag``, ``arc_easy``...: their datasets
come from the Hugging Face hub) or tasks defined in YAML files under ``include_path`` (a local dataset, for
machines without the hub). Multiple-choice tasks are scored by the log-likelihood of each choice given the
context, the harness's ``acc`` (and ``acc_norm``, per byte of the choice)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.core.errors import ConfigError

log = logging.getLogger(__name__)


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    builtin: bool = True,
) -> dict[str, dict[str, float]]:
    """The harness's metrics of ``model`` on ``tasks``, per task: ``{"acc": ..., "acc_stderr": ...}`` (the
    harness's ``,none`` filter suffix dropped; other filters, as gsm8k's ``exact_match,strict-match``, kept). ``limit`` scores the first ``limit`` documents of each task;
    every seed the harness takes is ``seed``. Tasks are looked up in ``include_path`` first and, with ``builtin``,
    among the harness's own (indexing those takes a while)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            "task accuracy needs lm-evaluation-harness: pip install 'prunekit[eval]' (or lm_eval>=0.4)"
        ) from None
    if include_path is None and not builtin:
        raise ConfigError("no tasks to look in: give a task folder or allow the harness's own tasks")
    if not tasks:
        raise ConfigError("no tasks: name lm-eval tasks (e.g. --tasks arc_easy,hellaswag) or define some in YAML")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"the task folder {include_path} does not exist: give a folder of lm-eval task YAML files")
    manager = None
    if include_path is not None:  # local tasks only: skip indexing the harness's thousands of task files
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if builtin and any(task not in manager.all_tasks for task in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path is not None else " (define your own with a task folder)"
        raise ConfigError(
            f"lm-eval knows no task {', '.join(unknown)}{where}: check the names with `lm_eval --tasks list`"
        )
    was_training = model.training
    model.eval()
    try:
        results = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=False,
        )
    finally:
        model.train(was_training)
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        scores[task] = {
            name.removesuffix(",none"): float(value)
            for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return scores
