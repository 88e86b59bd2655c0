"""`report.html`: one self-contained page (figures embedded) answering "how many layers can go?"."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from depthcut.sweep.figures import make_figures
from depthcut.sweep.results import ResultsLog

REPORT_FILE = "report.html"


def tolerable_fraction(points: list[dict], task: str, tolerance: float) -> dict:
    """Per (strategy, healed): the largest fraction up to which accuracy stays within `tolerance`
    (relative) of the unpruned model's, and the best of these over all configurations."""
    base = next((p for p in points if p["drop"] == 0 and task in p.get("tasks", {})), None)
    if base is None:
        return {}
    floor = (1 - tolerance) * base["tasks"][task]["acc"]
    configurations = {}
    for key in sorted({(p["strategy"], p["healed"]) for p in points if p["drop"]}):
        curve = sorted((p["fraction"], p["tasks"][task]["acc"]) for p in points
                       if (p["strategy"], p["healed"]) == key and task in p.get("tasks", {}))
        largest = 0.0
        for fraction, accuracy in curve:
            if accuracy < floor:
                break
            largest = fraction
        configurations[f"{key[0]}, {'healed' if key[1] else 'no healing'}"] = largest
    best = max(configurations.items(), key=lambda kv: kv[1], default=(None, 0.0))
    return {"baseline": base["tasks"][task]["acc"], "floor": floor, "by_configuration": configurations,
            "best_configuration": best[0], "best_fraction": best[1]}


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value, digits=4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def build_report(folder: str | Path, tolerance: float = 0.05) -> Path:
    """Rebuild every figure and report.html from `folder/results.jsonl` alone."""
    folder = Path(folder)
    log = ResultsLog(folder)
    settings, points = log.settings() or {}, sorted(log.points().values(), key=lambda p: (p["drop"], p["strategy"], p["healed"]))
    figures = make_figures(points, log.analysis(), folder / "figures")
    tasks = sorted({t for p in points for t in p.get("tasks", {})})

    answers = {task: tolerable_fraction(points, task, tolerance) for task in tasks}
    answer_rows = [[t, _fmt(a.get("baseline")), _fmt(a.get("floor")), f"{100 * a.get('best_fraction', 0):.0f}%",
                    a.get("best_configuration") or "-"] for t, a in answers.items() if a]
    point_rows = [[p["strategy"], p["drop"], f"{100 * p['fraction']:.0f}%", "yes" if p["healed"] else "no",
                   p["removed_layers"], _fmt((p.get("loss") or {}).get("normalized_loss")),
                   *[_fmt(p["tasks"].get(t, {}).get("acc")) for t in tasks], f"{p['parameters']:,}",
                   f"{1e3 * p['inference_seconds']:.0f}"] for p in points]
    sections = [
        f"<h1>depthcut sweep: {html.escape(str(settings.get('model', '')))}</h1>",
        "<h2>How many layers can go?</h2>",
        f"<p>The largest fraction of layers dropped for which accuracy stays within {100 * tolerance:.0f}% "
        "(relative) of the unpruned model, over all strategies tried:</p>",
        _table(["task", "unpruned acc", "floor", "largest fraction", "configuration"], answer_rows)
        if answer_rows else "<p>No task was evaluated.</p>",
        "<h2>Figures</h2>",
        *[f"<figure>{_image(path)}<figcaption>{html.escape(name)}</figcaption></figure>" for name, path in figures.items()],
        "<h2>Every point</h2>",
        _table(["strategy", "dropped", "fraction", "healed", "removed layers (0-based)", "loss / log V",
                *[f"{t} acc" for t in tasks], "parameters", "forward ms"], point_rows),
        "<h2>Settings</h2>",
        _table(["setting", "value"], [[k, v] for k, v in sorted(settings.items())]),
    ]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>depthcut sweep</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
</style></head>
<body>
{chr(10).join(sections)}
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
    staging = path.with_name(f".{REPORT_FILE}.tmp")
    staging.write_text(page, encoding="utf-8")
    staging.replace(path)
    return path
