"""Accuracy metrics of multiple-choice items, with lm-evaluation-harness's standard errors."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from depthcut.evaluation.items import Item


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (n - 1), as lm-eval reports."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def item_outcomes(item: Item, loglikelihoods: Sequence[float]) -> dict:
    """acc and acc_norm of one item: argmax of log-likelihood, raw and divided by choice length."""
    prediction = max(range(item.num_choices), key=lambda i: loglikelihoods[i])
    normalized = [ll / max(length, 1) for ll, length in zip(loglikelihoods, item.choice_lengths)]
    prediction_norm = max(range(item.num_choices), key=lambda i: normalized[i])
    return {
        "prediction": prediction,
        "prediction_norm": prediction_norm,
        "acc": float(prediction == item.gold),
        "acc_norm": float(prediction_norm == item.gold),
    }


def summarize(outcomes: Sequence[dict], metrics: Sequence[str]) -> dict:
    summary: dict = {"num_items": len(outcomes)}
    for metric in metrics:
        values = [o[metric] for o in outcomes]
        summary[metric] = sum(values) / len(values) if values else float("nan")
        summary[f"{metric}_stderr"] = mean_stderr(values)
    return summary


def summarize_by_subject(items: Sequence[Item], outcomes: Sequence[dict], metrics: Sequence[str]) -> dict:
    """Per-subject figures, their macro average (every subject weighs the same) and the micro
    average over questions, both reported since papers use either."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for item, outcome in zip(items, outcomes):
        by_subject[item.subject].append(outcome)
    subjects = {name: summarize(group, metrics) for name, group in sorted(by_subject.items())}
    summary = summarize(outcomes, metrics)  # micro: over questions
    for metric in metrics:
        summary[f"{metric}_by_question"] = summary.pop(metric)
        summary[f"{metric}_by_question_stderr"] = summary.pop(f"{metric}_stderr")
        values = [s[metric] for s in subjects.values()]
        summary[metric] = sum(values) / len(values)
        errors = [s[f"{metric}_stderr"] for s in subjects.values()]
        summary[f"{metric}_stderr"] = math.sqrt(sum(e * e for e in errors if not math.isnan(e))) / len(errors)
    summary["subjects"] = subjects
    return summary
