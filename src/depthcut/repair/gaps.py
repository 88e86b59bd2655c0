"""A repair for every gap of a cut of several runs of consecutive layers (e.g. layers 3, 4, 9, 10, 11).

Each gap (a maximal run of removed layers, `gap_runs`) gets a map of its own, fitted in order from the
first: gap k's sums are gathered on the model whose gaps before k are already removed and repaired,
so each map learns the stream that the maps before it produce. Each fit is folded into the layer
before its gap, as a single-gap repair is; a single gap is fitted exactly as `repair` fits it.

Every fit is recorded in the ORIGINAL model's numbering (`first`, `stop`, `num_layers` of the unpruned
model): the fits are folded, in order, into the unpruned model, and the layers removed after.

    fits = fit_gaps(model, [3, 4, 9, 10, 11], "lstsq", calibration, heldout)
    with gaps_folded(model, fits):          # tried without a copy of the model
        ...
    apply_gaps(model, fits)                 # or kept
    depthcut.prune(model, [3, 4, 9, 10, 11])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

from torch import nn

from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack
from depthcut.model.surgery import layers_removed, validate_layers
from depthcut.repair import REPAIRS
from depthcut.repair.architectures import architecture_of
from depthcut.repair.methods import RepairFit, apply_repair, repair_folded
from depthcut.repair.run import fit_judged
from depthcut.repair.statistics import MAX_ROWS, RepairStatistics, block_statistics


def gap_runs(layers: Iterable[int], num_layers: int) -> list[tuple[int, int]]:
    """The removed `layers` as their maximal runs of consecutive indices, half-open, in order:
    [3, 4, 9, 10, 11] -> [(3, 5), (9, 12)]."""
    runs: list[tuple[int, int]] = []
    for index in validate_layers(layers, num_layers):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def check_gaps(model: nn.Module, layers: Iterable[int], method: str, layer_path: str | None = None) -> None:
    """Raise the refusal `method` would give for any gap of removing `layers` from the unpruned
    `model` (e.g. lstsq for a gap at layer 0), without computing."""
    stack = find_layer_stack(model, layer_path)
    chosen, arch = REPAIRS.get(method), architecture_of(model)
    for first, stop in gap_runs(layers, len(stack)):
        chosen.check(model, stack, arch, first, stop)


def in_original_numbering(statistics: RepairStatistics, first: int, stop: int, num_layers: int) -> RepairStatistics:
    """`statistics` gathered on a partly cut model, renumbered as the gap [first, stop) of the unpruned model."""
    return dataclasses.replace(statistics, first=first, stop=stop, num_layers=num_layers)


def fit_gaps(model: nn.Module, layers: Iterable[int], method: str, calibration, heldout=None, *,
             layer_path: str | None = None, batch_size: int = 8, max_rows: int = MAX_ROWS, seed: int = 0,
             allow_unknown_config: Sequence[str] = (), progress: bool = False, **options) -> list[RepairFit]:
    """One fit of `method` per gap of removing `layers` from the unpruned `model`, fitted in order on
    `calibration` (a `CalibrationSet`), each on the stream the fits before it produce; judged on
    `heldout` (a `CalibrationSet`; the ridge of a linear map is chosen there, as `repair` chooses it).
    `model` is left as it was. Fits are in the unpruned model's numbering; a later one's `details` say
    which gaps were cut and repaired under it (`fitted_after_gaps`). `options` go to the method."""
    stack = find_layer_stack(model, layer_path)
    num_layers = len(stack)
    runs = gap_runs(layers, num_layers)
    check_gaps(model, layers, method, layer_path)  # every gap refused before any pass
    linear = REPAIRS.get(method).linear
    gather = {"layer_path": layer_path, "batch_size": batch_size, "seed": seed}
    fits: list[RepairFit] = []
    for first, stop in runs:
        earlier = [index for gap in fits for index in range(gap.first, gap.stop)]
        shift = len(earlier)  # the gap's place in the model without the earlier gaps
        block = tuple(range(first - shift, stop - shift))
        with _cut_and_repaired(model, fits, earlier, layer_path, allow_unknown_config):
            statistics = block_statistics(model, calibration, {block: [method]}, max_rows=max_rows, progress=progress,
                                          **gather)[block]
            judged = None
            if heldout is not None:
                # the error of a linear map needs M^T M; that of a scale, the three sums magnitude gathers
                judged = block_statistics(model, heldout, {block: ["lstsq" if linear else "magnitude"]},
                                          **gather)[block]
        if shift:
            statistics = in_original_numbering(statistics, first, stop, num_layers)
            if judged is not None:
                judged = in_original_numbering(judged, first, stop, num_layers)
        fit = fit_judged(method, statistics, judged, **options)
        if fits:
            fit.details["fitted_after_gaps"] = [[gap.first, gap.stop] for gap in fits]
        fits.append(fit)
    return fits


@contextmanager
def _cut_and_repaired(model: nn.Module, fits: list[RepairFit], removed: list[int], layer_path: str | None,
                      allow_unknown_config: Sequence[str]) -> Iterator[nn.Module]:
    """`model` with `fits` folded and then `removed` cut (nothing, for the first gap), whole after."""
    if not fits:
        yield model
        return
    with ExitStack() as undo:
        undo.enter_context(gaps_folded(model, fits, layer_path))  # folded in the unpruned numbering, then cut
        try:
            undo.enter_context(layers_removed(model, removed, layer_path, allow_unknown_config))
        except DepthcutError as error:
            raise DepthcutError(f"the gaps are repaired one after another, and this model refuses the cut of the "
                                f"earlier gaps alone ({removed}): {error}") from None
        yield model


@contextmanager
def gaps_folded(model: nn.Module, fits: Sequence[RepairFit], layer_path: str | None = None) -> Iterator[nn.Module]:
    """The unpruned `model` with every fit of `fits` folded in, in order, inside the block, and its weights as
    they were after (`repair_folded` for each; the saved modules are restored in reverse order)."""
    with ExitStack() as undo:
        for fit in fits:
            undo.enter_context(repair_folded(model, fit, layer_path))
        yield model


def apply_gaps(model: nn.Module, fits: Sequence[RepairFit], layer_path: str | None = None) -> nn.Module:
    """Fold every fit of `fits` into the UNPRUNED `model`, in order, in place; prune the layers afterwards."""
    for fit in fits:
        apply_repair(model, fit, layer_path)
    return model


def gaps_summary(fits: Sequence[RepairFit]) -> dict:
    """What a record of several fits says at its top level: the method, every removed layer, the tokens,
    and the relative errors at the cuts as the mean over the gaps (each gap's own under `gaps`)."""
    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    summary = {
        "method": fits[0].method,
        "block": None,
        "layers": [index for fit in fits for index in range(fit.first, fit.stop)],
        "tokens": fits[0].tokens,
        "ridge": None,
        "relative_error_before": mean(fit.error_before for fit in fits),
        "relative_error_after": mean(fit.error_after for fit in fits),
    }
    heldout = [fit.details for fit in fits if "relative_error_heldout_before" in fit.details]
    if len(heldout) == len(fits):
        summary.update(relative_error_heldout_before=mean(d["relative_error_heldout_before"] for d in heldout),
                       relative_error_heldout_after=mean(d["relative_error_heldout_after"] for d in heldout),
                       heldout_tokens=heldout[0]["heldout_tokens"])
    return {**summary, "gaps": [fit.as_dict() for fit in fits]}
