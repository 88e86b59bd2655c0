"""Gromov et al.: the contiguous block of smallest last-token angular distance, final layer kept."""

from depthcut.strategies import register_strategy


@register_strategy("angular", needs_analysis=True, description="optimal contiguous block by angular distance (paper)")
def choose(drop, num_layers, analysis, seed):
    first, stop = analysis.best_block(drop)
    return list(range(first, stop))
