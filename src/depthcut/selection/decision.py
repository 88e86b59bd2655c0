"""The options of `depthcut shrink` (a candidate cut, plain or with one repair) and their scoring on the
validation windows: the screening (every option but the deferred ones on the first windows, the
finalist blocks on them all) and the refinements (cosine, fitted only where the lstsq map it refines
beats the plain cut and is not beaten beyond the margin by the leading option)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from depthcut.errors import DepthcutError
from depthcut.pipeline.configs import ShrinkConfig
from depthcut.pipeline.shrink_steps import minutes
from depthcut.pipeline.validation import Verdict, judge, lower_kl, scores_after_cut, unpruned_losses
from depthcut.repair import REPAIRS
from depthcut.selection.decision_table import contiguous, span
from depthcut.selection.fits import ROWS_KEPT_BY, changed_from, folded

log = logging.getLogger(__name__)


@dataclass
class Option:
    """One row of the decision table: a cut, with or without a repair, and how it scored."""

    layers: list[int]
    found_by: str
    repair: str
    scores: dict = field(default_factory=dict)  # validation source -> WindowScores
    refused: str | None = None
    # left out of the choice before every window: screened out (scored on its first windows only), or a
    # refinement not fitted because the repair it refines did not beat the plain cut
    screened: bool = False
    screening: dict = field(default_factory=dict)  # validation source -> WindowScores on the screening windows
    kept: bool = False
    why: str = ""
    decided_by: str = ""  # which criterion of the do-no-harm rule decided (`Verdict.decided_by`); "" for none
    seconds: float = 0.0
    # the repair's fit (a list of fits, one per gap, for a scattered cut): healed and written as scored
    fit: object = field(default=None, repr=False)

    def score(self, aggregate: str) -> float:
        means = [s.summary()["kl"] for s in self.scores.values()]
        return max(means) if aggregate == "worst" else sum(means) / len(means)

    def row(self, aggregate: str = "worst") -> dict:
        score = self.score(aggregate) if self.scores else None
        return {"layers": self.layers, "found_by": self.found_by, "repair": self.repair, "refused": self.refused,
                "score": score,
                "screened": self.screened, "kept": self.kept, "why": self.why, "decided_by": self.decided_by,
                "seconds": round(self.seconds, 2),
                "validation": {name: s.summary() for name, s in self.scores.items()},
                **({"screening": {name: s.summary() for name, s in self.screening.items()}} if self.screening else {})}


class MemoryScorer:
    """Scores options one after another on the model in memory (each cut and repaired for its scoring
    only), against references computed before (`validation.references`)."""

    def __init__(self, model, predictions: dict, config: ShrinkConfig):
        self.model, self.predictions, self.config = model, predictions, config

    def windows(self) -> int:
        return min(len(reference) for reference in self.predictions.values())

    def score(self, options: list[Option], fits, part: tuple[int, int] | None, phase: str) -> None:
        """Score `options` on windows [start, stop) of every source (`part`; None: all), added to what each
        scored already."""
        predictions = self.predictions if part is None else {
            name: reference.subset(*part) for name, reference in self.predictions.items()}
        _score(self.model, options, fits, predictions, self.config, phase)

    def unpruned_losses(self) -> dict[str, list[float]]:
        return unpruned_losses(self.predictions)


def scored_options(scorer, fits, candidates, repairs, config, seconds: dict) -> list[Option]:
    """Every candidate, plain and with each repair, scored on the validation windows by `scorer`
    (`MemoryScorer`, or the layer-major one of `layer_major`) with the repairs of `fits` (`BlockFits`).

    Screening (`--screen-windows` below the windows per source, more candidate blocks than
    `--finalists`): every option but the costly cosine fit is scored on the first windows of each
    source; the finalists, the blocks whose best option scored lowest there, are then scored on the
    rest (the scores concatenated: the same windows as without screening). The other blocks stay in
    the table with their screening scores, out of the choice. A repair that refines another (cosine
    starts from lstsq's map) is fitted last, and only where the one it refines beats the plain cut of
    its block and is not beaten beyond the margin by the leading option (`refinements`). `seconds`
    gains the time each step took."""
    options = [Option(layers, found_by, method) for layers, found_by in candidates for method in repairs]
    for option in options:  # refusals are known before any scoring: said as such, screened or not
        refusal = fits.refused.get(tuple(option.layers), {}).get(option.repair)
        if refusal is not None:
            option.refused = str(refusal)
    screen = config.screen_windows
    windows = scorer.windows()
    screening = 0 < screen < windows and len(candidates) > config.finalists
    first_fits = [o for o in options if not _deferred(o.repair)]
    if not screening:
        started = time.perf_counter()
        scorer.score(first_fits, fits, None, "scoring")
        _score_refinements(scorer, options, fits, config)
        seconds["scoring"] = time.perf_counter() - started
        return options
    started = time.perf_counter()
    scorer.score(first_fits, fits, (0, screen), "screening")
    for option in options:
        option.screening = dict(option.scores)
    seconds["screening"] = time.perf_counter() - started
    started = time.perf_counter()
    best: dict[tuple, float] = {}  # block -> the lowest screening score of its options
    for option in options:
        if option.scores:
            block = tuple(option.layers)
            best[block] = min(best.get(block, math.inf), option.score(config.aggregate))
    if not best:  # every option refused: nothing to choose between
        return options
    ranked = sorted(best, key=best.get)
    finalists = set(ranked[: config.finalists])
    cutoff = max(best[block] for block in finalists)
    for option in options:
        if tuple(option.layers) not in finalists and not option.refused:
            option.screened = True
            option.why = (f"screened out on {screen} window(s) per source: best KL of its block "
                          f"{best[tuple(option.layers)]:.4f}, the finalists' at most {cutoff:.4f}"
                          if option.scores else "not fitted: its block was screened out")
    chosen = [o for o in options if tuple(o.layers) in finalists]
    # the screening scored the first windows: the finalists' options the rest
    scorer.score([o for o in chosen if o.scores], fits, (screen, windows), "finalists")
    _score_refinements(scorer, chosen, fits, config)
    seconds["finalists"] = time.perf_counter() - started
    return options


def _refines(method: str) -> str | None:
    return None if method == "none" else REPAIRS.get(method).refines


def _deferred(method: str) -> bool:
    """Fitted after the others: a repair on token rows (their pass is made only for the blocks that need
    it), or one that refines another repair's fit."""
    return method in ROWS_KEPT_BY or _refines(method) is not None


def refinements(options: list[Option], config: ShrinkConfig, unpruned: dict | None = None) -> list[Option]:
    """The deferred options still to fit (`_deferred`); one that refines another repair (cosine: lstsq's
    map) only where that repair's option is kept, beating the plain cut of its block, and is not itself
    beaten beyond the margin by the leading option (`_leader`): the refinement starts from its map and
    moves little, so it could not win there, and each fit costs about two analysis passes. The others
    are left out, with why. Where the refined repair was not tried, the refinement is fitted as it is."""
    by_key = {(tuple(o.layers), o.repair): o for o in options}
    leader = _leader(options, config, unpruned)
    to_fit = []
    for option in options:
        if not _deferred(option.repair) or option.refused or option.screened or option.scores:
            continue
        refined = _refines(option.repair)
        base = by_key.get((tuple(option.layers), refined))
        plain = by_key.get((tuple(option.layers), "none"))
        if base is None or base.refused or not base.scores or plain is None or not plain.scores:
            to_fit.append(option)
            continue
        beats = judge(plain.scores, base.scores, config.margin, config.aggregate, unpruned=unpruned).better
        # the leader's KL alone: the refinement ranks by its KL, and would not reach the leader's
        behind, why = (False, "") if leader in (None, base) else lower_kl(base.scores, leader.scores, config.margin,
                                                                         config.aggregate)
        if beats and not behind:
            to_fit.append(option)
            continue
        option.screened = True
        if not beats:
            option.why = (f"not fitted: it refines {refined}'s map, which did not beat the plain cut of its block "
                          "(it starts from that map and moves little)")
        else:
            option.why = (f"not fitted: it refines {refined}'s map on this block, which the leading option (layers "
                          f"{span(leader.layers)}, {leader.repair}) beats: its KL lower by {why} (it starts from "
                          "that map and moves little)")
    return to_fit


def plain_cuts(options: list[Option]) -> dict[tuple, Option]:
    """{block: its plain cut}, for the plain cuts that were scored."""
    return {tuple(o.layers): o for o in options if o.repair == "none" and o.scores and not o.refused}


def best_block(plain: dict[tuple, Option], config: ShrinkConfig) -> Option | None:
    """The plain contiguous cut of lowest validation score: what a scattered cut has to beat."""
    blocks = [o for layers, o in plain.items() if contiguous(list(layers)) and not o.screened]  # scored on every window
    return min(blocks, key=lambda o: o.score(config.aggregate), default=None)


def may_keep(option: Option, plain: dict[tuple, Option], config: ShrinkConfig, unpruned: dict | None = None
             ) -> Verdict:
    """Whether the choice may keep `option` (do no harm, `judge`: a lower KL beyond the margin and no
    source's loss higher beyond it): a repair only where it beats the plain cut of its block (`plain`,
    from `plain_cuts`); a cut that is not one block only where it beats the best plain block too. The
    plain contiguous cuts always."""
    if option.repair != "none":
        block = plain.get(tuple(option.layers))
        if block is None:
            return Verdict(False, "", "the plain cut of its block was not scored")
        verdict = judge(block.scores, option.scores, config.margin, config.aggregate, unpruned=unpruned)
        if not verdict.better:
            return verdict
    if contiguous(option.layers):
        return verdict if option.repair != "none" else Verdict(True, "", "the plain cut")
    best = best_block(plain, config)
    if best is None:
        return Verdict(True, "", "no plain block was scored to compare with")
    versus = judge(best.scores, option.scores, config.margin, config.aggregate,
                   against=f"the best plain block {span(best.layers)}", unpruned=unpruned)
    if option.repair != "none" and versus.better:
        return Verdict(True, versus.decided_by, f"{verdict.why}; {versus.why}")
    return versus


def standing(options: list[Option], winner: Option, config: ShrinkConfig) -> dict | None:
    """How far the winner is ahead of the runner-up (the kept option of next lowest score): whether its KL
    is lower beyond the margin (`lower_kl`), or the two are level within the noise. None: no runner-up."""
    others = [o for o in options if o.kept and o is not winner]
    runner = min(others, key=lambda o: o.score(config.aggregate), default=None)
    if runner is None:
        return None
    ahead, gains = lower_kl(runner.scores, winner.scores, config.margin, config.aggregate)
    return {"layers": runner.layers, "found_by": runner.found_by, "repair": runner.repair,
            "score": runner.score(config.aggregate), "level": not ahead,
            "why": f"the winner's KL lower by {gains}: {'beyond' if ahead else 'not beyond'} {config.margin:g} "
                   "standard errors"}


def _leader(options: list[Option], config: ShrinkConfig, unpruned: dict | None = None) -> Option | None:
    """The option of lowest validation score among those the choice may keep (`may_keep`, as `_decide`
    will judge them), the refinements not yet fitted aside."""
    plain = plain_cuts(options)
    eligible = [o for o in options if o.scores and not (o.refused or o.screened or _deferred(o.repair))
                and may_keep(o, plain, config, unpruned).better]
    return min(eligible, key=lambda o: o.score(config.aggregate), default=None)


def _score_refinements(scorer, options: list[Option], fits, config: ShrinkConfig) -> None:
    """Fit and score `refinements(options)` on every window (token rows gathered for them first)."""
    to_fit = refinements(options, config, scorer.unpruned_losses())
    if not to_fit:
        return
    fits.gather_rows(list({tuple(o.layers): o.layers for o in to_fit}.values()))
    scorer.score(to_fit, fits, None, "refinements")


def _score(model, options: list[Option], fits, predictions, config: ShrinkConfig, phase: str) -> None:
    """Score each option on `predictions`' windows (added to what it scored already), fitting its repair
    on first use; a repair that refuses the cut marks the option refused."""
    started = time.perf_counter()
    cut = {"layer_path": config.layer_path, "allow_unknown_config": config.allow_unknown_config}
    options = [option for option in options if not option.refused]  # refused before any scoring
    for done, option in enumerate(options):
        left = (time.perf_counter() - started) / done * (len(options) - done) if done else None
        log.info("shrink: %s %d of %d, layers %s, repair %s%s ...", phase, done + 1, len(options),
                 span(option.layers), option.repair, f" (about {minutes(left)} left)" if left is not None else "")
        option_started = time.perf_counter()
        try:
            if option.repair == "none":
                scores = scores_after_cut(model, option.layers, predictions, config.batch_size, **cut)
            else:
                option.fit = fits.get(option.layers, option.repair)
                start = changed_from(model, option.fit, config.layer_path)
                with folded(model, option.fit, config.layer_path):  # no copy of the model
                    scores = scores_after_cut(model, option.layers, predictions, config.batch_size, **cut,
                                              changed_from=start)
        except DepthcutError as error:
            option.refused, option.fit = str(error), None
            continue
        option.scores = {name: option.scores[name] + value if name in option.scores else value
                         for name, value in scores.items()}
        option.seconds += time.perf_counter() - option_started
