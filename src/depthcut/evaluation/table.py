"""A readable terminal table of an evaluation result."""

from __future__ import annotations

import math


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:6.2f}"


def format_table(result: dict) -> str:
    lines = [f"{'task':<16} {'metric':<16} {'value':>7} {'± se':>7} {'n':>6} {'shots':>5}"]
    lines.append("-" * len(lines[0]))
    for name, summary in result.get("tasks", {}).items():
        for metric in summary["metrics"]:
            lines.append(f"{name:<16} {metric:<16} {_pct(summary[metric])} {_pct(summary[f'{metric}_stderr'])} "
                         f"{summary['num_items']:>6} {summary['num_fewshot']:>5}")
            if f"{metric}_by_question" in summary:
                lines.append(f"{'':<16} {metric + ' (by q.)':<16} {_pct(summary[f'{metric}_by_question'])} "
                             f"{_pct(summary[f'{metric}_by_question_stderr'])}")
    for name, figures in result.get("harness", {}).items():
        for key, value in figures.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, float) and not metric.endswith("_stderr"):
                stderr = figures.get(key.replace(metric, metric + "_stderr", 1))
                lines.append(f"{name + ' (lm-eval)':<16} {metric:<16} {_pct(value)} "
                             f"{_pct(stderr if isinstance(stderr, float) else None)}")
    if "loss" in result:
        loss = result["loss"]
        lines.append(f"{'loss':<16} {'nll / token':<16} {loss['loss']:7.4f} {'':>7} {loss['tokens']:>6}")
        lines.append(f"{'':<16} {'normalized':<16} {loss['normalized_loss']:7.4f}")
        lines.append(f"{'':<16} {'perplexity':<16} {loss['perplexity']:7.2f}")
    return "\n".join(lines)
