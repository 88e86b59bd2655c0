"""The sweep's running commentary (point i of N, time left) and its closing table."""

import io

from depthcut.sweep import progress as progress_module
from depthcut.sweep.progress import SweepProgress, format_seconds, summary_table


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_time_left_comes_from_finished_points_of_the_same_kind(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    stream = io.StringIO()
    points = [("none", 0, False), ("angular", 8, False), ("angular", 8, True), ("deepest", 8, True)]
    tracker = SweepProgress(points, stream=stream)

    tracker.start_point("none/0/pruned")
    assert tracker.seconds_left() is None  # nothing finished: no estimate yet
    clock.now += 10
    tracker.finish_point("none/0/pruned")

    tracker.start_point("angular/8/pruned")
    # one unhealed point took 10 s: 10 for this one, and healed ones count double until one finishes
    assert tracker.seconds_left() == 10 + 20 + 20
    clock.now += 4
    assert tracker.seconds_left() == 6 + 20 + 20  # the running point's elapsed time is taken off
    clock.now += 6
    tracker.finish_point("angular/8/pruned")

    tracker.start_point("angular/8/healed")
    clock.now += 60
    tracker.finish_point("angular/8/healed")
    tracker.start_point("deepest/8/healed")
    assert tracker.seconds_left() == 60  # the healed point's own mean now

    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("sweep [1/4] none/0/pruned: started") and "estimating" in lines[0]
    assert any(line.startswith("sweep [2/4] angular/8/pruned: started") and "about 50s left" in line for line in lines)
    assert "sweep [3/4] angular/8/healed: done in 1m00s" in lines


def test_stage_lines_carry_the_point_number():
    stream = io.StringIO()
    tracker = SweepProgress([("angular", 4, True)], stream=stream)
    tracker.start_point("angular/4/healed")
    tracker.stage("healing: 10 LoRA steps")
    assert stream.getvalue().splitlines()[-1] == "sweep [1/1]   healing: 10 LoRA steps"


def test_format_seconds():
    assert format_seconds(5.4) == "5s"
    assert format_seconds(125) == "2m05s"


def test_summary_table_shows_standard_errors_and_item_counts():
    points = [
        {"key": "angular/8/healed", "strategy": "angular", "drop": 8, "healed": True, "num_layers": 30, "seconds": 40,
         "loss": {"loss": 3.5, "loss_stderr": 0.04}, "tasks": {"arc_easy": {"acc": 0.41, "acc_stderr": 0.049,
                                                                             "num_items": 100}}},
        {"key": "none/0/pruned", "strategy": "none", "drop": 0, "healed": False, "num_layers": 30, "seconds": 12,
         "loss": {"loss": 3.1, "loss_stderr": 0.05}, "tasks": {"arc_easy": {"acc": 0.45, "acc_stderr": 0.05,
                                                                             "num_items": 100}}},
    ]
    lines = summary_table(points, ["arc_easy"]).splitlines()
    assert lines[0].split() == ["point", "layers", "loss", "(nats/token)", "arc_easy", "acc", "(n)", "seconds"]
    assert lines[2].split()[:2] == ["none/0/pruned", "30/30"]  # the unpruned model first
    assert "3.100 ± 0.050" in lines[2] and "0.450 ± 0.050 (100)" in lines[2]
    assert lines[3].split()[:2] == ["angular/8/healed", "22/30"] and "0.410 ± 0.049 (100)" in lines[3]
