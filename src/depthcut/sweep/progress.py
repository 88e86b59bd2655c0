"""What a sweep tells its user while it runs (stage, point i of N, time left) and when it ends (a table)."""

from __future__ import annotations

import math
import sys
import time

from depthcut.sweep.results import point_healing


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class SweepProgress:
    """One line per stage, each with the point's number and an estimate of the time left.

    The estimate is the mean time of the finished points of the same kind (healed or not, as
    healing dominates), times the points of that kind still to come; with none of a kind finished
    yet, the other kind's mean stands in (a healed point then counts double).
    """

    def __init__(self, pending: list[tuple], stream=None, enabled: bool = True):
        """`pending`: the plan's points still to run, (strategy, drop, healed, ...) each."""
        self.pending = list(pending)
        self.total = len(pending)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.durations: dict[bool, list[float]] = {False: [], True: []}
        self.index = 0
        self.began = time.perf_counter()
        self.point_began = self.began

    def _mean(self, healed: bool | str) -> float | None:
        healed = bool(healed)  # any heal (LoRA or distillation) counts as the healed kind
        own, other = self.durations[healed], self.durations[not healed]
        if own:
            return sum(own) / len(own)
        if other:
            mean = sum(other) / len(other)
            return mean * 2 if healed else mean / 2
        return None

    def seconds_left(self) -> float | None:
        """Estimated seconds for the points not yet finished, the current one counted whole."""
        left = 0.0
        for _, _, healed, *_ in self.pending[self.index - 1 if self.index else 0:]:
            mean = self._mean(healed)
            if mean is None:
                return None
            left += mean
        if self.index:
            left -= min(time.perf_counter() - self.point_began, self._mean(self.pending[self.index - 1][2]) or 0.0)
        return max(left, 0.0)

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def start_point(self, key: str) -> None:
        self.index += 1
        self.point_began = time.perf_counter()
        left = self.seconds_left()
        eta = "time left: estimating" if left is None else f"about {format_seconds(left)} left"
        self._say(f"sweep [{self.index}/{self.total}] {key}: started ({format_seconds(self.point_began - self.began)} "
                  f"elapsed, {eta})")

    def stage(self, text: str) -> None:
        self._say(f"sweep [{self.index}/{self.total}]   {text}")

    def finish_point(self, key: str) -> float:
        seconds = time.perf_counter() - self.point_began
        self.durations[bool(self.pending[self.index - 1][2])].append(seconds)
        self._say(f"sweep [{self.index}/{self.total}] {key}: done in {format_seconds(seconds)}")
        return seconds


def _with_stderr(value, stderr, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {stderr:.{digits}f}"


def summary_table(points: list[dict], tasks: list[str]) -> str:
    """A plain-text table of the finished points: layers, loss and task accuracy with standard errors."""
    header = ["point", "layers", "loss (nats/token)"] + [f"{task} acc (n)" for task in tasks] + ["seconds"]
    rows = []
    order = sorted(points, key=lambda p: (p["drop"], p["strategy"] != "none", p["strategy"], p.get("repair") or "",
                                          point_healing(p)))
    for point in order:
        loss = point.get("loss") or {}
        row = [point["key"], f"{point['num_layers'] - point['drop']}/{point['num_layers']}",
               _with_stderr(loss.get("loss"), loss.get("loss_stderr"), 3)]
        for task in tasks:
            summary = (point.get("tasks") or {}).get(task) or {}
            accuracy = _with_stderr(summary.get("acc"), summary.get("acc_stderr"), 3)
            row.append(f"{accuracy} ({summary.get('num_items', '-')})")
        row.append(f"{point.get('seconds', float('nan')):.0f}")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
