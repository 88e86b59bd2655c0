"""Running the sweep: every (strategy, drop count, healed) point, each appended when done."""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from depthcut.errors import DepthcutError
from depthcut.evaluation import evaluate
from depthcut.healing.trainer import heal
from depthcut.io.atomic import atomic_output_dir
from depthcut.io.model_folder import parameter_count
from depthcut.model.layers import find_layer_stack
from depthcut.model.surgery import prune
from depthcut.repair import check_repair
from depthcut.repair import repair as repair_model
from depthcut.strategies import STRATEGIES, select
from depthcut.sweep.progress import SweepProgress
from depthcut.sweep.results import ResultsLog, healing_name, point_key

logger = logging.getLogger(__name__)


def parse_drops(drop: str | None, fractions: str | None, num_layers: int) -> list[int]:
    """`--drop 0,2,4` or `--fractions 0:0.6:0.1` (start:stop:step, stop included) -> sorted counts."""
    if (drop is None) == (fractions is None):
        raise DepthcutError("give either --drop N,N,... or --fractions START:STOP:STEP")
    try:
        if drop is not None:
            counts = [int(x) for x in drop.split(",") if x.strip()]
        else:
            start, stop, step = (float(x) for x in fractions.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            steps = int(round((stop - start) / step)) + 1
            counts = [round((start + i * step) * num_layers) for i in range(steps) if start + i * step <= stop + 1e-9]
    except ValueError:
        raise DepthcutError("malformed --drop or --fractions: use 0,2,4 or 0:0.6:0.1") from None
    bad = [n for n in counts if not 0 <= n < num_layers]
    if bad:
        raise DepthcutError(f"drop counts {bad} are out of range for a model of {num_layers} layers (0..{num_layers - 1})")
    return sorted(set(counts))


@dataclass
class SweepPlan:
    """Every point: (strategy, drop count, healed, repair). Training-free repairs ("none" is plain
    pruning) are a dimension beside strategy and healing: `repair + healed` is a repair followed
    by a heal. `healed` holds False (no heal) and the heals to run: True, or heal objectives
    ("lm" for LoRA on the next-token loss, "kd" for distillation from the unpruned model).
    `heal_after`, when given, names the repairs that are followed by heals (default: every one)."""

    drops: list[int]
    strategies: list[str]
    healed: list[bool | str]
    repairs: list[str] = field(default_factory=lambda: ["none"])
    heal_after: list[str] | None = None
    points: list[tuple[str, int, bool | str, str]] = field(default_factory=list)

    def __post_init__(self):
        # drop 0 is the unpruned model, shared by every strategy; it is never healed nor repaired.
        self.points = [("none", 0, False, "none")] if 0 in self.drops else []
        self.points += [(s, n, h, r) for n in self.drops if n for s in self.strategies for r in self.repairs
                        for h in self.healed if not h or self.heal_after is None or r in self.heal_after]


FORWARD_BATCH, FORWARD_LENGTH, FORWARD_WARMUP, FORWARD_REPEATS = 1, 128, 1, 7


@torch.inference_mode()
def forward_timing(model, batch: int = FORWARD_BATCH, length: int = FORWARD_LENGTH, warmup: int = FORWARD_WARMUP,
                   repeats: int = FORWARD_REPEATS) -> dict:
    """Seconds of one forward pass over a fixed random batch, timed `repeats` times after `warmup`
    untimed passes: the median, quartiles and extremes, a relative speed figure with its spread."""
    if repeats < 5:
        raise DepthcutError("forward timing needs at least 5 repeats for a median and a spread")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA kernels run asynchronously
    for _ in range(warmup):
        model(input_ids=ids, use_cache=False)
    sync()
    gc.collect()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sync()
        times.append(time.perf_counter() - start)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(times), "max": max(times), "repeats": repeats,
            "warmup": warmup, "batch": batch, "length": length}


def _measure(model, tokenizer, evaluation: dict) -> dict:
    result = evaluate(model, tokenizer, **evaluation) if (evaluation["tasks"] or evaluation["loss_data"]) else {}
    tasks = {name: {k: v for k, v in summary.items() if k != "subjects"} for name, summary in result.get("tasks", {}).items()}
    timing = forward_timing(model)
    # inference_seconds (the median) stays for readers of older results; forward_seconds has the spread.
    return {"loss": result.get("loss"), "tasks": tasks, "parameters": parameter_count(model),
            "inference_seconds": timing["median"], "forward_seconds": timing}


