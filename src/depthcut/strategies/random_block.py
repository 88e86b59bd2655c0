"""A baseline: a seeded random contiguous block that keeps the final layer."""

import random

from depthcut.strategies import register_strategy


@register_strategy("random", needs_analysis=False, description="a seeded random contiguous block (baseline)")
def choose(drop, num_layers, analysis, seed):
    first = random.Random(f"{seed}/{num_layers}/{drop}").randrange(0, num_layers - drop)
    return list(range(first, first + drop))
