"""The choice step of a prune: the layers a strategy removes, among the cuts the architecture
allows (`depthcut.model.surgery.cut_config` says why a cut is refused)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack
from depthcut.model.surgery import cut_config, parse_layer_spec
from depthcut.pipeline.common import run_analysis
from depthcut.strategies import STRATEGIES, check_drop, select_allowed

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from depthcut.pipeline.prune import PruneConfig


def needs_analysis(config: PruneConfig, analysis) -> bool:
    """Whether choosing the layers means analyzing calibration data first."""
    return config.layers is None and STRATEGIES.get(config.strategy).needs_analysis and analysis is None


def choose_layers(config: PruneConfig, num_layers: int, analysis=None, model=None, tokenizer=None, source=None,
                  refusal=None):
    """(removed layers, how they were chosen, the analysis used); analyzes `config.data` (default c4)
    on the loaded model when the strategy needs an analysis and none was given. `refusal(layers)`
    (None: every cut is allowed) says why the architecture cannot lose those layers: the strategy
    then takes its best allowed choice, and says which better ones it passed over."""

    if config.layers is not None:
        return parse_layer_spec(config.layers, num_layers), "explicit", None
    check_drop(config.drop, num_layers)
    if STRATEGIES.get(config.strategy).needs_analysis and analysis is None:
        data = dataclasses.replace(config, data=config.data or "c4")
        log.info("analyzing %s to choose layers ...", data.data)
        analysis = run_analysis(model, tokenizer, data, config.layer_path, progress=not config.quiet)
        analysis.metadata["model"] = source.as_dict()
    used = analysis if STRATEGIES.get(config.strategy).needs_analysis else None
    removed, skipped = select_allowed(config.strategy, config.drop, num_layers, used, config.seed,
                                      refusal or (lambda layers: None))
    if skipped:
        best, reason = skipped[0]
        log.warning("%s prefers removing layers %s, which this model does not allow (%s); %d better choice(s) "
                    "passed over, removing %s", config.strategy, _span(best), reason, len(skipped), _span(removed))
    return removed, config.strategy, analysis


def _span(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"[{layers[0]}, {layers[-1] + 1})" if contiguous else str(layers)


def cut_refusal(model, config: PruneConfig):
    """`refusal(layers)` for `choose_layers`: why removing those layers from `model` (with weights or
    without) would not give an exact model, or None."""

    num_layers = len(find_layer_stack(model, config.layer_path))

    def refusal(layers: list[int]) -> str | None:
        kept = [i for i in range(num_layers) if i not in set(layers)]
        try:
            cut_config(model, model.config, kept, config.layer_path, config.allow_unknown_config,
                       trust_remote_code=config.trust_remote_code)
        except DepthcutError as error:
            return str(error)
        return None

    return refusal
