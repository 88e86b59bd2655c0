"""The sweep's figures, in the style of the paper: metric against the fraction of layers dropped.

Every measured value is drawn with its uncertainty: accuracy and loss with error bars of one
standard error, forward time as the median with its interquartile range over repeated passes."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from depthcut.analysis.heatmap import plot_heatmap
from depthcut.analysis.result import Analysis
from depthcut.sweep.results import configuration, configuration_name, finite, forward_ms, task_accuracy

COLORS = {"angular": "tab:blue", "deepest": "tab:orange", "block-influence": "tab:green", "random": "tab:gray"}
# a strategy's color, a training-free repair's marker, a heal's line: dashed unhealed, solid LoRA,
# dash-dotted and dotted distillation
MARKERS = {"none": "o", "lstsq": "s", "cosine": "^", "magnitude": "D"}
LINES = {"": "--", "lm": "-", "kd": "-.", "kd+lm": ":"}

def _series(points: list[dict], value) -> tuple[dict[tuple[str, str, bool], list[tuple[float, float, object]]],
                                                 tuple | None]:
    """(strategy, repair, heal) -> sorted (fraction, value, error) of the pruned points, and the unpruned
    point's (value, error), which starts every line and is drawn once. `value(point)` gives None or
    (value, error); an error is None (no bar), a float (symmetric) or (below, above)."""
    base_point = next((p for p in points if p["drop"] == 0), None)
    base = value(base_point) if base_point is not None else None
    if base is not None and base[0] is None:
        base = None
    lines: dict[tuple[str, bool], list] = {}
    for point in points:
        measured = None if point["drop"] == 0 else value(point)
        if measured is None or measured[0] is None:
            continue
        lines.setdefault(configuration(point), []).append((point["fraction"], *measured))
    for values in lines.values():
        values.sort(key=lambda v: v[0])
    return lines, base


def _yerr(errors: list) -> list[list[float]] | None:
    """matplotlib's asymmetric yerr (2 x N) from per-point errors; None where no point has one."""
    if all(e is None for e in errors):
        return None
    pairs = [(0.0, 0.0) if e is None else (e, e) if isinstance(e, (int, float)) else e for e in errors]
    return [[max(p[0], 0.0) for p in pairs], [max(p[1], 0.0) for p in pairs]]


def _plot_lines(ax, series, base_label: str = "unpruned") -> None:
    lines, base = series
    fractions = sorted({v[0] for values in lines.values() for v in values})
    # Lines share their x positions: with error bars, each is shifted a little to keep them apart.
    step = min((b - a for a, b in pairwise(fractions)), default=fractions[0] if fractions else 0.1)
    width = 0.16 * step if any(v[2] is not None for values in lines.values() for v in values) else 0.0
    keys = sorted(lines)
    for index, key in enumerate(keys):
        strategy, repair, heal = key
        values = lines[key]
        shift = 0.0 if len(keys) == 1 else width * (index / (len(keys) - 1) - 0.5)
        color = COLORS.get(strategy, "tab:purple")
        xs, ys = [v[0] + shift for v in values], [v[1] for v in values]
        if base is not None:
            ax.plot([0.0, xs[0]], [base[0], ys[0]], linestyle=LINES[heal], color=color, linewidth=1)
        ax.errorbar(xs, ys, yerr=_yerr([v[2] for v in values]), marker=MARKERS.get(repair, "v"),
                    markersize=3 if repair == "none" else 4, capsize=2, elinewidth=0.8,
                    linestyle=LINES[heal], linewidth=1, color=color,
                    label=configuration_name(strategy, repair, heal))
    if base is not None:
        ax.errorbar([0.0], [base[0]], yerr=_yerr([base[1]]), marker="s", markersize=4, capsize=3, color="black",
                    linestyle="none", label=base_label, zorder=3)
    ax.set_xlabel("fraction of layers dropped")
    ax.grid(alpha=0.3)


def _save(figure, folder: Path, name: str, svg: bool = True) -> list[Path]:
    figure.tight_layout()
    paths = [folder / f"{name}.png"]
    figure.savefig(paths[0], dpi=110)
    if svg:
        paths.append(folder / f"{name}.svg")
        figure.savefig(paths[1])
    return paths


