"""Selection strategies: which N layers to remove. Each is a small registered function.

A strategy takes `(drop, num_layers, analysis, seed)` and returns sorted 0-based layer indices.
Strategies that read an `Analysis` say so with `needs_analysis = True`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from depthcut.errors import DepthcutError
from depthcut.registry import Registry
from depthcut.result import Analysis


@dataclass(frozen=True)
class Strategy:
    name: str
    choose: Callable[[int, int, Analysis | None, int], list[int]]
    needs_analysis: bool
    description: str


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register_strategy(name: str, needs_analysis: bool, description: str):
    def decorator(choose):
        STRATEGIES.register(name)(Strategy(name, choose, needs_analysis, description))
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


from depthcut.strategies import angular, block_influence, deepest, random_block  # noqa: F401
