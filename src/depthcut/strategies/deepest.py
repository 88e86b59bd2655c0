"""The paper's simple baseline: the N layers just before the last one."""

from depthcut.strategies import register_strategy


def ranked(drop, num_layers, analysis, seed):
    """The deepest block first, then each one a layer shallower, for architectures that allow only some cuts."""
    return [list(range(stop - drop, stop)) for stop in range(num_layers - 1, drop - 1, -1)]


@register_strategy("deepest", needs_analysis=False, description="the N layers just before the final layer",
                   ranked=ranked)
def choose(drop, num_layers, analysis, seed):
    return list(range(num_layers - 1 - drop, num_layers - 1))
