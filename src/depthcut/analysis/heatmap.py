"""The paper's figure: angular distance per block size n and first layer l, minimum per n marked; the
Block Influence bars; and, after `analyze --search`, the search's KL against the layers removed beside
the best block's by angular distance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from depthcut.analysis.result import Analysis


def _matrix(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def model_title(analysis: Analysis) -> str:
    """The model's name from the analysis metadata: the user's MODEL (`spec`) where recorded, else
    the last part of a local path (never a folder inside site-packages), else the text as it is."""
    model = analysis.metadata.get("model", "")
    if isinstance(model, dict):
        model = model.get("spec") or model.get("location") or ""
    model = str(model)
    return Path(model).name if Path(model).is_absolute() else model


def plot_heatmap(analysis: Analysis, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG with one heatmap per matrix metric and the Block Influence bars. `title` names
    the model (the user's MODEL argument); by default it comes from the analysis metadata."""
    # deferred: matplotlib is imported only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    # deferred: matplotlib is imported only when a figure is drawn
    import matplotlib.pyplot as plt

    size = analysis.num_layers
    matrices = [name for name in ("angular_last_token", "angular_all_tokens") if name in analysis.metrics]
    searched = bool(analysis.search and analysis.search.get("steps"))
    panels = len(matrices) + (1 if "block_influence" in analysis.metrics else 0) + searched
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), squeeze=False)
    axes = list(axes[0])
    if searched:
        _plot_search(axes.pop(), analysis.search)
    title = model_title(analysis) if title is None else title
    for ax, name in zip(axes, matrices):
        values = _matrix(analysis.metrics[name])
        image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis_r",
                          extent=(-0.5, size - 0.5, 0.5, size + 0.5), interpolation="nearest")
        best = [analysis.best_block(n, name) for n in range(1, size)]
        ax.scatter([b[0] for b in best], range(1, size), marker="o", s=14, facecolors="none",
                   edgecolors="red", linewidths=1.0, label="min per n (final layer kept)")
        ax.set_xlabel("first layer dropped, l (0-based)")
        ax.set_ylabel("block size, n")
        ax.set_title(name.replace("_", " "))
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
        figure.colorbar(image, ax=ax, label="angular distance d(x_l, x_{l+n})")
    if "block_influence" in analysis.metrics:
        ax = axes[-1]
        kinds = analysis.metadata.get("layer_kinds") or []
        if len(kinds) == size and len(set(kinds)) > 1:
            # a hybrid or mixed model: which layers attend, which are SSM or MoE, at a glance
            palette = dict(zip(sorted(set(kinds)), plt.get_cmap("tab10").colors))
            for kind, colour in palette.items():
                layers = [i for i in range(size) if kinds[i] == kind]
                ax.bar(layers, [analysis.metrics["block_influence"][i] for i in layers], color=colour, label=kind)
            ax.legend(fontsize=7, framealpha=0.8, title="layer kind", title_fontsize=7)
        else:
            ax.bar(range(size), analysis.metrics["block_influence"], color="tab:blue")
        ax.set_xlabel("layer (0-based)")
        ax.set_ylabel("block influence (1 - cos)")
        ax.set_title("block influence (ShortGPT)")
    figure.suptitle(f"{title} — {analysis.metadata.get('samples', '?')} samples, {analysis.metadata.get('tokens', '?')} tokens", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_search(ax, search: dict) -> None:
    """KL from the unpruned model against the layers removed: the search's path (each point labelled with
    the layer that step removed) and the best block by angular distance of each size."""
    steps = search["steps"]
    removed = range(1, len(steps) + 1)
    ax.plot(removed, [step["kl"] for step in steps], marker="o", color="tab:red", label=f"--search {search['method']}")
    for k, step in zip(removed, steps):
        ax.annotate(str(step["layer"]), (k, step["kl"]), textcoords="offset points", xytext=(0, 5), fontsize=6,
                    ha="center")
    blocks = [point for point in search.get("blocks", []) if point.get("kl") is not None]
    if blocks:
        ax.plot([point["size"] for point in blocks], [point["kl"] for point in blocks], marker="s", color="tab:blue",
                label="best block by angular distance")
    values = [step["kl"] for step in steps] + [point["kl"] for point in blocks]
    if min(values) < 1e-2:  # layers that change nothing (KL near 0) beside ones that do: 0 and the rest readable
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("layers removed")
    ax.set_ylabel(f"KL from the unpruned model ({search.get('aggregate', 'worst')} over sources)")
    ax.set_title("search: removal order (layer labelled)")
    ax.legend(fontsize=7, framealpha=0.8)
