"""What `depthcut shrink` does around its choice: fit the choice into `--budget`, heal the winner
(kept only where it beats the unhealed winner on validation, as a repair must beat the plain cut),
and evaluate what was written against the unpruned model (`--tasks`)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import resource
import time
from pathlib import Path

from depthcut.evaluation.divergence import window_scores
from depthcut.healing.trainer import heal
from depthcut.io.model_folder import parameter_count
from depthcut.model.surgery import remove_layers
from depthcut.pipeline.configs import EvalConfig, ShrinkConfig
from depthcut.pipeline.evaluate import evaluate_with
from depthcut.pipeline.validation import judge, unpruned_losses
from depthcut.selection.fits import fold

log = logging.getLogger(__name__)

# The fewest validation windows per source a budget may leave: fewer give standard errors too wide for
# the do-no-harm rule to keep anything.
FEWEST_WINDOWS = 8


@dataclasses.dataclass
class Plan:
    """How many candidate blocks and validation windows fit the budget, and why."""

    candidates: int
    validation_windows: int
    why: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_for_budget(config: ShrinkConfig, analysis_seconds: float, analysis_windows: int, sources: int,
                    repairs_per_candidate: int, seconds_spent: float, sums_gathered: bool = False) -> Plan:
    """The most candidates (then validation windows) whose cost, extrapolated from the analysis pass's
    seconds per window, fits in what is left of `config.budget` minutes.

    Cost model, in window forwards of `1.5 x analysis_seconds / analysis_windows` (the pass stops before
    the head, so this errs low; a factor 1.5 covers the head and the KL): the references, every
    validation window once; the fits, one pass over the calibration windows (none where the analysis
    pass gathered the sums, `sums_gathered`) and a quarter as many held out; every option, every
    window (with screening: every option its screening windows, the finalists' options the rest). A
    candidate started from the kept stream costs less: this errs high."""
    per_window = 1.5 * analysis_seconds / max(1, analysis_windows)
    fit_windows = (0.25 if sums_gathered else 1.25) * analysis_windows
    left = config.budget * 60 - seconds_spent
    windows = config.validation_windows

    def cost(candidates: int, windows: int) -> float:
        screen = config.screen_windows
        if 0 < screen < windows and candidates > config.finalists:
            scored = repairs_per_candidate * (candidates * screen + config.finalists * (windows - screen))
        else:
            scored = repairs_per_candidate * candidates * windows
        return per_window * (sources * (windows + scored) + fit_windows)

    most = config.candidates + 2  # the angular ones, the deepest block, Block Influence's
    for candidates in range(most, 0, -1):
        if cost(candidates, windows) <= left:
            return Plan(candidates, windows, f"{candidates} of {most} candidates x {windows} windows fit in about "
                                             f"{cost(candidates, windows) / 60:.1f} of {left / 60:.1f} minutes left")
    fitting = int((left / per_window - fit_windows) / (sources * (repairs_per_candidate + 1)))
    windows = max(FEWEST_WINDOWS, min(windows, fitting))
    return Plan(1, windows, f"even one candidate at {config.validation_windows} windows overruns the "
                            f"{left / 60:.1f} minutes left: 1 candidate x {windows} windows (about "
                            f"{cost(1, windows) / 60:.1f} minutes)")


@dataclasses.dataclass
class Healed:
    """The healed winner: its validation scores, whether the rule keeps it, and what to write."""

    scores: dict
    kept: bool
    why: str
    decided_by: str  # `Verdict.decided_by`
    seconds: float
    model: object
    rewrite: object
    parameters_before: int
    heal: dict


def heal_winner(model, tokenizer, winner, fit, training, predictions, config: ShrinkConfig) -> Healed:
    """Cut a copy of `model` as `winner` says (with its repair `fit`), heal it with LoRA on `training`
    (documents no validation window comes from), and judge it against the unhealed winner's scores."""
    started = time.perf_counter()
    trial = copy.deepcopy(model)
    before = parameter_count(trial)
    fold(trial, fit, config.layer_path)
    rewrite = remove_layers(trial, winner.layers, config.layer_path, config.allow_unknown_config)
    recipe = config.recipe()
    log.info("shrink: healing the winner with %d LoRA steps (%s) ...", recipe.steps, recipe.objective)
    teacher = model if recipe.objective != "lm" else None
    result = heal(trial, tokenizer, training, recipe, layer_path=config.layer_path, progress=not config.quiet,
                  teacher=teacher)
    healed = result.model
    scores = {name: window_scores(healed, reference, config.batch_size) for name, reference in predictions.items()}
    verdict = judge(winner.scores, scores, config.margin, config.aggregate, against="the unhealed winner",
                    unpruned=unpruned_losses(predictions))
    kept, why = verdict.better, verdict.why + (": kept" if verdict.better else ": the unhealed winner is kept")
    record = {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
              "objective": recipe.objective, "rank": recipe.rank, "lr": recipe.lr, "seq_len": recipe.seq_len,
              "batch_size": recipe.batch_size, "warmup_steps": recipe.warmup_steps,
              "training_data": training.description,
              "heldout_loss_before": result.loss_before["loss"], "heldout_loss_after": result.loss_after["loss"]}
    return Healed(scores, kept, why, verdict.decided_by, time.perf_counter() - started, healed, rewrite, before,
                  record)


def evaluate_winner(config: ShrinkConfig) -> dict:
    """`depthcut eval OUT --baseline MODEL --tasks ...` on what shrink wrote, saved as OUT/eval.json."""
    evaluation = EvalConfig(model=config.out, baseline=config.model, tasks=config.tasks,
                            out=str(Path(config.out) / "eval.json"), limit=config.limit, seed=config.seed,
                            dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code,
                            quiet=config.quiet)
    log.info("shrink: evaluating the winner against %s on %s ...", config.model, ", ".join(config.tasks))
    return evaluate_with(evaluation)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{math.ceil(seconds)} s"


def peak_memory_bytes() -> int:
    """The most resident memory this process has held so far (Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
