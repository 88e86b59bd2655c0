"""The sweep's figures, in the style of the paper: metric against the fraction of layers dropped.

Every measured value is drawn with its uncertainty: accuracy and loss with error bars of one
standard error, forward time as the median with its interquartile range over repeated passes."""

from __future__ import annotations

import math
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
SPREAD = 0.05  # the most, as a share of the x axis, that lines at one fraction are set apart

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


def _plot_lines(ax, series, base_label: str = "unpruned", layers: dict[float, str] | None = None) -> None:
    """One line a configuration; `layers` labels the measured fractions (`8/30`) on the x axis."""
    lines, base = series
    fractions = sorted({v[0] for values in lines.values() for v in values})
    # Lines share their x positions: with error bars, each is shifted a little to keep them apart, by
    # at most SPREAD of the axis in all, so a point still reads at its own fraction.
    step = min((b - a for a, b in pairwise(fractions)), default=fractions[0] if fractions else 0.1)
    bars = any(v[2] is not None for values in lines.values() for v in values)
    width = min(SPREAD * (fractions[-1] if fractions else 0.0), 0.3 * step) if bars else 0.0
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
    ax.set_xlabel("fraction of layers dropped (layers dropped / all)")
    ticks = sorted({0.0, *fractions})
    if layers and len(ticks) <= 8:  # more labels than that would run into each other
        ax.set_xticks(ticks, [f"{f:.2f}\n{layers.get(f, '')}" if f else "0\nunpruned" for f in ticks])
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
    """Held-out loss in nats per token, the scale of the terminal and of every table."""
    loss = point.get("loss") or {}
    if loss.get("loss") is None:
        return None
    return loss["loss"], finite(loss.get("loss_stderr"))


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
    layers = {p["fraction"]: f"{p['drop']}/{round(p['drop'] / p['fraction'])}" for p in points if p["drop"]}
    tasks = sorted({name for p in points for name in p.get("tasks", {})})
    if tasks:
        columns = min(3, len(tasks))
        rows = -(-len(tasks) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.8 * rows + 0.4), squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            _plot_lines(ax, _series(points, _accuracy(task)), layers=layers)
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
    if any(_loss(p) is not None for p in points):
        figure, ax = plt.subplots(figsize=(5.5, 4))
        _plot_lines(ax, _series(points, _loss), layers=layers)
        ax.set_ylabel("held-out loss (nats per token)")
        windows = next(((p["loss"].get("data") or {}).get("samples") for p in points if p.get("loss")), None)
        ax.set_title("held-out loss; error bars: ± 1 standard error" + (f"\nover {windows} windows" if windows else ""),
                     fontsize=10)
        ax.legend(fontsize=7)
        figures["loss"] = _save(figure, folder, "loss")[0]
        plt.close(figure)
    unhealed = [p for p in points if not p["healed"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.9))
    _plot_lines(left, _series(unhealed, lambda p: (p["parameters"] / 1e6, None)), layers=layers)
    left.set_ylabel("parameters (millions)")
    _plot_lines(right, _series(unhealed, _forward), layers=layers)
    timings = [p["forward_seconds"] for p in unhealed if p.get("forward_seconds")]
    shape = f"{timings[0]['batch']} x {timings[0]['length']}" if timings else "1 x 128"
    right.set_ylabel(f"forward pass, {shape} tokens (ms)")
    repeats = sorted({t["repeats"] for t in timings})
    overlap = timing_overlap(points)
    noise = "\nevery pruned range overlaps the unpruned one: noise" if overlap and overlap[0] == overlap[1] else ""
    right.set_title(f"median; bars: interquartile range over {', '.join(map(str, repeats))} passes{noise}" if repeats
                    else "one median per point (no spread recorded)", fontsize=9)
    left.legend(fontsize=7)
    figures["cost"] = _save(figure, folder, "cost", svg=False)[0]
    plt.close(figure)
    if analysis is not None:
        # larger type than `depthcut analyze`'s own heatmap: the report shows it scaled to the page's width
        with plt.rc_context({"font.size": 13, "axes.titlesize": 14, "axes.labelsize": 13}):
            figures["heatmap"] = plot_heatmap(
                Analysis(analysis["num_layers"], analysis["metrics"], analysis.get("metadata", {})),
                folder / "heatmap.png", title=model)
    return figures


HEAL_STYLES = {"": "dashed: not healed", "lm": "solid: healed with LoRA", "kd": "dash-dotted: healed by distillation",
               "kd+lm": "dotted: healed by distillation and next-token loss"}
REPAIR_MARKERS = {"lstsq": "square lstsq", "cosine": "triangle cosine", "magnitude": "diamond magnitude"}


def _how_to_read_lines(points: list[dict]) -> str:
    """What a line's colour, style and marker mean, for the configurations these points have."""
    keys = {configuration(p) for p in points if p["drop"]}
    strategies = sorted({k[0] for k in keys})
    parts = [f"colour the strategy ({', '.join(strategies)})", *(HEAL_STYLES[h] for h in sorted({k[2] for k in keys}))]
    repairs = sorted({k[1] for k in keys} - {"none"})
    if repairs:
        parts.append("marker the training-free repair (" + ", ".join(REPAIR_MARKERS.get(r, r) for r in repairs) + ")")
    return (f"One line a configuration, each starting from the unpruned model (black square); {'; '.join(parts)}. "
            "Lines at the same fraction are set slightly apart so that their bars stay visible.")


