"""`repair`: statistics gathered, the method fitted and folded into the unpruned model, in one call."""

from __future__ import annotations

from depthcut.analysis.calibration import as_calibration
from depthcut.repair import REPAIRS
from depthcut.repair.methods import RepairFit, apply_repair, fit_repair
from depthcut.repair.statistics import repair_statistics


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
    **options,
) -> RepairFit:
    """Gather statistics on `data` (a DATA string, list of texts, `TextSource` or `CalibrationSet`), fit
    `method` and fold it into `model`, which still has every layer; prune `block` afterwards.

    With `heldout` (data as `data`, text the fit never sees), the fit is also judged there: its
    `details` gain `relative_error_heldout_before` (plain pruning), `relative_error_heldout_after`
    and `heldout_tokens`."""
    REPAIRS.get(method)
    calibration = as_calibration(data, tokenizer, samples, seq_len, mode, seed, text_field)
    gather = {"layer_path": layer_path, "batch_size": batch_size, "seed": seed}
    statistics = repair_statistics(model, calibration, block, [method], progress=progress, **gather)
    fit = fit_repair(method, statistics, **options)
    if heldout is not None:
        held = as_calibration(heldout, tokenizer, max(1, samples // 4), seq_len, mode, seed, text_field)
        # the error of a linear map needs M^T M; that of a scale, the three sums magnitude gathers
        judge = "lstsq" if REPAIRS.get(method).linear else "magnitude"
        judged = repair_statistics(model, held, block, [judge], **gather)
        fit.details.update(relative_error_heldout_before=judged.error_before,
                           relative_error_heldout_after=fit.error_on(judged), heldout_tokens=judged.tokens)
    apply_repair(model, fit, layer_path)
    return fit
