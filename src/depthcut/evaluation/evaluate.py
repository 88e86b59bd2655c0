"""`evaluate()`: the loss and the tasks of one model, as one JSON-ready result."""

from __future__ import annotations

import random
from collections.abc import Sequence

from depthcut.errors import DepthcutError
from depthcut.evaluation.items import Item
from depthcut.evaluation.metrics import item_outcomes, summarize, summarize_by_subject
from depthcut.evaluation.scoring import Scorer

RESULT_FORMAT = "depthcut.eval"


def subset(items: list[Item], limit: int | None, seed: int, task: str) -> list[Item]:
    """A fixed random subset of `limit` documents (all items of a document stay together)."""
    if limit is None:
        return items
    documents = sorted({item.doc_id for item in items})
    if limit < 1:
        raise DepthcutError("--limit must be at least 1")
    if limit > len(documents):
        raise DepthcutError(f"--limit {limit} is larger than task {task!r}, which has {len(documents)} items")
    chosen = set(random.Random(seed).sample(documents, limit))
    return [item for item in items if item.doc_id in chosen]


def _evaluate_task(scorer: Scorer, task, num_fewshot, limit, seed, log_samples, progress) -> tuple[dict, list[dict]]:
    from depthcut.evaluation.tasks import load_items

    items, source = load_items(task, num_fewshot=num_fewshot, seed=seed)
    items = subset(items, limit, seed, task.name)
    requests = [pair for item in items for pair in item.requests()]
    scores = scorer.loglikelihoods(requests, progress=progress, desc=task.name)
    outcomes, samples, position = [], [], 0
    for item in items:
        loglikelihoods = scores[position : position + item.num_choices]
        position += item.num_choices
        outcome = item_outcomes(item, loglikelihoods)
        outcomes.append(outcome)
        if log_samples:
            samples.append({
                "task": task.name, "doc_id": item.doc_id, "source_line": item.source_line, "subject": item.subject,
                "loglikelihoods": loglikelihoods, "prediction": outcome["prediction"],
                "prediction_norm": outcome["prediction_norm"], "gold": item.gold,
            })
    metrics = task.metrics
    summary = summarize_by_subject(items, outcomes, metrics) if items and items[0].subject else summarize(outcomes, metrics)
    summary.update({"chance": sum(1 / item.num_choices for item in items) / len(items),
                    "num_fewshot": task.num_fewshot if num_fewshot is None else num_fewshot,
                    "source": source, "limit": limit, "seed": seed, "metrics": list(metrics)})
    return summary, samples


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str] = (),
    *,
    loss_data=None,
    loss_samples: int = 64,
    loss_seq_len: int = 512,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    scoring: str = "packed",
    log_samples: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate `model` on multiple-choice `tasks` (built-in names or task files) and/or the held-out
    loss on `loss_data` (a DATA string, as for calibration). Returns a JSON-ready dict."""
    from depthcut.evaluation.tasks import get_task

    if not tasks and loss_data is None:
        raise DepthcutError("nothing to evaluate: give tasks and/or loss data")
    resolved = [get_task(name) for name in tasks]  # unknown names fail before any work
    result: dict = {"format": RESULT_FORMAT, "format_version": 1, "tasks": {}}
    if loss_data is not None:
        from depthcut.calibration import build_calibration
        from depthcut.data import load_texts
        from depthcut.evaluation.loss import heldout_loss

        source = load_texts(loss_data) if isinstance(loss_data, str) else loss_data
        windows = build_calibration(tokenizer, source, loss_samples, loss_seq_len, "windows", seed)
        result["loss"] = heldout_loss(model, windows, batch_size=max(1, batch_size // 2), progress=progress)
    scorer = Scorer(model, tokenizer, batch_size=batch_size, mode=scoring)
    samples: list[dict] = []
    for task in resolved:
        summary, task_samples = _evaluate_task(scorer, task, num_fewshot, limit, seed, log_samples, progress)
        result["tasks"][task.name] = summary
        samples.extend(task_samples)
    if log_samples:
        result["samples"] = samples
    result["settings"] = {"limit": limit, "num_fewshot": num_fewshot, "seed": seed, "batch_size": batch_size,
                          "scoring": scoring, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return result
