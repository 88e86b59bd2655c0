"""The sweep's figures, in the style of the paper: metric against the fraction of layers dropped."""

from __future__ import annotations

from pathlib import Path

from depthcut.result import Analysis

COLORS = {"angular": "tab:blue", "deepest": "tab:orange", "block-influence": "tab:green", "random": "tab:gray"}


def _series(points: list[dict], value) -> dict[tuple[str, bool], list[tuple[float, float]]]:
    """(strategy, healed) -> sorted (fraction, value); the unpruned point starts every line."""
    base = next((p for p in points if p["drop"] == 0), None)
    lines: dict[tuple[str, bool], list] = {}
    for point in points:
        if point["drop"] == 0 or value(point) is None:
            continue
        lines.setdefault((point["strategy"], point["healed"]), []).append((point["fraction"], value(point)))
    for values in lines.values():
        if base is not None and value(base) is not None:
            values.append((0.0, value(base)))
        values.sort()
    return lines


def _plot_lines(ax, lines) -> None:
    for (strategy, healed), values in sorted(lines.items()):
        ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", markersize=3,
                linestyle="-" if healed else "--", color=COLORS.get(strategy, "tab:purple"),
                label=f"{strategy}, {'healed' if healed else 'no healing'}")
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


def make_figures(points: list[dict], analysis: dict | None, folder: Path) -> dict[str, Path]:
    """Write accuracy, loss, cost and heatmap figures; returns name -> PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    tasks = sorted({name for p in points for name in p.get("tasks", {})})
    if tasks:
        columns = min(3, len(tasks))
        rows = -(-len(tasks) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            _plot_lines(ax, _series(points, lambda p, t=task: p["tasks"].get(t, {}).get("acc")))
            chance = next((p["tasks"][task].get("chance") for p in points if task in p.get("tasks", {})), None)
            if chance:
                ax.axhline(chance, color="black", linestyle=":", linewidth=1, label="chance")
            ax.set_ylabel("accuracy")
            ax.set_title(task)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        figures["accuracy"] = _save(figure, folder, "accuracy")[0]
        plt.close(figure)
    if any(p.get("loss") for p in points):
        figure, ax = plt.subplots(figsize=(5.5, 4))
        _plot_lines(ax, _series(points, lambda p: (p.get("loss") or {}).get("normalized_loss")))
        ax.set_ylabel("held-out loss / log(vocabulary)")
        ax.set_title("held-out loss")
        ax.legend(fontsize=7)
        figures["loss"] = _save(figure, folder, "loss")[0]
        plt.close(figure)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    _plot_lines(left, _series([p for p in points if not p["healed"]], lambda p: p["parameters"] / 1e6))
    left.set_ylabel("parameters (millions)")
    _plot_lines(right, _series([p for p in points if not p["healed"]], lambda p: p["inference_seconds"] * 1e3))
    right.set_ylabel("forward pass, 4 x 128 tokens (ms)")
    left.legend(fontsize=7)
    figures["cost"] = _save(figure, folder, "cost", svg=False)[0]
    plt.close(figure)
    if analysis is not None:
        from depthcut.plotting import plot_heatmap

        figures["heatmap"] = plot_heatmap(
            Analysis(analysis["num_layers"], analysis["metrics"], analysis.get("metadata", {})), folder / "heatmap.png")
    return figures
