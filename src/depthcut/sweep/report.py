"""`report.html`: one self-contained page (figures embedded) answering "how many layers can go?".

The answer counts an accuracy drop only where it is larger than both the tolerance and the noise of
the subset the tasks were scored on (see `judge` and RULE below), and says so where the subset is
too small to tell a tolerance-sized drop from noise."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.atomic import atomic_output_dir, atomic_output_file
from depthcut.sweep.figures import make_figures
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
NOISE_Z = 2.0  # a drop is told from noise when it exceeds this many combined standard errors

RULE = """<p><b>How a point is judged.</b> For each task, a point's <i>drop</i> is d = (unpruned accuracy
&minus; the point's accuracy), and its <i>noise</i> is the combined standard error
s = &radic;(s<sub>unpruned</sub>&sup2; + s<sub>point</sub>&sup2;) of the two accuracies, each from its own
items (treating the two as independent overstates the noise of a comparison on the same items, so the
rule errs towards &ldquo;cannot tell&rdquo;). The tolerance is the margin m = tolerance &times; unpruned
accuracy. A point is</p>
<ul>
<li><b>lost</b> when d &gt; m and d &gt; 2s: a drop larger than the tolerance and beyond the noise;</li>
<li><b>kept</b> when it is not lost and 2s &le; m: within the tolerance, on a subset large enough that a
drop of the tolerance would have shown;</li>
<li><b>cannot tell</b> otherwise: the noise (2s) is larger than the tolerance, and the drop is not beyond it.</li>
</ul>
<p>Along each configuration (strategy, healed or not), in order of the fraction dropped, its answer is
the largest fraction with every point up to it kept; the first point lost or not told ends it. A task's
answer is the best over configurations. It is a number only where it is shown; &ldquo;at least&rdquo;
where noise ended some configuration's curve (it may do better); &ldquo;cannot tell&rdquo; where no
pruned point is shown kept and noise ended a curve. A larger subset (<code>--limit</code>) or a larger
tolerance settles these: about 8&nbsp;p(1&minus;p)/m&sup2; items a point are needed for accuracy p.</p>"""


def check_tolerance(tolerance) -> float:
    """The relative accuracy loss accepted: a fraction strictly between 0 and 1."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise DepthcutError(f"tolerance must be a fraction between 0 and 1 (e.g. 0.05 for 5%), got {tolerance!r}")
    return float(tolerance)