def _items_label(points: list[dict], task: str) -> str:
    counts = sorted({n for p in points if (n := task_accuracy(p, task)[2]) is not None})
    if not counts:
        return task
    items = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"
    return f"{task} ({items} items a point)"


def _accuracy(task: str):
    def value(point: dict):
        accuracy, stderr, _ = task_accuracy(point, task)
        if accuracy is None:
            return None
        # one standard error either side, cut at the ends of the scale (an accuracy stays in [0, 1])
        return accuracy, None if stderr is None else (min(stderr, accuracy), min(stderr, 1 - accuracy))
    return value


def _loss(point: dict):
    loss = point.get("loss") or {}
    if loss.get("normalized_loss") is None:
        return None
    return loss["normalized_loss"], finite(loss.get("normalized_loss_stderr"))


def _forward(point: dict):
    timing = forward_ms(point)
    if timing is None:
        return None
    if timing["q1"] is None:
        return timing["median"], None
    return timing["median"], (timing["median"] - timing["q1"], timing["q3"] - timing["median"])


def make_figures(points: list[dict], analysis: dict | None, folder: Path, model: str | None = None) -> dict[str, Path]:
    """Write accuracy, loss, cost and heatmap figures; returns name -> PNG path. `model` names the
    model in the heatmap's title (the user's MODEL argument, as the sweep settings record it)."""
    # deferred: matplotlib is imported only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    # deferred: matplotlib is imported only when a figure is drawn
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    tasks = sorted({name for p in points for name in p.get("tasks", {})})
    if tasks:
        columns = min(3, len(tasks))
        rows = -(-len(tasks) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.8 * rows + 0.4), squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            _plot_lines(ax, _series(points, _accuracy(task)))
            chance = next((p["tasks"][task].get("chance") for p in points if task in p.get("tasks", {})), None)
            if chance:
                ax.axhline(chance, color="black", linestyle=":", linewidth=1, label="chance")
            ax.set_ylabel("accuracy")
            ax.set_title(_items_label(points, task), fontsize=10)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        figure.suptitle("accuracy; error bars: ± 1 standard error", fontsize=9)
        figures["accuracy"] = _save(figure, folder, "accuracy")[0]
        plt.close(figure)
    if any(p.get("loss") for p in points):
        figure, ax = plt.subplots(figsize=(5.5, 4))
        _plot_lines(ax, _series(points, _loss))
        ax.set_ylabel("held-out loss / log(vocabulary)")
        windows = next(((p["loss"].get("data") or {}).get("samples") for p in points if p.get("loss")), None)
        ax.set_title("held-out loss; error bars: ± 1 standard error" + (f"\nover {windows} windows" if windows else ""),
                     fontsize=10)
        ax.legend(fontsize=7)
        figures["loss"] = _save(figure, folder, "loss")[0]
        plt.close(figure)
    unhealed = [p for p in points if not p["healed"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.9))
    _plot_lines(left, _series(unhealed, lambda p: (p["parameters"] / 1e6, None)))
    left.set_ylabel("parameters (millions)")
    _plot_lines(right, _series(unhealed, _forward))
    timings = [p["forward_seconds"] for p in unhealed if p.get("forward_seconds")]
    shape = f"{timings[0]['batch']} x {timings[0]['length']}" if timings else "1 x 128"
    right.set_ylabel(f"forward pass, {shape} tokens (ms)")
    repeats = sorted({t["repeats"] for t in timings})
    right.set_title(f"median; bars: interquartile range over {', '.join(map(str, repeats))} passes" if repeats
                    else "one median per point (no spread recorded)", fontsize=9)
    left.legend(fontsize=7)
    figures["cost"] = _save(figure, folder, "cost", svg=False)[0]
    plt.close(figure)
    if analysis is not None:
        figures["heatmap"] = plot_heatmap(
            Analysis(analysis["num_layers"], analysis["metrics"], analysis.get("metadata", {})), folder / "heatmap.png",
            title=model)
    return figures
