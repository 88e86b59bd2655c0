"""A readable terminal table of an evaluation result."""

from __future__ import annotations

import math


def _figure(value, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "      -"
    return f"{100 * value:7.2f}" if percent else f"{value:7.4g}"


def format_table(result: dict) -> str:
    """Accuracy-like metrics (values in [0, 1]) as percentages; others (perplexity, ...) as they are."""
    lines = [f"{'task':<16} {'metric':<22} {'value':>7} {'± se':>7} {'n':>6} {'shots':>5}"]
    lines.append("-" * len(lines[0]))
    for name, summary in result.get("tasks", {}).items():
        shots = summary.get("num_fewshot")
        shots = ",".join(map(str, shots)) if isinstance(shots, list) else shots
        for metric in summary["metrics"]:
            value = summary.get(metric)
            percent = value is not None and 0 <= value <= 1
            lines.append(f"{name:<16} {metric:<22} {_figure(value, percent)} "
                         f"{_figure(summary.get(f'{metric}_stderr'), percent)} {summary['num_items']:>6} {shots:>5}")
            if f"{metric}_by_subtask" in summary:
                lines.append(f"{'':<16} {metric + ' (by subtask)':<22} {_figure(summary[f'{metric}_by_subtask'], percent)} "
                             f"{_figure(summary[f'{metric}_by_subtask_stderr'], percent)}")
    if "loss" in result:
        loss = result["loss"]
        lines.append(f"{'loss':<16} {'nll / token':<22} {loss['loss']:7.4f} {'':>7} {loss['tokens']:>6}")
        lines.append(f"{'':<16} {'normalized':<22} {loss['normalized_loss']:7.4f}")
        lines.append(f"{'':<16} {'perplexity':<22} {loss['perplexity']:7.2f}")
    if result.get("retained"):
        lines.append("")
        lines.append(f"{'retained':<16} {'of the baseline':<22} {'ratio':>7} {'± se':>7}")
        for name, share in result["retained"].items():
            stderr = share["ratio_stderr"]
            lines.append(f"{name:<16} {share['metric'][:22]:<22} {100 * share['ratio']:6.1f}% "
                         + (f"{100 * stderr:6.1f}%" if stderr is not None else f"{'n/a':>7}")
                         + ("  (lower is better: above 100% is worse; not in the average)"
                            if share.get("lower_is_better") else ""))
    return "\n".join(lines)
