"""`results.jsonl`: one JSON object a line, appended as each point finishes, so a crash loses at
most the point in flight. The first line records the settings; a rerun with other settings is
refused rather than mixed in. An `analysis` line keeps what the heatmap needs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.settings import settings_difference
from depthcut.io.text import read_utf8

RESULTS_FILE = "results.jsonl"


def point_key(strategy: str, drop: int, healed: bool | str, repair: str = "none") -> str:
    """`angular/8/pruned`, `angular/8/healed` (LoRA on the next-token loss), `angular/8/healed-kd`
    (distilled from the unpruned model); with a training-free repair `angular/8/pruned/lstsq`.
    `healed` is False, True (the plain heal) or the heal's objective; points of sweeps without
    repairs or distillation keep their keys."""
    heal = healing_name(healed)
    key = f"{strategy}/{drop}/{'pruned' if not heal else 'healed' if heal == 'lm' else 'healed-' + heal}"
    return key if repair == "none" else f"{key}/{repair}"


def healing_name(healed: bool | str) -> str:
    """False -> "" (not healed), True -> "lm" (the plain LoRA heal); an objective stays itself."""
    if healed is True:
        return "lm"
    return healed or ""


def point_healing(point: dict) -> str:
    """A point's heal: "" when not healed, else its objective ("lm", "kd", "kd+lm"; points written
    before distillation existed were healed on the next-token loss)."""
    if not point["healed"]:
        return ""
    return (point.get("heal") or {}).get("objective") or "lm"


def configuration(point: dict) -> tuple[str, str, str]:
    """(strategy, repair, heal) of a point: one line of the figures, one row group of the report
    (points written before repairs existed have none; `heal` as `point_healing`)."""
    return point["strategy"], point.get("repair") or "none", point_healing(point)


HEALING_NAMES = {"": "no healing", "lm": "healed", "kd": "healed by KD", "kd+lm": "healed by KD+LM"}


def configuration_name(strategy: str, repair: str, heal: str | bool) -> str:
    """`angular, no healing`; `angular + lstsq, healed`; `deepest, healed by KD`."""
    method = strategy if repair == "none" else f"{strategy} + {repair}"
    return f"{method}, {HEALING_NAMES[healing_name(heal)]}"


class ResultsLog:
    def __init__(self, folder: Path):
        self.path = Path(folder) / RESULTS_FILE

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        lines = read_utf8(self.path).splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # Only a kill in the middle of the last write can leave a broken line; it is ignored.
                if number != len(lines):
                    raise DepthcutError(f"{self.path}:{number} is not valid JSON") from None
        return records

    def settings(self) -> dict | None:
        return next((r["settings"] for r in self.records() if r.get("type") == "settings"), None)

    def analysis(self) -> dict | None:
        return next((r["analysis"] for r in self.records() if r.get("type") == "analysis"), None)

    def points(self) -> dict[str, dict]:
        return {r["key"]: r for r in self.records() if r.get("type") == "point"}

    def _drop_partial_line(self) -> None:
        """A kill during a write leaves a last line without its newline: remove it before appending."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)  # one step: a kill now cannot lose the lines before

    def start(self, settings: dict) -> None:
        """Begin a new log, or check that an existing one was made with the same settings."""
        existing = self.settings()
        if existing is None:
            self.append({"type": "settings", "settings": settings})
            return
        details = settings_difference(existing, settings, most=4)
        if details:
            raise DepthcutError(
                f"{self.path} holds results of a different sweep ({details}). Use another --out, or --force "
                "to start this folder afresh"
            )
        self._drop_partial_line()

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def finite(value) -> float | None:
    """`value` as a float, or None where it is missing, NaN or infinite (JSON-loaded results hold all three)."""
    return None if value is None or not math.isfinite(value) else float(value)


def task_accuracy(point: dict, task: str, metric: str = "acc") -> tuple[float | None, float | None, int | None]:
    """A point's (accuracy, its standard error, number of items) on `task`; None where not recorded.
    A missing or NaN standard error is rebuilt from accuracy and items as lm-eval computes it for a
    mean of 0/1 outcomes, sqrt(p (1 - p) / (n - 1)); below 2 items there is none."""
    summary = point.get("tasks", {}).get(task)
    if not summary:
        return None, None, None
    accuracy, items = finite(summary.get(metric)), summary.get("num_items")
    stderr = finite(summary.get(f"{metric}_stderr"))
    if stderr is None and accuracy is not None and items is not None and items >= 2 and 0 <= accuracy <= 1:
        stderr = (accuracy * (1 - accuracy) / (items - 1)) ** 0.5
    return accuracy, stderr, items


def forward_ms(point: dict) -> dict | None:
    """A point's forward time in milliseconds: median, q1, q3, min, max, repeats. Older results hold
    one median (`inference_seconds`) only: then the spread is None."""
    timing = point.get("forward_seconds")
    if timing:
        return {k: 1e3 * timing[k] for k in ("median", "q1", "q3", "min", "max")} | {"repeats": timing.get("repeats")}
    if point.get("inference_seconds") is None:
        return None
    return {"median": 1e3 * point["inference_seconds"], "q1": None, "q3": None, "min": None, "max": None, "repeats": None}
