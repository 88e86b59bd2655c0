"""What a pruned model kept of its baseline, as the depth-pruning papers report it ("% retained"):
per task, the pruned model's score divided by the baseline's, and on average the ratio of the
averages (ReplaceMe, LLM-Streamline), each with a standard error by the delta method (the two
models' errors taken as independent, which overstates it for the same items). A score without a
standard error (lm-eval gives none for a rolling perplexity) gives a ratio without one (None), not a
standard error of 0."""

from __future__ import annotations

import math


def _ratio(top: float, top_var: float | None, bottom: float, bottom_var: float | None
           ) -> tuple[float, float | None]:
    ratio = top / bottom
    if top_var is None or bottom_var is None:
        return ratio, None
    relative = (top_var / top**2 if top else 0.0) + bottom_var / bottom**2
    return ratio, abs(ratio) * math.sqrt(relative)


def _variance(stderr) -> float | None:
    return stderr**2 if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None


def _mean_variance(variances: list) -> float | None:
    """The variance of a mean of independent scores; None where one of them has none."""
    if any(variance is None for variance in variances):
        return None
    return sum(variances) / len(variances) ** 2


# Metrics where less is better (WikiText's perplexities): their ratio is reported (above 1: worse) but
# kept out of the average, which is of accuracies.
LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"})


def retained(result: dict, baseline: dict) -> dict:
    """{task: {metric, model, baseline, ratio, ratio_stderr}, "average": {...}} over the tasks both
    results scored, on each task's first metric (the one lm-eval lists first); a lower-is-better
    metric's entry says so (`lower_is_better`) and stays out of the average."""
    per_task, tops, bottoms = {}, [], []
    for name, summary in result.get("tasks", {}).items():
        base = baseline.get("tasks", {}).get(name)
        if base is None or not summary.get("metrics"):
            continue
        metric = summary["metrics"][0]
        value, reference = summary.get(metric), base.get(metric)
        if value is None or not reference:
            continue
        top_var, bottom_var = _variance(summary.get(f"{metric}_stderr")), _variance(base.get(f"{metric}_stderr"))
        ratio, stderr = _ratio(value, top_var, reference, bottom_var)
        per_task[name] = {"metric": metric, "model": value, "baseline": reference, "ratio": ratio,
                          "ratio_stderr": stderr}
        if metric in LOWER_IS_BETTER:
            per_task[name]["lower_is_better"] = True
            continue
        tops.append((value, top_var))
        bottoms.append((reference, bottom_var))
    if tops:
        count = len(tops)
        top, top_var = sum(v for v, _ in tops) / count, _mean_variance([s for _, s in tops])
        bottom, bottom_var = sum(v for v, _ in bottoms) / count, _mean_variance([s for _, s in bottoms])
        ratio, stderr = _ratio(top, top_var, bottom, bottom_var)
        per_task["average"] = {"metric": "mean of the tasks' scores", "model": top, "baseline": bottom,
                               "ratio": ratio, "ratio_stderr": stderr, "tasks": count}
    return per_task
