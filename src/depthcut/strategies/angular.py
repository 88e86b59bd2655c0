"""Gromov et al.: the contiguous block of smallest last-token angular distance, final layer kept."""

from depthcut.strategies import register_strategy


def ranked(drop, num_layers, analysis, seed):
    """Every block in order of distance: where the best cannot be cut, the next best is taken."""
    return [list(range(first, stop)) for first, stop in analysis.ranked_blocks(drop)]


@register_strategy("angular", needs_analysis=True, description="optimal contiguous block by angular distance (paper)",
                   ranked=ranked)
def choose(drop, num_layers, analysis, seed):
    first, stop = analysis.best_block(drop)
    return list(range(first, stop))
