"""`depthcut shrink --search greedy|beam:K` and `depthcut analyze --search`: a cut found on the model's
output rather than on its residual stream (SLEB, BlockPruner): from the unpruned model, remove one layer
at a time, each step the layer whose removal raises the validation KL from the unpruned model least.
`beam:K` keeps the K best partial cuts at each step instead of one (beam:1 is greedy, trial for trial).
Every trial is cut for its scoring only (`layers_removed`: no copy) and resumed from the stream entering
the layer before its first removed one, so a trial late in the stack costs a late part of a forward
pass. Cuts the architecture refuses (layer kinds, periods) are never proposed: `remove_layers` checks
each trial. The order of removal is kept: its first k layers are the search's cut for any smaller drop
(for a beam, those of the partial cut the best final cut grew from)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from depthcut.analysis.calibration import CalibrationSet
from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack
from depthcut.pipeline.configs import ShrinkConfig
from depthcut.pipeline.search_choice import search_width
from depthcut.pipeline.shrink_steps import minutes
from depthcut.pipeline.validation import references, scores_after_cut

log = logging.getLogger(__name__)


@dataclass
class SearchPath:
    """The layers in the order the search removed them, with each step's score."""

    method: str
    order: list[int] = field(default_factory=list)
    # per step: the layer removed, the score it left (worst or mean over sources of the mean KL), per source
    steps: list[dict] = field(default_factory=list)
    trials: int = 0
    windows: int = 0  # per source
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def first_windows(windows: CalibrationSet, count: int) -> CalibrationSet:
    return CalibrationSet(windows.input_ids[:count], windows.attention_mask[:count], windows.description,
                          windows.mode, windows.seed)


def search_trials(width: int, drop: int, num_layers: int) -> int:
    """The most trials a search keeping `width` partial cuts makes for `drop` layers: each step tries
    every layer left (the final one stays) after each partial cut kept (fewer where two partial cuts
    grow into the same cut, scored once)."""
    total, kept = 0, 1
    for step in range(drop):
        left = num_layers - 1 - step
        total += kept * left
        kept = min(width, kept * left)
    return total


def search_cost(config: ShrinkConfig, drop: int, num_layers: int, sources: int, seconds_per_window: float) -> float:
    """Seconds the search should take: each trial about half a forward pass (resumed where its cut starts)
    of the screening windows of every source (`search_trials`: beam:K about K times greedy's), and the
    search's references take one pass over them."""
    trials = search_trials(max(1, search_width(config.search)), drop, num_layers)
    return seconds_per_window * sources * config.screen_windows * (0.5 * trials + 1)


def greedy_search(model, validation: dict[str, CalibrationSet], drop: int, config: ShrinkConfig) -> SearchPath:
    """`config.search`'s order of `drop` layers (greedy, or beam:K) on the first `config.screen_windows`
    windows of each source (all of them when that is 0). Stops early, with what it found, where no
    further layer may be removed."""
    count = config.screen_windows or min(len(w.input_ids) for w in validation.values())
    windows = {name: first_windows(sets, count) for name, sets in validation.items()}
    predictions = search_references(model, windows, config.batch_size, config.layer_path,
                                    config.allow_unknown_config)
    method = config.search if config.search != "none" else "greedy"
    return search_order(model, predictions, drop, method, config.batch_size, config.aggregate, config.layer_path,
                        config.allow_unknown_config, windows=count)


def search_references(model, windows: dict[str, CalibrationSet], batch_size: int, layer_path: str | None = None,
                      allow_unknown_config=()) -> dict:
    """The unpruned model's predictions on `windows`, with the stream entering every layer, to resume each
    trial where its cut starts."""
    num_layers = len(find_layer_stack(model, layer_path))
    return references(model, windows, batch_size, [[layer] for layer in range(1, num_layers)], layer_path,
                      allow_unknown_config)


def aggregated(means: dict[str, float], aggregate: str) -> float:
    """One score over sources: the worst, or the mean."""
    return max(means.values()) if aggregate == "worst" else sum(means.values()) / len(means)


def search_order(model, predictions: dict, drop: int, method: str, batch_size: int, aggregate: str = "worst",
                 layer_path: str | None = None, allow_unknown_config=(), windows: int = 0) -> SearchPath:
    """The order in which `method` (greedy, beam:K) removes `drop` layers, scored against `predictions`
    (`search_references`). Each step extends every partial cut kept by every layer left, scores each
    cut once (a cut reached from two partial cuts keeps the better one's path), and keeps the `width`
    lowest; ties go to the partial cut kept earlier, then to the lower layer, so that beam:1 is greedy."""
    started = time.perf_counter()
    width = search_width(method)
    num_layers = len(find_layer_stack(model, layer_path))
    path = SearchPath(method, windows=windows)
    cut = {"layer_path": layer_path, "allow_unknown_config": allow_unknown_config}
    kept: list[SearchPath] = [SearchPath(method)]  # the partial cuts, best first, each with its order and steps
    for step in range(drop):
        step_started = time.perf_counter()
        grown = []  # (score, partial cut)
        tried = set()
        for partial in kept:
            for layer in range(num_layers - 1):  # the final layer stays, as in every strategy
                trial = tuple(sorted([*partial.order, layer]))
                if layer in partial.order or trial in tried:
                    continue
                tried.add(trial)
                try:
                    scores = scores_after_cut(model, list(trial), predictions, batch_size, **cut)
                except DepthcutError:  # a cut the architecture refuses: never proposed
                    continue
                path.trials += 1
                means = {name: s.summary()["kl"] for name, s in scores.items()}
                value = aggregated(means, aggregate)
                grown.append((value, SearchPath(method, [*partial.order, layer],
                                                [*partial.steps, {"layer": layer, "kl": value, "per_source": means}])))
        if not grown:
            log.info("search: stops after %d layer(s): no further layer may be removed", step)
            break
        grown.sort(key=lambda scored: scored[0])  # stable: ties keep the order they were tried in
        kept = [partial for _, partial in grown[:width]]
        best = kept[0].steps[-1]
        step_seconds = time.perf_counter() - step_started
        log.info("search: step %d of %d: layer %d (KL %.4f)%s", step + 1, drop, best["layer"], best["kl"],
                 f", about {minutes(step_seconds * (drop - step - 1))} left" if step + 1 < drop else "")
    path.order, path.steps = kept[0].order, kept[0].steps
    path.seconds = time.perf_counter() - started
    return path
