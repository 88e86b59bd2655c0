"""Judging a training-free repair on the model's output, on text no fit saw: the validation windows
(per source; the --data corpus contributes only its held-out documents), and the rule that a repair
counts as better than the plain cut only where its KL divergence from the unpruned model is lower
by more than `margin` standard errors of the paired difference over windows (do no harm)."""

from __future__ import annotations

import copy

from depthcut.analysis.calibration import CalibrationSet, build_calibration
from depthcut.evaluation.divergence import (
    ReferencePredictions,
    WindowScores,
    paired_difference,
    reference_predictions,
    window_scores,
)
from depthcut.io.data import TextSource, load_texts
from depthcut.model.surgery import remove_layers
from depthcut.pipeline.configs import ValidationOptions


def validation_sets(options: ValidationOptions, tokenizer, held_out: TextSource) -> dict[str, CalibrationSet]:
    """Validation windows per source; the --data corpus gives only its held-out documents (`held_out`)."""
    sets = {}
    for name in options.validation_sources():
        source = held_out if name == (options.data or "c4") else load_texts(name, options.text_field)
        sets[name] = build_calibration(tokenizer, source, options.validation_windows, options.seq_len, "windows",
                                       options.seed + 1, allow_fewer=True)
    return sets


def references(model, sets: dict[str, CalibrationSet], batch_size: int) -> dict[str, ReferencePredictions]:
    """The unpruned model's predictions on every validation set, computed once."""
    return {name: reference_predictions(model, windows, batch_size) for name, windows in sets.items()}


def scores_after_cut(model, layers: list[int], reference: dict[str, ReferencePredictions], batch_size: int,
                     layer_path: str | None = None, allow_unknown_config=(), in_place: bool = False
                     ) -> dict[str, WindowScores]:
    """Validation scores of `model` less `layers`: cut in place with `in_place`, else on a copy (and
    `model` keeps every layer)."""
    trial = model if in_place else copy.deepcopy(model)
    remove_layers(trial, layers, layer_path, allow_unknown_config)
    return {name: window_scores(trial, predictions, batch_size) for name, predictions in reference.items()}


def beats_plain(plain: dict[str, WindowScores], repaired: dict[str, WindowScores], margin: float,
                aggregate: str) -> tuple[bool, str]:
    """(whether the repaired cut beats the plain one beyond the noise, the reason in words): on every
    source (`aggregate` "worst") or on the mean over sources ("mean")."""
    gains = {name: paired_difference(plain[name].kl, repaired[name].kl) for name in repaired}
    if aggregate == "worst":
        beats = all(gain > margin * stderr for gain, stderr in gains.values())
    else:
        gain = sum(g for g, _ in gains.values()) / len(gains)
        beats = gain > margin * sum(s * s for _, s in gains.values()) ** 0.5 / len(gains)
    details = ", ".join(f"{name}: {gain:+.4f} ± {stderr:.4f}" for name, (gain, stderr) in gains.items())
    verdict = "beyond" if beats else "not beyond"
    return beats, (f"KL from the unpruned model lower than the plain cut's by {details}: {verdict} {margin:g} "
                   "standard errors")
