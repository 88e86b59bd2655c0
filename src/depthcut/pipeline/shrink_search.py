"""`depthcut shrink --search greedy`: a candidate cut found on the model's output rather than on its
residual stream (SLEB, BlockPruner): from the unpruned model, remove one layer at a time, each step
the layer whose removal raises the validation KL from the unpruned model least, on the screening
windows. Every trial is cut for its scoring only (`layers_removed`: no copy) and resumed from the
stream entering the layer before its first removed one, so a trial late in the stack costs a late
part of a forward pass. Cuts the architecture refuses (layer kinds, periods) are never proposed:
`remove_layers` checks each trial. The order of removal is kept: its first k layers are the search's
cut for any smaller drop."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from depthcut.analysis.calibration import CalibrationSet
from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack
from depthcut.pipeline.configs import ShrinkConfig
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


def search_cost(config: ShrinkConfig, drop: int, num_layers: int, sources: int, seconds_per_window: float) -> float:
    """Seconds the greedy search should take: each step tries every layer left (the final one stays), each
    trial about half a forward pass (resumed where its cut starts) of the screening windows of every
    source, and the search's references take one pass over them."""
    trials = sum(num_layers - 1 - step for step in range(drop))
    return seconds_per_window * sources * config.screen_windows * (0.5 * trials + 1)


def greedy_search(model, validation: dict[str, CalibrationSet], drop: int, config: ShrinkConfig) -> SearchPath:
    """The greedy order of `drop` layers on the first `config.screen_windows` windows of each source (all
    of them when that is 0). Stops early, with what it found, where no further layer may be removed."""
    started = time.perf_counter()
    count = config.screen_windows or min(len(w.input_ids) for w in validation.values())
    windows = {name: first_windows(sets, count) for name, sets in validation.items()}
    num_layers = len(find_layer_stack(model, config.layer_path))
    # the stream entering every layer, to resume each trial where its cut starts
    predictions = references(model, windows, config.batch_size, [[layer] for layer in range(1, num_layers)],
                             config.layer_path, config.allow_unknown_config)
    path = SearchPath("greedy", windows=count)
    cut = {"layer_path": config.layer_path, "allow_unknown_config": config.allow_unknown_config}
    for step in range(drop):
        step_started = time.perf_counter()
        best = None
        for layer in range(num_layers - 1):  # the final layer stays, as in every strategy
            if layer in path.order:
                continue
            trial = sorted([*path.order, layer])
            try:
                scores = scores_after_cut(model, trial, predictions, config.batch_size, **cut)
            except DepthcutError:  # a cut the architecture refuses: never proposed
                continue
            path.trials += 1
            means = {name: s.summary()["kl"] for name, s in scores.items()}
            value = max(means.values()) if config.aggregate == "worst" else sum(means.values()) / len(means)
            if best is None or value < best[0]:
                best = (value, layer, means)
        if best is None:
            log.info("shrink: the search stops after %d layer(s): no further layer may be removed", step)
            break
        value, layer, means = best
        path.order.append(layer)
        path.steps.append({"layer": layer, "kl": value, "per_source": means})
        step_seconds = time.perf_counter() - step_started
        log.info("shrink: search step %d of %d: layer %d (KL %.4f)%s", step + 1, drop, layer, value,
                 f", about {minutes(step_seconds * (drop - step - 1))} left" if step + 1 < drop else "")
    path.seconds = time.perf_counter() - started
    return path
