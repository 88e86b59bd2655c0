import json
import shutil
import subprocess

import pytest

from depthcut.cli import main
from depthcut.sweep.report import tolerable_fraction
from depthcut.sweep.results import ResultsLog
from depthcut.sweep.run import parse_drops

SWEEP = ["--drop", "0,2", "--strategies", "angular,deepest,random", "--tasks", "arc_easy,piqa", "--limit", "4",
         "--samples", "4", "--seq-len", "16", "--loss-samples", "2", "--loss-seq-len", "16", "--quiet",
         "--heal", "--heal-steps", "2", "--heal-seq-len", "16", "--heal-batch-size", "2", "--heal-rank", "2",
         "--heal-warmup-steps", "1"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_llama_dir, corpus_file):
    out = tmp_path_factory.mktemp("sweep") / "run"
    code = main(["sweep", str(tiny_llama_dir), "--out", str(out), "--data", str(corpus_file), "--loss",
                 str(corpus_file), *SWEEP])
    assert code == 0
    return out


def test_sweep_measures_every_point_once(sweep_dir):
    points = ResultsLog(sweep_dir).points()
    expected = {"none/0/pruned"} | {f"{s}/2/{h}" for s in ("angular", "deepest", "random") for h in ("pruned", "healed")}
    assert set(points) == expected
    deepest = points["deepest/2/pruned"]
    assert deepest["removed_layers"] == [3, 4] and deepest["fraction"] == pytest.approx(2 / 6)
    assert points["none/0/pruned"]["parameters"] > deepest["parameters"]
    assert set(deepest["tasks"]) == {"arc_easy", "piqa"} and deepest["loss"]["tokens"] == 2 * 15
    assert points["angular/2/healed"]["heal"]["tokens"] == 2 * 2 * 16
    assert ResultsLog(sweep_dir).analysis()["num_layers"] == 6
    for name in ("accuracy.png", "accuracy.svg", "loss.png", "cost.png", "heatmap.png"):
        assert (sweep_dir / "figures" / name).stat().st_size > 1000, name
    assert "How many layers can go?" in (sweep_dir / "report.html").read_text()


def test_rerun_skips_finished_points_and_resumes_after_a_lost_point(capsys, sweep_dir, tiny_llama_dir, corpus_file):
    log = sweep_dir / "results.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    lost = json.loads(lines[-1])["key"]
    code, _, err = run(capsys, "sweep", tiny_llama_dir, "--out", sweep_dir, "--data", corpus_file, "--loss",
                       corpus_file, *SWEEP)
    assert code == 0, err
    assert err.count("sweep: ") == 1 and f"sweep: {lost}" in err
    assert len(ResultsLog(sweep_dir).points()) == 7


def test_other_settings_in_the_same_folder_are_refused(capsys, sweep_dir, tiny_llama_dir, corpus_file):
    before = (sweep_dir / "results.jsonl").read_text()
    changed = [a if a != "4" else "5" for a in SWEEP]  # another --limit
    code, _, err = run(capsys, "sweep", tiny_llama_dir, "--out", sweep_dir, "--data", corpus_file, "--loss",
                       corpus_file, *changed)
    assert code == 2 and "different sweep" in err and "limit" in err
    assert (sweep_dir / "results.jsonl").read_text() == before


def test_report_rebuilds_from_results_alone(capsys, sweep_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(sweep_dir / "results.jsonl", copy / "results.jsonl")
    code, out, err = run(capsys, "report", copy)
    assert code == 0, err
    assert (copy / "report.html").is_file() and (copy / "figures" / "heatmap.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--drop", "0,6"], "out of range"),
    (["--drop", "0,2", "--tasks", ""], "nothing to measure"),
    (["--fractions", "0:x:0.1"], "malformed"),
    (["--drop", "2", "--strategies", "angluar"], "Did you mean 'angular'"),
])
def test_sweep_bad_input(capsys, tmp_path, tiny_llama_dir, corpus_file, argv, message):
    out = tmp_path / "s"
    code, _, err = run(capsys, "sweep", tiny_llama_dir, "--out", out, "--data", corpus_file, "--tasks", "piqa",
                       "--quiet", *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_parse_drops():
    assert parse_drops(None, "0:0.5:0.1", 30) == [0, 3, 6, 9, 12, 15]
    assert parse_drops("8,0,4,4", None, 30) == [0, 4, 8]


def test_tolerable_fraction_stops_at_the_first_point_below_the_floor():
    def point(strategy, fraction, acc, healed=False):
        return {"strategy": strategy, "drop": round(fraction * 10), "fraction": fraction, "healed": healed,
                "tasks": {"t": {"acc": acc}}}

    points = [point("none", 0.0, 0.60), point("a", 0.1, 0.59), point("a", 0.2, 0.50), point("a", 0.3, 0.58),
              point("b", 0.1, 0.58), point("b", 0.2, 0.575)]
    answer = tolerable_fraction(points, "t", 0.05)  # floor 0.57
    assert answer["by_configuration"] == {"a, no healing": 0.1, "b, no healing": 0.2}
    assert answer["best_configuration"] == "b, no healing" and answer["best_fraction"] == 0.2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium_with_every_figure_loaded(sweep_dir, tmp_path):
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", (sweep_dir / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'data-figures="4"' in dom and 'data-figures-loaded="4"' in dom
