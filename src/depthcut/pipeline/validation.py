"""Judging a training-free repair on the model's output, on text no fit saw: the validation windows
(per source; the --data corpus contributes only its held-out documents), and the rule that a repair
counts as better than the plain cut only where its KL divergence from the unpruned model is lower
by more than `margin` standard errors of the paired difference over windows and no source's loss is
higher by more than as many (do no harm: `judge`).

A cut of layers from l on (with a repair folded into layer l-1) leaves layers 0..l-2 computing what
they did: `references` keeps the unpruned stream entering layer l-1 of each cut asked for, checks on
a window that a model stripped of the layers before it reproduces the unpruned predictions, and
`scores_after_cut` then runs each candidate from there (where the check failed: from the embeddings).
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass

from depthcut.analysis.calibration import CalibrationSet, build_calibration
from depthcut.errors import DepthcutError
from depthcut.evaluation.divergence import (
    ReferencePredictions,
    WindowScores,
    paired_difference,
    reference_predictions,
    window_scores,
)
from depthcut.evaluation.reference_store import MEMORY_LIMIT, choose_store
from depthcut.io.data import TextSource, load_texts
from depthcut.model.layers import text_config
from depthcut.model.surgery import layers_removed
from depthcut.pipeline.configs import ValidationOptions

log = logging.getLogger(__name__)
# Mean KL (nats per token) a model started from the kept stream may differ from the references by:
# float16 rounding of the stored log-probabilities gives about 1e-6.
RESUME_TOLERANCE = 1e-4


def validation_sets(options: ValidationOptions, tokenizer, held_out: TextSource) -> dict[str, CalibrationSet]:
    """Validation windows per source; the --data corpus gives only its held-out documents (`held_out`)."""
    sets = {}
    for name in options.validation_sources():
        source = held_out if name == (options.data or "c4") else load_texts(name, options.text_field)
        sets[name] = build_calibration(tokenizer, source, options.validation_windows, options.seq_len, "windows",
                                       options.seed + 1, allow_fewer=True)
    return sets


def resume_layer(layers: list[int]) -> int:
    """The first layer whose input a cut of `layers` changes, counting a repair folded into the layer
    before the cut: its input is the unpruned model's."""
    return max(0, min(layers) - 1)


def references(model, sets: dict[str, CalibrationSet], batch_size: int, cuts: list[list[int]] = (),
               layer_path: str | None = None, allow_unknown_config=(), spill_dir=None,
               memory_limit: int = MEMORY_LIMIT, progress: bool = False) -> dict[str, ReferencePredictions]:
    """The unpruned model's predictions on every validation set, computed once, with the stream entering
    each cut's `resume_layer` (checked to reproduce the predictions; dropped where it does not). Where
    the probabilities of every set together would pass `memory_limit` bytes, they wait on disk
    (`spill_dir`, else the system's temporary folder), read back a slice at a time."""
    starts = sorted({resume_layer(layers) for layers in cuts} - {0})
    head = getattr(model.get_output_embeddings(), "weight", None)
    vocabulary = head.shape[0] if head is not None else text_config(model).vocab_size
    total = sum(windows.input_ids.shape[0] * (windows.input_ids.shape[1] - 1) for windows in sets.values())
    total *= vocabulary * 2  # float16
    if total > memory_limit:
        log.info("validation: the unpruned model's predictions (%.1f GB) wait on disk, read back a slice at a time",
                 total / 1e9)
    predictions = {name: reference_predictions(model, windows, batch_size, starts, layer_path,
                                               choose_store(total, spill_dir, memory_limit),
                                               progress=f"references ({name})" if progress else None)
                   for name, windows in sets.items()}
    first = next(iter(predictions.values()), None)
    for start in starts if first is not None else ():
        if not all(start in reference.entering for reference in predictions.values()):
            for reference in predictions.values():  # a stream of another layout was not kept
                reference.entering.pop(start, None)
            continue
        try:
            with layers_removed(model, range(start), layer_path, allow_unknown_config):
                check = first.subset(0, 1)
                drift = window_scores(model, check, batch_size, entering=start, layer_path=layer_path).summary()["kl"]
            reason = None if drift <= RESUME_TOLERANCE else f"it moves the predictions by a KL of {drift:.2g}"
        except DepthcutError as error:
            reason = str(error)
        if reason is not None:
            log.info("validation runs from the embeddings for cuts after layer %d: starting at it is not exact "
                     "here (%s)", start, reason)
            for reference in predictions.values():
                reference.entering.pop(start, None)
    return predictions


