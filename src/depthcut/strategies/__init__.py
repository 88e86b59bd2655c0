"""Selection strategies: which N layers to remove. Each is a small registered function.

A strategy takes `(drop, num_layers, analysis, seed)` and returns sorted 0-based layer indices.
Strategies that read an `Analysis` say so with `needs_analysis = True`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from depthcut.analysis.result import Analysis
from depthcut.errors import DepthcutError
from depthcut.registry import Registry


@dataclass(frozen=True)
class Strategy:
    name: str
    choose: Callable[[int, int, Analysis | None, int], list[int]]
    needs_analysis: bool
    description: str
    # The strategy's choices in order of preference (the first is `choose`'s), for an architecture
    # that allows only some cuts; None: the strategy has one answer.
    ranked: Callable[[int, int, Analysis | None, int], Iterable[list[int]]] | None = None


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register_strategy(name: str, needs_analysis: bool, description: str, ranked=None):
    def decorator(choose):
        STRATEGIES.register(name)(Strategy(name, choose, needs_analysis, description, ranked))
        return choose

    return decorator


def check_drop(drop: int, num_layers: int) -> None:
    if not 1 <= drop < num_layers:
        raise DepthcutError(f"--drop must be between 1 and {num_layers - 1} for a model of {num_layers} layers, got {drop}")


def select(strategy: str, drop: int, num_layers: int | None = None, analysis: Analysis | None = None,
           seed: int = 0) -> list[int]:
    """The 0-based indices of the `drop` layers that `strategy` removes (`seed`: random strategies)."""
    chosen = STRATEGIES.get(strategy)
    if analysis is not None:
        if num_layers is not None and num_layers != analysis.num_layers:
            raise DepthcutError(
                f"the analysis is of a model with {analysis.num_layers} layers, this model has {num_layers}"
            )
        num_layers = analysis.num_layers
    if num_layers is None:
        raise DepthcutError("the number of layers is needed (give num_layers or an analysis)")
    if chosen.needs_analysis and analysis is None:
        raise DepthcutError(f"strategy {strategy!r} needs an analysis (--analysis FILE or --data DATA)")
    check_drop(drop, num_layers)
    return sorted(chosen.choose(drop, num_layers, analysis, seed))


def select_allowed(strategy: str, drop: int, num_layers: int | None, analysis: Analysis | None, seed: int,
                   refusal: Callable[[list[int]], str | None]) -> tuple[list[int], list[tuple[list[int], str]]]:
    """(the layers `strategy` prefers among those whose cut `refusal` allows, the better choices it
    could not take with the reason each was refused). `refusal(layers)` is None for an allowed cut.
    A strategy with a single answer is refused with that answer's reason."""
    first = select(strategy, drop, num_layers, analysis, seed)
    num_layers = analysis.num_layers if analysis is not None else num_layers
    chosen = STRATEGIES.get(strategy)
    choices = chosen.ranked(drop, num_layers, analysis, seed) if chosen.ranked else [first]
    skipped = []
    for layers in choices:
        layers = sorted(layers)
        reason = refusal(layers)
        if reason is None:
            return layers, skipped
        skipped.append((layers, reason))
        if len(skipped) >= 64 and chosen.ranked:
            break
    layers, reason = skipped[0]
    raise DepthcutError(f"strategy {strategy!r} found no cut of {drop} layers that this model allows: "
                        f"removing {layers} is refused: {reason}")


from depthcut.strategies import angular, block_influence, deepest, random_block, search_order  # noqa: F401
