"""lm-evaluation-harness's results, per task and per document, in depthcut's result format.

A task's summary holds every metric lm-eval reports (``acc``, ``acc_norm``, ``exact_match``,
...; a metric under a filter other than ``none`` is named ``metric,filter``) with its standard error
(``acc_stderr``), plus ``num_items``, ``num_fewshot``, ``chance`` (multiple choice: the mean of
1 / number of choices) and ``metrics`` (the names). A group such as ``mmlu`` has lm-eval's own
aggregate (MMLU: weighted by subject size, i.e. over questions), the unweighted mean over its
subtasks (``acc_by_subtask``) and every subtask's summary under ``subjects``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (n - 1), as lm-eval reports."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _number(value) -> float:
    """lm-eval writes "N/A" where it has no standard error; numpy scalars become floats."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def metric_figures(figures: dict) -> dict:
    """{"acc": 0.5, "acc_stderr": 0.05, ...} from lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.05, ...}."""
    out = {}
    for key, value in figures.items():
        metric, comma, filter_name = key.partition(",")
        if not comma or metric.endswith("_stderr") or isinstance(value, (str, list, dict)):
            continue
        name = metric if filter_name == "none" else key
        out[name] = _number(value)
        out[name.replace(metric, metric + "_stderr", 1)] = _number(figures.get(f"{metric}_stderr,{filter_name}"))
    return out


def _choice_facts(task, doc, sample: dict) -> dict:
    """Per-document facts of a multiple-choice request: log-likelihoods, predictions, gold index."""
    loglikelihoods = [float(resp[0]) for resp in sample["filtered_resps"]]
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else gold
    lengths = [max(len(c), 1) for c in choices]
    order = range(len(choices))
    return {
        "loglikelihoods": loglikelihoods,
        "prediction": max(order, key=lambda i: loglikelihoods[i]),
        "prediction_norm": max(order, key=lambda i: loglikelihoods[i] / lengths[i]),
        "gold": gold,
    }


def document(task_name: str, task, sample: dict, subtask: str | None = None) -> dict:
    """One logged document: where it is in its split, what the model answered, its metric values."""
    doc = sample["doc"]
    facts = {"task": task_name, **({"subtask": subtask} if subtask else {}), "doc_id": sample["doc_id"]}
    if isinstance(doc, dict) and "source_line" in doc:
        facts["source_line"] = doc["source_line"]
    if task.OUTPUT_TYPE == "multiple_choice":
        facts.update(_choice_facts(task, doc, sample))
    elif task.OUTPUT_TYPE == "generate_until":
        facts.update(response=sample["filtered_resps"][0], target=sample["target"])
    else:
        facts.update(response=sample["filtered_resps"][0])
    facts.update({metric: sample[metric] for metric in sample.get("metrics", []) if metric in sample})
    return facts


def chance(tasks: dict, samples: dict) -> float | None:
    """The accuracy of guessing uniformly: the mean of 1 / number of choices (multiple choice only)."""
    values = [1 / len(s["arguments"]) for name, task in tasks.items() if task.OUTPUT_TYPE == "multiple_choice"
              for s in samples.get(name, [])]
    return sum(values) / len(values) if values else None


def task_summary(name: str, output: dict) -> dict:
    figures = metric_figures(output["results"].get(name, {}))
    return {**figures, "num_items": output["n-samples"][name]["effective"],
            "num_fewshot": output["n-shot"].get(name, 0), "metrics": [k for k in figures if "_stderr" not in k]}


def group_summary(name: str, leaves: Sequence[str], output: dict) -> dict:
    """lm-eval's aggregate of a group, the unweighted mean over its subtasks, and each subtask."""
    subjects = {leaf.removeprefix(f"{name}_"): task_summary(leaf, output) for leaf in leaves}
    figures = metric_figures(output["results"].get(name, {}))
    metrics = list(dict.fromkeys(m for s in subjects.values() for m in s["metrics"]))
    for metric in metrics:
        values = [s[metric] for s in subjects.values() if metric in s]
        errors = [s[f"{metric}_stderr"] for s in subjects.values() if metric in s]
        figures[f"{metric}_by_subtask"] = sum(values) / len(values)
        figures[f"{metric}_by_subtask_stderr"] = math.sqrt(sum(e * e for e in errors if not math.isnan(e))) / len(errors)
    shots = {s["num_fewshot"] for s in subjects.values()}
    return {**figures, "num_items": sum(s["num_items"] for s in subjects.values()),
            "num_fewshot": shots.pop() if len(shots) == 1 else sorted(shots),
            "metrics": [m for m in metrics if m in figures] or [f"{m}_by_subtask" for m in metrics],
            "subjects": subjects}