def judge(drop: float, noise: float | None, margin: float, z: float = NOISE_Z) -> str:
    """'lost', 'kept' or 'unclear' for an accuracy drop with its combined standard error (see RULE)."""
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
    """Per (strategy, healed): the largest fraction up to which every point is judged kept (see RULE),
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
               _pm(loss.get("loss"), loss.get("loss_stderr"), 4), _percent(gap_closed(p, plain, base))
               if configuration(p)[1:] != ("none", "") else "-"]
        row += [_pm(*task_accuracy(p, t)[:2]) for t in tasks]
        rows.append(row + [f"{seconds:.1f}" if seconds else "-"])
    return rows


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(headers: list[str], rows: list[list], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table{f" class={css!r}" if css else ""}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


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
        images = {name: _image(path) for name, path in drawn.items()}
    tasks = sorted({t for p in points for t in p.get("tasks", {})})

    answers = {task: tolerable_fraction(points, task, tolerance) for task in tasks}
    answers = {task: answer for task, answer in answers.items() if answer}
    answer_rows = [[t, f"{a['items']:,}" if a["items"] is not None else "-", _pm(a["baseline"], a["baseline_stderr"]),
                    _fmt(a["margin"], 3), _fmt(None if a["comparison_noise"] is None else NOISE_Z * a["comparison_noise"], 3),
                    _answer_cell(a), a["best_configuration"] if a["verdict"] in ("shown", "at least") else "-"]
                   for t, a in answers.items()]
    sentences = [s for t, a in answers.items() for s in _answer_sentences(t, a, tolerance)]
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
               _pm(loss.get("normalized_loss"), loss.get("normalized_loss_stderr"), 4)]
        for t in tasks:
            accuracy, stderr, items = task_accuracy(p, t)
            row += [_pm(accuracy, stderr), "-" if items is None else f"{items:,}"]
        point_rows.append(row + [f"{p['parameters']:,}", _forward_cell(p)])
    timing_note = ""
    if timed:
        repeats = sorted({t["repeats"] for t in timed})
        timing_note = (f"<p>Forward time: one pass over {timed[0]['batch']} x {timed[0]['length']} random tokens, "
                       f"timed {', '.join(map(str, repeats))} times after {timed[0]['warmup']} untimed warm-up "
                       f"pass{'es' if timed[0]['warmup'] != 1 else ''}; the median, and in brackets the "
                       "interquartile range (25th-75th percentile). Differences inside the ranges are noise of the "
                       "machine, not of the model; and each point was timed at its own moment, so on a shared "
                       "machine a change of load can move a point by more than its range.</p>")
    sections = [
        f"<h1>depthcut sweep: {html.escape(model)}</h1>",
        "<h2>How many layers can go?</h2>",
        (f"<p>Per task, the largest fraction of layers dropped that is shown to keep accuracy within "
         f"{100 * tolerance:g}% (relative) of the unpruned model, over all strategies tried, counting a drop only "
         "where it is beyond the noise of the items scored (rule below). Accuracy &plusmn; one standard error; "
         "tolerance and noise in accuracy (0-1).</p>"),
        _table(["task", "items a point", "unpruned acc ± s.e.", f"tolerance ({100 * tolerance:g}%)",
                "noise (2 × combined s.e.)", "layers that can go", "configuration"], answer_rows)
        if answer_rows else "<p>No task was evaluated.</p>",
        *[f"<p class='warning'>{html.escape(s)}</p>" for s in sentences],
        _table(["task", "configuration", "kept up to", "ended by", "every point"], detail_rows) if detail_rows else "",
        RULE,
        *(["<h2>Methods compared</h2>",
           ("<p>Each way of repairing the cut beside plain pruning at the same depth: held-out loss (nats per "
            "token &plusmn; s.e.), the share of the pruning gap in loss it closes ((plain - it) / (plain - "
            "unpruned)), task accuracy, and the seconds its repair and healing took.</p>"),
           _table(["method", "dropped", "fraction", "loss", "gap closed", *[f"{t} acc" for t in tasks],
                   "repair + heal s"], _methods_rows(points, tasks))]
          if any(p.get("repair") or p["healed"] for p in points) else []),
        "<h2>Figures</h2>",
        *[f"<figure>{image}<figcaption>{html.escape(name)}</figcaption></figure>" for name, image in images.items()],
        "<h2>Every point</h2>",
        ("<p>Accuracy &plusmn; one standard error and the number of items it was scored on; normalized loss "
         "&plusmn; its standard error over the held-out windows.</p>"),
        _table(["strategy", "dropped", "fraction", "repair", "healed", "removed layers (0-based)", "loss / log V",
                *[c for t in tasks for c in (f"{t} acc", f"{t} items")], "parameters", forward_header], point_rows),
        timing_note,
        "<h2>Settings</h2>",
        _table(["setting", "value"], _setting_rows(settings), css="settings"),
    ]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>depthcut sweep</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
table.settings td:first-child {{ font-family: monospace; }}
p.warning {{ background: #fff4e0; border-left: 4px solid #e8a33d; padding: 0.4em 0.8em; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
</style></head>
<body>
{chr(10).join(s for s in sections if s)}
<script>
window.addEventListener("load", () => {{
  const images = [...document.images];
  document.body.dataset.figuresLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figures = images.length;
}});
</script>
</body></html>
"""
    path = folder / REPORT_FILE
    with atomic_output_file(path, force=True) as staging:
        staging.write_text(page, encoding="utf-8")
    return path
