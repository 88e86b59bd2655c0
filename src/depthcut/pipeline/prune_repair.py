"""The repair step of a prune: the training-free repair fitted on calibration text, judged on
held-out text, and folded into the weights, in memory or one layer at a time (`depthcut.repair`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import AutoConfig, AutoTokenizer

from depthcut.analysis.calibration import CalibrationSet, build_calibration
from depthcut.errors import DepthcutError
from depthcut.io.data import TextSource, load_texts, split_documents
from depthcut.model.layers import text_config
from depthcut.model.loading import resolve_device
from depthcut.model.precision import choose_dtype
from depthcut.pipeline.configs import DEFAULT_SAMPLES
from depthcut.pipeline.validation import judge, references, scores_after_cut, unpruned_losses, validation_sets
from depthcut.repair import REPAIRS, RepairFit
from depthcut.repair.gaps import apply_gaps, check_gaps, fit_gaps, gaps_folded, gaps_summary
from depthcut.repair.run import TOKENS_PER_UNKNOWN
from depthcut.repair.streamed import check_streamed_repair, folded_tensors, streamed_fit_gaps

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
    if fit.get("gaps"):
        lines[0] = lines[0].replace("at the cut", f"at the {len(fit['gaps'])} cuts (mean)", 1)
        lines.extend(f"  gap [{gap['block'][0]}, {gap['block'][1]}): {gap['relative_error_before']:.4f} -> "
                     f"{gap['relative_error_after']:.4f} calibration, {gap['relative_error_heldout_before']:.4f} -> "
                     f"{gap['relative_error_heldout_after']:.4f} held-out" for gap in fit["gaps"])
    if fit.get("changed_tensors"):
        lines.append(f"repair changed {len(fit['changed_tensors'])} tensor(s): {', '.join(fit['changed_tensors'][:4])}"
                     + (" ..." if len(fit["changed_tensors"]) > 4 else ""))
    validation = fit.get("validation")
    if validation is not None:
        if not fit["applied"]:
            lines.append(f"repair {fit['method']} NOT applied: {validation['why']}; the plain cut was written "
                         "(--repair-policy keep)")
        elif not validation["beats_plain"]:
            lines.append(f"warning: repair {fit['method']} applied although {validation['why']} "
                         "(--repair-policy warn)")
        else:
            lines.append(f"repair {fit['method']} validated: {validation['why']}")
    else:
        lines.append("note: a streamed repair is not validated on the model's output (the model is never loaded); "
                     "the in-memory path or `depthcut shrink` checks it against the plain cut")
    if fit["relative_error_heldout_after"] >= fit["relative_error_heldout_before"]:
        lines.append("warning: on held-out text the repair does no better than plain pruning: it was fitted on too "
                     "little data for its unknowns (give more --samples or a longer --seq-len), or choose --repair none")
    return lines


class RepairSamples(NamedTuple):
    calibration: CalibrationSet  # what the repair is fitted on
    heldout: CalibrationSet  # held-out samples that judge the fit
    data: str  # the data named
    held_out: TextSource  # the held-out documents themselves (validation text)
    fitted_on: TextSource  # the other documents (what a heal may train on)


def repair_sample_count(config, width: int | None, methods) -> int:
    """Calibration sequences for the repairs' fit: `--samples` where given; else 64, or as many as give a
    linear map (lstsq, cosine: d x d unknowns) `TOKENS_PER_UNKNOWN` tokens per unknown row, so that the
    default grows with the hidden size (a 576-wide model: 64 x 256 tokens; 4096-wide: 256 x 256)."""
    if config.samples is not None:
        return config.samples
    linear = any(method != "none" and REPAIRS.get(method).linear for method in methods)
    if not width or not linear:
        return DEFAULT_SAMPLES
    return max(DEFAULT_SAMPLES, math.ceil(TOKENS_PER_UNKNOWN * width / config.seq_len))


def repair_samples(config: PruneConfig, tokenizer, width: int | None = None, methods=()) -> RepairSamples:
    """(calibration samples the repair is fitted on, held-out samples that judge it, the data named, the
    held-out documents themselves, the others): a tenth of the documents is held out, so the fit is
    judged on text it never saw (and validated on it, `depthcut.pipeline.validation`). `width`, the
    hidden size, and `methods`, the repairs to fit, size the default sample (`repair_sample_count`)."""

    data = config.data or "c4"
    count = repair_sample_count(config, width, methods)
    if config.samples is None and count > DEFAULT_SAMPLES:
        log.info("the repair fits a %d x %d map: %d calibration samples of %d tokens, %d tokens per unknown "
                 "(--samples sets another count)", width, width, count, config.seq_len, TOKENS_PER_UNKNOWN)
    fitted_on, held_out = split_documents(load_texts(data, config.text_field), HELDOUT_FRACTION, config.seed)
    samples = {"seq_len": config.seq_len, "mode": config.sample_mode, "seed": config.seed}
    calibration = build_calibration(tokenizer, fitted_on, count, **samples)
    heldout = build_calibration(tokenizer, held_out, max(1, count // 4), **samples)
    return RepairSamples(calibration, heldout, data, held_out, fitted_on)


def repair_record(config: PruneConfig, fit: RepairFit | list[RepairFit], calibration, heldout, data: str) -> dict:
    """What provenance records of a repair: its fit (judged on the held-out samples too); for a cut of
    several gaps (a list of fits, one per gap) the mean of their errors and each fit under `gaps`."""
    fits = [fit] if isinstance(fit, RepairFit) else list(fit)
    fitted = fits[0].as_dict() if len(fits) == 1 else gaps_summary(fits)
    return {**fitted, "data": data, "samples": calibration.input_ids.shape[0],
            "heldout_samples": heldout.input_ids.shape[0], "seq_len": config.seq_len, "seed": config.seed}


def repair_in_memory(config: PruneConfig, model, tokenizer, removed: list[int]) -> dict | None:
    """Fit `config.repair` on the original model's activations, judge it on held-out text and on the
    model's output (validation KL against the plain cut, `depthcut.pipeline.validation`), and fold it
    into `model`'s weights (before the layers go) only where it does better than the plain cut or
    `--repair-policy warn` asks; what provenance records of it. `--repair-policy refuse` stops instead."""
    if config.repair == "none":
        return None
    check_gaps(model, removed, config.repair, config.layer_path)  # every gap's refusal, before any pass
    calibration, heldout, data, held_out, _ = repair_samples(config, tokenizer, text_config(model).hidden_size,
                                                             [config.repair])
    sets = validation_sets(config, tokenizer, held_out)
    predictions = references(model, sets, config.batch_size, [removed], config.layer_path,
                             config.allow_unknown_config)
    cut = {"layer_path": config.layer_path, "allow_unknown_config": config.allow_unknown_config}
    plain = scores_after_cut(model, removed, predictions, config.batch_size, **cut)
    log.info("repairing the cut with %s on %s ...", config.repair, data)
    # one fit per gap, each on the stream the fits before it give; tried without a copy of the model, and
    # folded into it only once shown to help
    fits = fit_gaps(model, removed, config.repair, calibration, heldout, seed=config.seed, batch_size=config.batch_size,
                    layer_path=config.layer_path, allow_unknown_config=config.allow_unknown_config,
                    progress=not config.quiet)
    with gaps_folded(model, fits, config.layer_path):
        repaired = scores_after_cut(model, removed, predictions, config.batch_size, **cut)
    verdict = judge(plain, repaired, config.margin, config.aggregate, unpruned=unpruned_losses(predictions))
    beats, why = verdict.better, verdict.why
    applied = beats or config.repair_policy == "warn"
    if not beats and config.repair_policy == "refuse":
        raise DepthcutError(f"--repair {config.repair} does no better than the plain cut on validation text ({why}); "
                            "nothing was written (--repair-policy keep writes the plain cut, warn the repair)")
    if applied:
        apply_gaps(model, fits, config.layer_path)
    record = repair_record(config, fits, calibration, heldout, data)
    record["validation"] = {
        "sources": {name: windows.as_dict() for name, windows in sets.items()},
        "plain": {name: scores.summary() for name, scores in plain.items()},
        "repaired": {name: scores.summary() for name, scores in repaired.items()},
        "beats_plain": beats, "why": why, "decided_by": verdict.decided_by, "policy": config.repair_policy,
        "margin": config.margin,
        "aggregate": config.aggregate}
    record["applied"] = applied
    return record


def repair_streamed(config: PruneConfig, source, removed: list[int]) -> tuple[dict, dict]:
    """`repair_in_memory` for a model that is never loaded (a safetensors folder or a GGUF file): the
    statistics gathered layer by layer (fitted and held-out samples in one pass, stopping at the
    cut), then the changed tensors folded. Returns (what provenance records, {checkpoint tensor
    name: new value})."""


    location = Path(source.location) / source.gguf_file if source.gguf_file else Path(source.location)
    check_streamed_repair(location, removed, config.repair, config.layer_path, config.trust_remote_code)
    tokenizer = tokenizer_of(source, config.trust_remote_code)
    calibration, heldout, data, _, _ = repair_samples(config, tokenizer, hidden_size_of(source, config.trust_remote_code),
                                                      [config.repair])
    width = max(calibration.input_ids.shape[1], heldout.input_ids.shape[1])

    def padded(t):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    both = CalibrationSet(torch.cat([padded(calibration.input_ids), padded(heldout.input_ids)]),
                          torch.cat([padded(calibration.attention_mask), padded(heldout.attention_mask)]),
                          calibration.description, calibration.mode, calibration.seed)
    device = resolve_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    log.info("repairing the cut with %s on %s, one layer at a time (%s) ...", config.repair, data, dtype.name)
    # one stream per gap, each with the gaps before it cut and repaired
    fits = streamed_fit_gaps(location, both, removed, config.repair, heldout_from=len(calibration), dtype=dtype.dtype,
                             device=device, batch_size=config.batch_size, layer_path=config.layer_path, seed=config.seed,
                             trust_remote_code=config.trust_remote_code, progress=not config.quiet)
    changed = folded_tensors(location, fits, config.layer_path, config.trust_remote_code)
    record = {**repair_record(config, fits, calibration, heldout, data), "streamed": True, "statistics_dtype": dtype.name,
              "changed_tensors": sorted(changed)}
    return record, changed


def hidden_size_of(source, trust_remote_code: bool) -> int | None:
    """The hidden size a model's config gives, read without loading the model (None if it gives none)."""
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    config = AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code, **gguf)
    return getattr(text_config(config), "hidden_size", None)


def tokenizer_of(source, trust_remote_code: bool):
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **gguf)
    except Exception as error:  # transformers raises many kinds here; the user needs the one line
        where = Path(source.location) / (source.gguf_file or "")
        raise DepthcutError(f"cannot load the tokenizer of {where} to tokenize the repair's data "
                            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
