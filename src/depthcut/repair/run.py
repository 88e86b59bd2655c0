"""`repair`: statistics gathered, the method fitted and folded into the unpruned model, in one call."""

from __future__ import annotations

import logging

from depthcut.analysis.calibration import as_calibration
from depthcut.repair import REPAIRS
from depthcut.repair.lstsq import choose_ridge
from depthcut.repair.methods import RepairFit, apply_repair, fit_repair
from depthcut.repair.statistics import repair_statistics

log = logging.getLogger(__name__)
# A d x d map fitted on fewer tokens than this many times d overfits its calibration text (issue 22).
TOKENS_PER_UNKNOWN = 16


def repair(
    model,
    tokenizer,
    data,
    block,
    method: str,
    *,
    samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    mode: str = "windows",
    text_field: str = "text",
    layer_path: str | None = None,
    progress: bool = False,
    heldout=None,
    fold: bool = True,
    **options,
) -> RepairFit:
    """Gather statistics on `data` (a DATA string, list of texts, `TextSource` or `CalibrationSet`), fit
    `method` and fold it into `model`, which still has every layer; prune `block` afterwards.

    With `heldout` (data as `data`, text the fit never sees), the fit is also judged there: its
    `details` gain `relative_error_heldout_before` (plain pruning), `relative_error_heldout_after`
    and `heldout_tokens`. `fold=False` only fits (`repair_folded` can then try it without a copy)."""
    chosen = REPAIRS.get(method)
    calibration = as_calibration(data, tokenizer, samples, seq_len, mode, seed, text_field)
    gather = {"layer_path": layer_path, "batch_size": batch_size, "seed": seed}
    statistics = repair_statistics(model, calibration, block, [method], progress=progress, **gather)
    judged = None
    if heldout is not None:
        held = as_calibration(heldout, tokenizer, max(1, samples // 4), seq_len, mode, seed, text_field)
        # the error of a linear map needs M^T M; that of a scale, the three sums magnitude gathers
        judged = repair_statistics(model, held, block, ["lstsq" if chosen.linear else "magnitude"], **gather)
    fit = fit_judged(method, statistics, judged, **options)
    if fold:
        apply_repair(model, fit, layer_path)
    return fit


def fit_judged(method: str, statistics, judged=None, **options) -> RepairFit:
    """`fit_repair`, judged on held-out sums `judged` when given: a linear map's ridge is then chosen on
    them (unless `options` name one; `ridge_path` in the fit's details), and the details gain
    `relative_error_heldout_before` (plain pruning), `relative_error_heldout_after`, `heldout_tokens`."""
    path = None
    width = statistics.mtm.shape[0] if statistics.mtm is not None else 0
    if REPAIRS.get(method).linear and statistics.tokens < TOKENS_PER_UNKNOWN * width:
        log.warning("%s fits a %d x %d map from %d calibration tokens, fewer than %d per row of the map (%d): "
                    "give more --samples or a longer --seq-len", method, width, width, statistics.tokens,
                    TOKENS_PER_UNKNOWN, TOKENS_PER_UNKNOWN * width)
    if judged is not None and REPAIRS.get(method).linear and "ridge" not in options:
        options["ridge"], path = choose_ridge(statistics, judged)
    fit = fit_repair(method, statistics, **options)
    if judged is not None:
        fit.details.update(relative_error_heldout_before=judged.error_before,
                           relative_error_heldout_after=fit.error_on(judged), heldout_tokens=judged.tokens)
    if path is not None:
        fit.details["ridge_path"] = path
    return fit
