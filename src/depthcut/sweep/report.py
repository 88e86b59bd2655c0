"""`report.html`: one self-contained page (figures embedded) answering "how many layers can go?".

The answer counts an accuracy drop only where it is larger than both the tolerance and the noise of
the subset the tasks were scored on (see `judge`; the page states the rule, templates/report.html.j2),
and says so where the subset is too small to tell a tolerance-sized drop from noise. It leads with one
sentence a task (`headline`): the answer with its error bars, or what to run to get one. Loss is the held-out
loss in nats per token everywhere, as the terminal prints it."""

from __future__ import annotations

import base64
import math
import shlex
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from depthcut.errors import DepthcutError
from depthcut.io.atomic import atomic_output_dir, atomic_output_file
from depthcut.sweep.figures import figure_captions, make_figures
from depthcut.sweep.results import (
    ResultsLog,
    configuration,
    configuration_name,
    finite,
    forward_ms,
    point_healing,
    task_accuracy,
)

REPORT_FILE = "report.html"
# report.html is rendered from a jinja2 template, every value escaped (templates/report.html.j2)
_TEMPLATES = Environment(loader=PackageLoader("depthcut.sweep", "templates"), autoescape=select_autoescape(["j2"]),
                         undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
# One loss scale everywhere (tables, figures, the terminal): the held-out loss in nats per token.
LOSS_HEADER = "held-out loss (nats/token)"
NOISE_Z = 2.0  # a drop is told from noise when it exceeds this many combined standard errors

def check_tolerance(tolerance) -> float:
    """The relative accuracy loss accepted: a fraction strictly between 0 and 1."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise DepthcutError(f"tolerance must be a fraction between 0 and 1 (e.g. 0.05 for 5%), got {tolerance!r}")
    return float(tolerance)


def judge(drop: float, noise: float | None, margin: float, z: float = NOISE_Z) -> str:
    """'lost', 'kept' or 'unclear' for an accuracy drop with its combined standard error (the rule that
    templates/report.html.j2 states)."""
    if noise is None:
        return "unclear"  # no standard error recorded (fewer than 2 items): nothing can be told
    if drop > margin and drop > z * noise:
        return "lost"
    return "kept" if z * noise <= margin else "unclear"


def items_needed(accuracy: float, margin: float, z: float = NOISE_Z) -> int | None:
    """Items a point for z combined standard errors (two equal ones) to fit within `margin`."""
    if margin <= 0:
        return None
    needed = 2 * z * z * accuracy * (1 - accuracy) / (margin * margin)
    step = 100 if needed >= 1000 else 10
    return max(step, math.ceil(needed / step) * step)


def tolerable_fraction(points: list[dict], task: str, tolerance: float, z: float = NOISE_Z) -> dict:
    """Per (strategy, healed): the largest fraction up to which every point is judged kept (the rule),
    what ended the curve, and the best of these over all configurations with how sure it is:
    `verdict` is 'shown', 'at least', 'cannot tell' or 'no pruned points'."""
    check_tolerance(tolerance)
    base = next((p for p in points if p["drop"] == 0 and task in p.get("tasks", {})), None)
    if base is None:
        return {}
    baseline, baseline_stderr, items = task_accuracy(base, task)
    margin = tolerance * baseline
    comparison_noise = None if baseline_stderr is None else math.sqrt(2) * baseline_stderr
    answer = {"baseline": baseline, "baseline_stderr": baseline_stderr, "items": items, "margin": margin,
              "floor": baseline - margin, "comparison_noise": comparison_noise,
              "resolvable": comparison_noise is not None and z * comparison_noise <= margin,
              "items_needed": items_needed(baseline, margin, z), "points": {}, "by_configuration": {}, "ended_by": {}}
    for key in sorted({configuration(p) for p in points if p["drop"]}):
        name = configuration_name(*key)
        curve = []
        for p in sorted((p for p in points if p["drop"] and configuration(p) == key and task in p.get("tasks", {})),
                        key=lambda p: p["fraction"]):
            accuracy, stderr, count = task_accuracy(p, task)
            if accuracy is None:
                continue
            noise = None if stderr is None or baseline_stderr is None else math.hypot(baseline_stderr, stderr)
            drop = baseline - accuracy
            curve.append({"fraction": p["fraction"], "accuracy": accuracy, "stderr": stderr, "items": count,
                          "drop": drop, "noise": noise, "verdict": judge(drop, noise, margin, z)})
        if not curve:
            continue
        largest, ended = 0.0, None
        for entry in curve:
            if entry["verdict"] != "kept":
                ended = (entry["verdict"], entry["fraction"])
                break
            largest = entry["fraction"]
        answer["points"][name], answer["by_configuration"][name], answer["ended_by"][name] = curve, largest, ended
    best = max(answer["by_configuration"].items(), key=lambda kv: kv[1], default=(None, None))
    answer["best_configuration"], answer["best_fraction"] = best
    noisy = sorted(name for name, ended in answer["ended_by"].items() if ended and ended[0] == "unclear")
    answer["cut_short_by_noise"] = noisy
    if best[0] is None:
        answer["verdict"] = "no pruned points"
    elif not noisy:
        answer["verdict"] = "shown"
    else:
        answer["verdict"] = "at least" if best[1] > 0 else "cannot tell"
    return answer


def gap_closed(point: dict, plain: dict | None, base: dict | None) -> float | None:
    """The share of the pruning gap in held-out loss that a repaired or healed point closes:
    (loss of plain pruning - its loss) / (loss of plain pruning - loss of the unpruned model)."""
    def loss(p):
        return ((p or {}).get("loss") or {}).get("loss")

    pruned, unpruned, own = loss(plain), loss(base), loss(point)
    if None in (pruned, unpruned, own) or pruned - unpruned <= 0:
        return None
    return (pruned - own) / (pruned - unpruned)


def _methods_rows(points: list[dict], tasks: list[str]) -> list[list]:
    """One row per repaired or healed point beside plain pruning at the same depth and strategy."""
    base = next((p for p in points if p["drop"] == 0), None)
    rows = []
    for p in sorted((p for p in points if p["drop"]), key=lambda p: (p["strategy"], p["drop"], configuration(p))):
        plain = next((q for q in points if q["drop"] == p["drop"] and configuration(q) == (p["strategy"], "none", "")),
                     None)
        loss = p.get("loss") or {}
        seconds = (p.get("repair_fit") or {}).get("seconds", 0.0) + (p.get("heal") or {}).get("seconds", 0.0)
        row = [configuration_name(*configuration(p)), p["drop"], _percent(p["fraction"]),
               _pm(loss.get("loss"), loss.get("loss_stderr")), _percent(gap_closed(p, plain, base))
               if configuration(p)[1:] != ("none", "") else "-"]
        row += [_pm(*task_accuracy(p, t)[:2]) for t in tasks]
        rows.append(row + [f"{seconds:.1f}" if seconds else "-"])
    return rows


def _fmt(value, digits=4) -> str:
    return "-" if finite(value) is None else f"{value:.{digits}f}"


def _pm(value, error, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + ("" if finite(error) is None else f" ± {error:.{digits}f}")


def _percent(fraction) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _points_of_accuracy(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} points"


def _answer_cell(answer: dict) -> str:
    verdict, fraction = answer["verdict"], answer["best_fraction"]
    if verdict == "no pruned points":
        return "no pruned point"
    if verdict == "cannot tell":
        return "cannot tell (noise)"
    return ("at least " if verdict == "at least" else "") + _percent(fraction)


def _answer_sentences(task: str, answer: dict, tolerance: float) -> list[str]:
    """Plain words for what the subset can and cannot show."""
    sentences = []
    items = answer["items"]
    if not answer["resolvable"]:
        if answer["baseline_stderr"] is None:
            sentences.append(f"{task}: the unpruned accuracy has no standard error ({items or 'no'} items), so no "
                             "drop can be told from noise.")
        else:
            sentences.append(
                f"{task}: with {items:,} items a point, one standard error of the unpruned accuracy is "
                f"{_points_of_accuracy(answer['baseline_stderr'])}, so the noise of a comparison "
                f"(2 combined standard errors, {_points_of_accuracy(NOISE_Z * answer['comparison_noise'])}) is "
                f"larger than a {100 * tolerance:g}% drop ({_points_of_accuracy(answer['margin'])}): this subset "
                "cannot tell a drop of the tolerance from noise"
                + (f"; about {answer['items_needed']:,} items a point would (or a larger --tolerance)."
                   if answer["items_needed"] else "."))
    if answer["verdict"] == "cannot tell":
        sentences.append(f"{task}: no configuration is shown to stay within the tolerance at any fraction dropped; "
                         "the report gives no number rather than one the noise could have made.")
    elif answer["verdict"] == "at least":
        sentences.append(f"{task}: {_percent(answer['best_fraction'])} is shown ({answer['best_configuration']}); "
                         f"noise cut short {', '.join(answer['cut_short_by_noise'])}, which may allow more.")
    return sentences


def _layers_phrase(points: list[dict], fraction: float) -> str:
    """`8 of 30 layers` for the pruned points at `fraction`."""
    point = next(p for p in points if p["drop"] and p["fraction"] == fraction)
    return f"{point['drop']} of {round(point['drop'] / point['fraction'])} layers"


def _headline_point(answer: dict) -> tuple[str, dict] | None:
    """(configuration, point) a task's headline names: the deepest point shown kept (the answer); where none
    is, the most accurate point that noise left undecided (the one more items would settle); else (every
    curve lost at once) the most accurate point at the first fraction dropped."""
    curves = answer["points"]
    if answer["best_fraction"]:
        name = answer["best_configuration"]
        return name, next(e for e in curves[name] if e["fraction"] == answer["best_fraction"])
    undecided = [(name, e) for name, curve in curves.items() for e in curve
                 if ("unclear", e["fraction"]) == answer["ended_by"].get(name)]
    candidates = undecided or [(name, curve[0]) for name, curve in curves.items()]
    return max(candidates, key=lambda c: (-c[1]["fraction"], c[1]["accuracy"]), default=None)


def headline(points: list[dict], task: str, answer: dict, tolerance: float, folder: str = "FOLDER") -> str:
    """One sentence answering "how many layers can go?" for `task` (`answer`: `tolerable_fraction`'s), with
    the error bars of the accuracies it compares, and what to run where the subset cannot tell; `folder`:
    the sweep's, for the command that would rebuild the report."""
    unpruned = _pm(answer["baseline"], answer["baseline_stderr"])
    chosen = _headline_point(answer)
    if chosen is None:
        return (f"{task}: only the unpruned model was scored ({unpruned}); add depths with --drop to ask how many "
                "layers can go.")
    name, entry = chosen
    tol, layers = f"{100 * tolerance:g}%", _layers_phrase(points, entry["fraction"])
    change = entry["accuracy"] / answer["baseline"] - 1 if answer["baseline"] else None
    relative = "" if change is None else f"{100 * abs(change):.0f}% {'lower' if change < 0 else 'higher'}; "
    dropped = (f"Dropping {layers} ({name}) leaves {task} at {_pm(entry['accuracy'], entry['stderr'])} against "
               f"{unpruned} unpruned ({relative}± 1 standard error)")
    if entry["verdict"] == "kept":
        sentence = f"{dropped}: within the {tol} tolerance, on enough items ({entry['items']:,} a point) to tell."
        ended = answer["ended_by"][name]
        if ended and ended[0] == "lost":
            sentence += f" Dropping {_layers_phrase(points, ended[1])} loses it."
        if answer["verdict"] == "at least":
            sentence += f" Noise cut short {', '.join(answer['cut_short_by_noise'])}, which may allow more."
        return sentence
    if entry["verdict"] == "lost":
        return f"{dropped}: a drop beyond both the {tol} tolerance and the noise, so not even {layers} can go."
    if answer["items_needed"] is None or answer["comparison_noise"] is None:
        return f"{dropped}: the unpruned accuracy has no usable standard error, so no drop can be told from noise."
    resolvable = NOISE_Z * answer["comparison_noise"] / answer["baseline"]
    return (f"{dropped}: {entry['items']:,} items a point are too few to tell a {tol} drop from noise. To decide, "
            f"run with --limit {answer['items_needed']} (about {answer['items_needed']:,} items a point; a task "
            f"with fewer runs whole), or accept about a {math.ceil(100 * resolvable):.0f}% drop "
            f"(depthcut report {shlex.quote(folder)} --tolerance {math.ceil(100 * resolvable) / 100:g}).")


def loss_headline(points: list[dict]) -> str | None:
    """Where no task was scored: what the held-out loss says, and what to add for an answer."""
    def loss(p):
        return (p.get("loss") or {}).get("loss")

    base = next((p for p in points if p["drop"] == 0 and loss(p) is not None), None)
    pruned = [p for p in points if p["drop"] and loss(p) is not None]
    if base is None or not pruned:
        return None
    deepest = max(p["fraction"] for p in pruned)
    best = min((p for p in pruned if p["fraction"] == deepest), key=loss)
    return (f"No task was scored, so this report cannot say how many layers can go (add --tasks, e.g. arc_easy). "
            f"Held-out loss: {_pm(loss(best), best['loss'].get('loss_stderr'))} nats per token after dropping "
            f"{_layers_phrase(points, deepest)} ({configuration_name(*configuration(best))}), against "
            f"{_pm(loss(base), base['loss'].get('loss_stderr'))} unpruned.")


def _ended_cell(ended) -> str:
    if ended is None:
        return "every point kept"
    return f"{'lost' if ended[0] == 'lost' else 'cannot tell'} at {_percent(ended[1])}"


def _setting_rows(settings: dict, prefix: str = "") -> list[list[str]]:
    """Two-column rows: nested settings (the heal recipe) as dotted names, values as plain text."""
    rows = []
    for key, value in sorted(settings.items()):
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_setting_rows(value, f"{name}."))
        elif value is None:
            rows.append([name, "none" if key == "heal" else "-"])
        elif isinstance(value, bool):
            rows.append([name, "yes" if value else "no"])
        elif isinstance(value, (list, tuple)):
            rows.append([name, ", ".join(str(v) for v in value) or "-"])
        else:
            rows.append([name, str(value) if value != "" else "-"])
    return rows


def _forward_cell(point: dict) -> str:
    timing = forward_ms(point)
    if timing is None:
        return "-"
    if timing["q1"] is None:
        return f"{timing['median']:.1f}"
    return f"{timing['median']:.1f} ({timing['q1']:.1f}-{timing['q3']:.1f})"


HEALED_CELLS = {"": "no", "lm": "LoRA", "kd": "LoRA, KD", "kd+lm": "LoRA, KD+LM"}  # the points table's "healed"


def build_report(folder: str | Path, tolerance: float = 0.05) -> Path:
    """Rebuild every figure and report.html from `folder/results.jsonl` alone."""
    tolerance = check_tolerance(tolerance)
    folder = Path(folder)
    log = ResultsLog(folder)
    settings = log.settings() or {}
    points = sorted(log.points().values(), key=lambda p: (p["drop"], p["strategy"], p.get("repair") or "", point_healing(p)))
    model = str(settings.get("model") or "")
    # The figures are drawn into a temporary folder that replaces figures/ whole (depthcut.io.atomic).
    with atomic_output_dir(folder / "figures", force=True) as staging:
        drawn = make_figures(points, log.analysis(), staging, model=model or None)
        captions = figure_captions(points, log.analysis(), drawn)
        figures = [{"name": name, "data": base64.b64encode(path.read_bytes()).decode(), "caption": captions[name]}
                   for name, path in drawn.items()]
    tasks = sorted({t for p in points for t in p.get("tasks", {})})

    answers = {task: tolerable_fraction(points, task, tolerance) for task in tasks}
    answers = {task: answer for task, answer in answers.items() if answer}
    answer_rows = [[t, f"{a['items']:,}" if a["items"] is not None else "-", _pm(a["baseline"], a["baseline_stderr"]),
                    _fmt(a["margin"], 3), _fmt(None if a["comparison_noise"] is None else NOISE_Z * a["comparison_noise"], 3),
                    _answer_cell(a), a["best_configuration"] if a["verdict"] in ("shown", "at least") else "none shown"]
                   for t, a in answers.items()]
    sentences = [s for t, a in answers.items() for s in _answer_sentences(t, a, tolerance)]
    headlines = [headline(points, t, a, tolerance, str(folder)) for t, a in answers.items()] or [
        line for line in [loss_headline(points)] if line]
    detail_rows = [[t, name, _percent(a["by_configuration"][name]), _ended_cell(a["ended_by"][name]),
                    "; ".join(f"{_percent(e['fraction'])}: {e['verdict'].replace('unclear', 'cannot tell')}"
                              for e in a["points"][name])]
                   for t, a in answers.items() for name in a["by_configuration"]]
    timed = [p["forward_seconds"] for p in points if p.get("forward_seconds")]
    forward_header = "forward ms, median (IQR)" if timed else "forward ms"
    point_rows = []
    for p in points:
        loss = p.get("loss") or {}
        row = [p["strategy"], p["drop"], _percent(p["fraction"]), p.get("repair") or "none",
               HEALED_CELLS[point_healing(p)],
               ", ".join(map(str, p["removed_layers"])) or "-",
               _pm(loss.get("loss"), loss.get("loss_stderr"))]
        for t in tasks:
            accuracy, stderr, items = task_accuracy(p, t)
            row += [_pm(accuracy, stderr), "-" if items is None else f"{items:,}"]
        point_rows.append(row + [f"{p['parameters']:,}", _forward_cell(p)])
    timing = None
    if timed:
        timing = {**timed[0], "repeats": ", ".join(map(str, sorted({t["repeats"] for t in timed})))}
    methods = any(p.get("repair") or p["healed"] for p in points)
    page = _TEMPLATES.get_template("report.html.j2").render(
        model=model, tolerance_percent=f"{100 * tolerance:g}", answer_rows=answer_rows, sentences=sentences,
        detail_rows=detail_rows, methods_rows=_methods_rows(points, tasks) if methods else [],
        task_columns=[f"{t} acc" for t in tasks], figures=figures, headlines=headlines, loss_header=LOSS_HEADER,
        point_headers=["strategy", "dropped", "fraction", "repair", "healed", "removed layers (0-based)",
                       LOSS_HEADER, *[c for t in tasks for c in (f"{t} acc", f"{t} items")], "parameters",
                       forward_header],
        point_rows=point_rows, timing=timing, setting_rows=_setting_rows(settings))
    path = folder / REPORT_FILE
    with atomic_output_file(path, force=True) as staging:
        staging.write_text(page, encoding="utf-8")
    return path
