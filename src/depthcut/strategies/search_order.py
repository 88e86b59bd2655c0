"""The order `depthcut analyze --search` stored (greedy or beam:K, scored on the model's output): its
first N layers, each prefix a cut the architecture allowed when it was searched."""

from depthcut.errors import DepthcutError
from depthcut.strategies import register_strategy


@register_strategy("search", needs_analysis=True,
                   description="the first N layers of the order `depthcut analyze --search` stored (--analysis FILE)")
def choose(drop, num_layers, analysis, seed):
    order = analysis.search_order()
    if drop > len(order):
        raise DepthcutError(f"the analysis's search removed {len(order)} layers; --drop {drop} needs a deeper one "
                            f"(depthcut analyze --search {analysis.search.get('method', 'greedy')} --search-drop {drop})")
    return order[:drop]