def run_sweep(model, tokenizer, out: Path, plan: SweepPlan, settings: dict, evaluation: dict, *, analysis=None,
              heal_recipe=None, heal_data=None, repair_data=None, keep_models: bool = False, seed: int = 0,
              layer_path: str | None = None, progress: bool = True, announce: bool = True) -> ResultsLog:
    """Evaluate every point of `plan` not already in `out/results.jsonl`, appending each at once.

    `repair_data` (a `CalibrationSet`) is what the training-free repairs are fitted on, with the
    unpruned model's activations. `layer_path` names the decoder layer list where it cannot be found
    (every step takes it: the repairs, the cut, the heal's targets). `progress` draws the bars of each
    step; `announce` prints a line per stage with the point's number and the time left (see `SweepProgress`).
    """
    num_layers = len(find_layer_stack(model, layer_path))

    def removed_by(strategy: str, drop: int) -> list[int]:
        if drop == 0:
            return []
        return select(strategy, drop, num_layers, analysis if STRATEGIES.get(strategy).needs_analysis else None, seed)

    _check_repairs(model, [(removed_by(s, n), r) for s, n, _, r in plan.points if n and r != "none"], layer_path)
    log = ResultsLog(out)
    log.start(settings)
    if analysis is not None and log.analysis() is None:
        log.append({"type": "analysis", "analysis": analysis.to_dict()})
    done = log.points()
    pending = [point for point in plan.points if point_key(*point) not in done]
    if len(pending) < len(plan.points):
        logger.info("sweep: %d of %d points already in %s", len(plan.points) - len(pending), len(plan.points), log.path)
    tracker = SweepProgress(pending, enabled=announce)
    for strategy, drop, healed, repair in pending:
        key = point_key(strategy, drop, healed, repair)
        tracker.start_point(key)
        began = time.perf_counter()
        removed = removed_by(strategy, drop)
        working = copy.deepcopy(model)  # `model` stays the unpruned base
        fit = _repair(working, repair, removed, repair_data, layer_path, tracker)
        if removed:
            tracker.stage(f"pruning layers {_span(removed)}")
            prune(working, removed, layer_path)
        record = {"type": "point", "key": key, "strategy": strategy, "drop": drop, "fraction": drop / num_layers,
                  "healed": bool(healed), "removed_layers": removed, "num_layers": num_layers}
        if fit is not None:
            record.update(repair=repair, repair_fit=fit)
        if healed:
            working, record["heal"] = _heal(working, model, tokenizer, heal_data, heal_recipe, healed, layer_path,
                                            tracker, progress)
        tracker.stage("measuring: " + ", ".join(filter(None, [
            "held-out loss" if evaluation.get("loss_data") else "", *evaluation.get("tasks", [])])))
        record.update(_measure(working, tokenizer, evaluation))
        record["seconds"] = time.perf_counter() - began
        if keep_models:  # whole or not at all, like every output; a rerun of the point replaces it
            with atomic_output_dir(out / "models" / key.replace("/", "-"), force=True) as staging:
                working.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
        log.append(record)
        done[key] = record
        del working
        tracker.finish_point(key)
    return log


def _check_repairs(model, cuts: list[tuple[list[int], str]], layer_path: str | None) -> None:
    """A repair that cannot be folded for one of the sweep's cuts stops the sweep before its first
    point, saying which (a sweep that fails hours in helps nobody)."""
    if not cuts:
        return

    for removed, method in cuts:
        try:
            check_repair(model, removed, method, layer_path)
        except DepthcutError as refusal:
            raise DepthcutError(f"--repair {method} cannot repair the cut of layers {_span(removed)}: {refusal}; "
                                f"leave {method} out of --repair") from None


def _repair(working, method: str, removed: list[int], calibration, layer_path: str | None, tracker) -> dict | None:
    """Fit `method` on the unpruned `working` model and fold it in (before the layers go)."""
    if method == "none" or not removed:
        return None

    tracker.stage(f"repairing the cut: {method}")
    began = time.perf_counter()
    fit = repair_model(working, None, calibration, removed, method, layer_path=layer_path)
    return {**fit.as_dict(), "seconds": time.perf_counter() - began}


def _heal(working, unpruned, tokenizer, data, recipe, healed: bool | str, layer_path: str | None, tracker,
          progress: bool):
    """Heal the pruned `working` model with LoRA under `healed`'s objective; distillation takes the
    unpruned model (the sweep's base, already in memory) as its teacher. Returns the healed model
    and what the point records of the heal."""

    recipe = dataclasses.replace(recipe, objective=healing_name(healed))
    teacher = unpruned if recipe.distils else None
    what = "LoRA steps" if teacher is None else f"LoRA steps distilling from the unpruned model ({recipe.objective})"
    tracker.stage(f"healing: {recipe.total_steps()} {what}")
    result = heal(working, tokenizer, data, recipe, layer_path=layer_path, teacher=teacher, progress=progress)
    record = {"objective": recipe.objective, "loss_before": result.loss_before["loss"],
              "loss_after": result.loss_after["loss"], "tokens": result.tokens, "seconds": result.seconds}
    if teacher is not None:
        record.update(kl_before=result.kl_before, kl_after=result.kl_after)
    return result.model, record


def _span(layers: list[int]) -> str:
    """[21, 22, 23] -> "[21, 24)" (half-open, as everywhere); other lists as they are."""
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"[{layers[0]}, {layers[-1] + 1})"
    return str(layers)


def strategies_needing_analysis(strategies: Sequence[str]) -> bool:
    return any(STRATEGIES.get(s).needs_analysis for s in strategies)
