"""The repair step of a prune: the training-free repair fitted on calibration text, judged on
held-out text, and folded into the weights, in memory or one layer at a time (`depthcut.repair`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer

from depthcut.analysis.calibration import CalibrationSet, build_calibration
from depthcut.errors import DepthcutError
from depthcut.io.data import load_texts, split_documents
from depthcut.model.loading import resolve_device
from depthcut.model.precision import choose_dtype
from depthcut.repair import fit_repair, repair
from depthcut.repair.streamed import check_streamed_repair, folded_tensors, streamed_repair_statistics

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from depthcut.pipeline.prune import PruneConfig

HELDOUT_FRACTION = 0.1  # of the repair data's documents, to judge the fit on


def repair_lines(fit: dict | None) -> list[str]:
    """What a prune says of its repair: the error at the cut before and after, on the calibration and
    the held-out text, the tensors it changed; a warning where the fit does not carry to held-out text."""
    if not fit:
        return []
    lines = [f"repair {fit['method']}: relative error at the cut {fit['relative_error_before']:.4f} -> "
             f"{fit['relative_error_after']:.4f} on {fit['tokens']:,} calibration tokens, "
             f"{fit['relative_error_heldout_before']:.4f} -> {fit['relative_error_heldout_after']:.4f} on "
             f"{fit['heldout_tokens']:,} held-out tokens"]
    if fit.get("changed_tensors"):
        lines.append(f"repair changed {len(fit['changed_tensors'])} tensor(s): {', '.join(fit['changed_tensors'][:4])}"
                     + (" ..." if len(fit["changed_tensors"]) > 4 else ""))
    if fit["relative_error_heldout_after"] >= fit["relative_error_heldout_before"]:
        lines.append("warning: on held-out text the repair does no better than plain pruning: it was fitted on too "
                     "little data for its unknowns (give more --samples or a longer --seq-len), or choose --repair none")
    return lines


def repair_samples(config: PruneConfig, tokenizer):
    """(calibration samples the repair is fitted on, held-out samples that judge it, the data named):
    a tenth of the documents is held out, so the fit is judged on text it never saw."""

    data = config.data or "c4"
    fitted_on, held_out = split_documents(load_texts(data, config.text_field), HELDOUT_FRACTION, config.seed)
    samples = {"seq_len": config.seq_len, "mode": config.sample_mode, "seed": config.seed}
    calibration = build_calibration(tokenizer, fitted_on, config.samples, **samples)
    heldout = build_calibration(tokenizer, held_out, max(1, config.samples // 4), **samples)
    return calibration, heldout, data


def repair_record(config: PruneConfig, fit, heldout, data: str) -> dict:
    """What provenance records of a repair: its fit (judged on the held-out samples too)."""
    return {**fit.as_dict(), "data": data, "samples": config.samples, "heldout_samples": heldout.input_ids.shape[0],
            "seq_len": config.seq_len, "seed": config.seed}


def repair_in_memory(config: PruneConfig, model, tokenizer, removed: list[int]) -> dict | None:
    """Fit `config.repair` on the original model's activations, judge it on held-out text, and fold it
    into its weights (before the layers go); what provenance records of it."""
    if config.repair == "none":
        return None
    calibration, heldout, data = repair_samples(config, tokenizer)
    log.info("repairing the cut with %s on %s ...", config.repair, data)
    fit = repair(model, tokenizer, calibration, removed, config.repair, heldout=heldout, seed=config.seed,
                 batch_size=config.batch_size, layer_path=config.layer_path, progress=not config.quiet)
    return repair_record(config, fit, heldout, data)


def repair_streamed(config: PruneConfig, source, removed: list[int]) -> tuple[dict, dict]:
    """`repair_in_memory` for a model that is never loaded (a safetensors folder or a GGUF file): the
    statistics gathered layer by layer (fitted and held-out samples in one pass, stopping at the
    cut), then the changed tensors folded. Returns (what provenance records, {checkpoint tensor
    name: new value})."""


    location = Path(source.location) / source.gguf_file if source.gguf_file else Path(source.location)
    check_streamed_repair(location, removed, config.repair, config.layer_path, config.trust_remote_code)
    tokenizer = tokenizer_of(source, config.trust_remote_code)
    calibration, heldout, data = repair_samples(config, tokenizer)
    width = max(calibration.input_ids.shape[1], heldout.input_ids.shape[1])

    def padded(t):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    both = CalibrationSet(torch.cat([padded(calibration.input_ids), padded(heldout.input_ids)]),
                          torch.cat([padded(calibration.attention_mask), padded(heldout.attention_mask)]),
                          calibration.description, calibration.mode, calibration.seed)
    device = resolve_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    log.info("repairing the cut with %s on %s, one layer at a time (%s) ...", config.repair, data, dtype.name)
    statistics, judged = streamed_repair_statistics(
        location, both, removed, [config.repair], heldout_from=len(calibration), dtype=dtype.dtype, device=device,
        batch_size=config.batch_size, layer_path=config.layer_path, seed=config.seed,
        trust_remote_code=config.trust_remote_code, progress=not config.quiet)
    statistics.calibration = calibration.as_dict()
    fit = fit_repair(config.repair, statistics)
    changed = folded_tensors(location, fit, config.layer_path, config.trust_remote_code)
    fit.details.update(relative_error_heldout_before=judged.error_before,
                       relative_error_heldout_after=fit.error_on(judged), heldout_tokens=judged.tokens)
    record = {**repair_record(config, fit, heldout, data), "streamed": True, "statistics_dtype": dtype.name,
              "changed_tensors": sorted(changed)}
    return record, changed


def tokenizer_of(source, trust_remote_code: bool):
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **gguf)
    except Exception as error:  # transformers raises many kinds here; the user needs the one line
        where = Path(source.location) / (source.gguf_file or "")
        raise DepthcutError(f"cannot load the tokenizer of {where} to tokenize the repair's data "
                            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