def scores_after_cut(model, layers: list[int], reference: dict[str, ReferencePredictions], batch_size: int,
                     layer_path: str | None = None, allow_unknown_config=(), changed_from: int | None = None
                     ) -> dict[str, WindowScores]:
    """Validation scores of `model` less `layers`, cut for the scoring only (`layers_removed`: no copy;
    `model` keeps every layer after). Runs from the stream the references kept entering `resume_layer`,
    where there is one: the layers before it are left out too, since they would only recompute that
    stream. `changed_from`: the first layer a folded repair changes (`repair.reach`; 0 for the
    embeddings), where it is before the resume layer: the run starts no later."""
    start = resume_layer(layers) if changed_from is None else min(resume_layer(layers), changed_from)
    with ExitStack() as cut:
        entering = None
        if start and all(start in predictions.entering for predictions in reference.values()):
            try:
                cut.enter_context(layers_removed(model, sorted({*range(start), *layers}), layer_path,
                                                 allow_unknown_config))
                entering = start
            except DepthcutError:  # a refused strip changes nothing: the cut alone, from the embeddings
                pass
        if entering is None:
            cut.enter_context(layers_removed(model, layers, layer_path, allow_unknown_config))
        return {name: window_scores(model, predictions, batch_size, entering, layer_path)
                for name, predictions in reference.items()}


@dataclass
class Verdict:
    """Whether a candidate is better than the cut it is judged against (do no harm), and why.

    `decided_by`: "kl" where its KL from the unpruned model is not lower beyond the margin, "loss"
    where it is, but some source's loss rises beyond the margin, "kl and loss" where both hold."""

    better: bool
    decided_by: str
    why: str


def lower_kl(baseline: dict[str, WindowScores], candidate: dict[str, WindowScores], margin: float,
             aggregate: str) -> tuple[bool, str]:
    """(whether `candidate`'s KL from the unpruned model is lower than `baseline`'s beyond the noise, the
    gains in words): on every source (`aggregate` "worst") or on the mean over sources ("mean")."""
    gains = {name: paired_difference(baseline[name].kl, candidate[name].kl) for name in candidate}
    if aggregate == "worst":
        lower = all(gain > margin * stderr for gain, stderr in gains.values())
    else:
        gain = sum(g for g, _ in gains.values()) / len(gains)
        lower = gain > margin * sum(s * s for _, s in gains.values()) ** 0.5 / len(gains)
    return lower, ", ".join(f"{name}: {gain:+.4f} ± {stderr:.4f}" for name, (gain, stderr) in gains.items())


def raised_loss(baseline: dict[str, WindowScores], candidate: dict[str, WindowScores], margin: float,
                unpruned: dict[str, list[float]] | None = None) -> tuple[list[str], str]:
    """(the sources whose loss `candidate` raises above `baseline`'s by more than `margin` paired standard
    errors, every source's rise in words). Judged per source whatever the aggregate: a user reads each
    source's loss, and a repair that helps one domain must not hurt another. With `unpruned` (per source
    the unpruned model's loss per window, `unpruned_losses`), a loss not higher than the unpruned model's
    beyond the margin is no harm, even where a cut happens to lower it (as on a random model)."""
    rises = {name: paired_difference(candidate[name].loss, baseline[name].loss) for name in candidate}
    raised = [name for name, (rise, stderr) in rises.items() if rise > margin * stderr and rise > 0]
    if unpruned:
        raised = [name for name in raised if len(unpruned.get(name, ())) != len(candidate[name].loss)
                  or _beyond(paired_difference(candidate[name].loss, unpruned[name]), margin)]
    return raised, ", ".join(f"{name}: {rise:+.4f} ± {stderr:.4f}" for name, (rise, stderr) in rises.items())


def _beyond(difference: tuple[float, float], margin: float) -> bool:
    mean, stderr = difference
    return mean > margin * stderr and mean > 0


def unpruned_losses(predictions: dict[str, ReferencePredictions]) -> dict[str, list[float]]:
    """Per source, the unpruned model's loss on each window a candidate is scored on (those with a
    predicted token), in the order `window_scores` gives a candidate's."""
    return {name: [value for value in reference.loss if not math.isnan(value)]
            for name, reference in predictions.items()}


def judge(baseline: dict[str, WindowScores], candidate: dict[str, WindowScores], margin: float, aggregate: str,
          against: str = "the plain cut", unpruned: dict[str, list[float]] | None = None) -> Verdict:
    """Do no harm: `candidate` is better than `baseline` (`against`, in words) only where its KL from the
    unpruned model is lower beyond `margin` paired standard errors (`lower_kl`) and no source's loss
    rises beyond as many (`raised_loss`; above the `unpruned` model's too, where given): the KL and the
    loss can disagree, and a user sees the loss."""
    lower, gains = lower_kl(baseline, candidate, margin, aggregate)
    raised, rises = raised_loss(baseline, candidate, margin, unpruned)
    kl_words = (f"KL from the unpruned model lower than {against}'s by {gains}: "
                f"{'beyond' if lower else 'not beyond'} {margin:g} standard errors")
    if not lower:
        return Verdict(False, "kl", kl_words)
    loss_words = f"loss minus {against}'s {rises}"
    if raised:
        return Verdict(False, "loss", f"{kl_words}; but its loss is higher beyond {margin:g} standard errors on "
                                      f"{', '.join(raised)} ({loss_words})")
    return Verdict(True, "kl and loss", f"{kl_words}, and no source's loss higher beyond them ({loss_words})")