def _accuracy_caption(points: list[dict]) -> str:
    tasks = sorted({name for p in points for name in p.get("tasks", {})})
    counts = sorted({n for p in points for t in tasks if (n := task_accuracy(p, t)[2]) is not None})
    items = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} to {counts[-1]:,}"
    return (f"Accuracy on {', '.join(tasks)} (higher is better; dotted: chance) against the fraction of layers "
            f"dropped, the x labels giving layers dropped / all. {_how_to_read_lines(points)} Bars are ± 1 standard "
            f"error on {items} items a point: a point whose bar overlaps the unpruned model's is not told apart "
            "from it (the report's rule above decides with 2 combined standard errors).")


def _loss_caption(points: list[dict]) -> str:
    measured = next(p["loss"] for p in points if (p.get("loss") or {}).get("loss") is not None)
    data = measured.get("data") or {}
    source = str(data.get("source") or "held-out text").split(" (")[0]
    length = f" of {data['seq_len']} tokens" if data.get("seq_len") else ""
    windows = f"{data['samples']} windows{length} of {source}" if data.get("samples") else source
    uniform = (f"; a uniform guess over the {measured['vocab_size']:,}-token vocabulary scores "
               f"{math.log(measured['vocab_size']):.2f}") if measured.get("vocab_size") else ""
    return (f"Held-out loss in nats per token on {windows}, the number the terminal prints (lower is better"
            f"{uniform}), against the fraction of layers dropped. {_how_to_read_lines(points)} Bars are ± 1 "
            "standard error over the windows; healing should bring a pruned line down towards the unpruned model.")


def timing_overlap(points: list[dict]) -> tuple[int, int] | None:
    """(pruned unhealed points timed with a spread, those whose interquartile range overlaps the unpruned
    model's); None where the unpruned model has no timed spread. An overlap is the machine's noise."""
    base = next((forward_ms(p) for p in points if p["drop"] == 0), None)
    if base is None or base["q1"] is None:
        return None
    timed = [t for p in points if p["drop"] and not p["healed"] and (t := forward_ms(p)) and t["q1"] is not None]
    return len(timed), sum(1 for t in timed if t["q3"] >= base["q1"] and t["q1"] <= base["q3"])


def _cost_caption(points: list[dict]) -> str:
    unhealed = [p for p in points if not p["healed"]]
    base = next((p for p in unhealed if p["drop"] == 0), None)
    pruned = [p for p in unhealed if p["drop"]]
    sentence = "Left: parameters in millions, an exact count (healing merges its adapter, so it does not change it)"
    if base is not None and pruned:
        deepest = max(pruned, key=lambda p: p["fraction"])
        sentence += (f"; dropping {deepest['drop']} layers removes "
                     f"{100 * (1 - deepest['parameters'] / base['parameters']):.0f}% of them")
    sentence += ". Right: the time of one forward pass"
    timing = next((p["forward_seconds"] for p in unhealed if p.get("forward_seconds")), None)
    if not any(forward_ms(p) for p in unhealed):
        return sentence + ", not measured."
    sentence += f" over {timing['batch']} x {timing['length']} tokens" if timing else ""
    overlap = timing_overlap(points)
    if overlap is None:
        return sentence + ", one median a point with no spread recorded: differences may be the machine's noise."
    sentence += f", median and interquartile range over {timing['repeats']} passes (lower is faster). "
    timed, overlapping = overlap
    if timed and overlapping == timed:
        return sentence + ("Here every pruned point's range overlaps the unpruned model's: the differences in time are "
                           "the machine's noise, not a measured speed-up; the parameter count is the exact saving.")
    if overlapping:
        return sentence + (f"{overlapping} of {timed} pruned points have a range that overlaps the unpruned model's "
                           "(noise); only the others show a measured change.")
    return sentence + "Every pruned point's range is clear of the unpruned model's: the change in time is measured."


def _heatmap_caption(analysis: dict) -> str:
    metadata = analysis.get("metadata", {})
    sentence = (f"The analysis that chose the angular blocks ({metadata.get('samples', '?')} samples, "
                f"{metadata.get('tokens', '?')} tokens): for each first layer l (x) and block size n (y), the angular "
                "distance between the hidden state entering layer l and the one n layers later; lighter is smaller, "
                "a block that changes the state less and costs less to drop. Red circles mark the smallest per n, "
                "the block the angular strategy removes for n layers.")
    if "block_influence" in analysis.get("metrics", {}):
        sentence += (" The bars: each layer's Block Influence (ShortGPT: 1 - cosine of its input and output); "
                     "lower bars are more redundant layers.")
    return sentence


def figure_captions(points: list[dict], analysis: dict | None, drawn) -> dict[str, str]:
    """For each figure `make_figures` drew (its names in `drawn`): what it shows and how to read it."""
    captions = {"accuracy": lambda: _accuracy_caption(points), "loss": lambda: _loss_caption(points),
                "cost": lambda: _cost_caption(points), "heatmap": lambda: _heatmap_caption(analysis or {})}
    return {name: captions[name]() for name in drawn}
