import math
import types

import pytest
import torch
from tiny import VOCAB, tiny_model, tolerance

from depthcut.analysis.calibration import CalibrationSet
from depthcut.evaluation.evaluate import subsets
from depthcut.evaluation.loss import heldout_loss
from depthcut.evaluation.metrics import chance, group_summary, mean_stderr, metric_figures, task_summary


def test_stderr_is_the_sample_standard_error():
    values = [1.0, 0.0, 1.0, 1.0]
    p = 0.75
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) * 4 / 3 / 4))
    assert math.isnan(mean_stderr([1.0]))


def test_lm_eval_figures_become_plain_metric_names():
    figures = {"alias": "gsm8k", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
               "acc_norm_stderr,none": "N/A", "exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.01}
    out = metric_figures(figures)
    assert out["acc"] == 0.5 and out["acc_stderr"] == 0.1 and out["acc_norm"] == 0.25
    assert math.isnan(out["acc_norm_stderr"])  # lm-eval's "N/A"
    assert out["exact_match,strict-match"] == 0.125 and out["exact_match_stderr,strict-match"] == 0.01
    assert "alias" not in out


OUTPUT = {
    "results": {"g": {"acc,none": 0.6, "acc_stderr,none": 0.2}, "g_a": {"acc,none": 0.75, "acc_stderr,none": 0.25},
                "g_b": {"acc,none": 0.0, "acc_stderr,none": 0.0}},
    "n-samples": {"g_a": {"original": 10, "effective": 4}, "g_b": {"original": 3, "effective": 1}},
    "n-shot": {"g_a": 5, "g_b": 5},
}


def test_task_summary_keeps_the_keys_sweeps_read():
    summary = task_summary("g_a", OUTPUT)
    assert summary == {"acc": 0.75, "acc_stderr": 0.25, "num_items": 4, "num_fewshot": 5, "metrics": ["acc"]}


def test_group_summary_reports_lm_evals_aggregate_and_the_mean_over_subtasks():
    summary = group_summary("g", ["g_a", "g_b"], OUTPUT)
    assert summary["acc"] == 0.6 and summary["acc_stderr"] == 0.2  # lm-eval's, weighted by size
    assert summary["acc_by_subtask"] == pytest.approx(0.375)  # every subtask weighs the same
    assert summary["acc_by_subtask_stderr"] == pytest.approx(math.sqrt(0.25 ** 2) / 2)
    assert summary["num_items"] == 5 and summary["num_fewshot"] == 5 and summary["metrics"] == ["acc"]
    assert set(summary["subjects"]) == {"a", "b"} and summary["subjects"]["a"]["num_items"] == 4


def test_chance_is_the_mean_of_one_over_the_number_of_choices():
    tasks = {"t": types.SimpleNamespace(OUTPUT_TYPE="multiple_choice"),
             "gen": types.SimpleNamespace(OUTPUT_TYPE="generate_until")}
    samples = {"t": [{"arguments": [0, 1]}, {"arguments": [0, 1, 2, 3]}], "gen": [{"arguments": [0]}]}
    assert chance(tasks, samples) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert chance({"gen": tasks["gen"]}, samples) is None


def _tasks(**sizes):
    return {name: types.SimpleNamespace(eval_docs=range(size)) for name, size in sizes.items()}


def test_limit_draws_a_fixed_sorted_subset_per_task():
    first = subsets(_tasks(a=50, b=50), 10, seed=3)
    assert first == subsets(_tasks(a=50, b=50), 10, seed=3) and first != subsets(_tasks(a=50, b=50), 10, seed=4)
    assert all(len(ids) == 10 and ids == sorted(ids) and len(set(ids)) == 10 for ids in first.values())
    assert first["a"] != first["b"]  # each task its own draw
    assert subsets(_tasks(a=50), 10, seed=3)["a"] == first["a"]  # whatever else is evaluated


def test_limit_takes_a_task_whole_when_it_is_not_larger():
    assert subsets(_tasks(a=5, b=50), 10, seed=0).keys() == {"b"}
    assert subsets(_tasks(a=5), 10, seed=0) is None and subsets(_tasks(a=50), None, seed=0) is None


def test_heldout_loss_equals_the_models_own_loss_and_skips_padding(device):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # the second row is 6 tokens long
    ids[1, 6:] = 0
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(3):
            length = int(mask[row].sum())
            loss = model(input_ids=ids[row : row + 1, :length], labels=ids[row : row + 1, :length]).loss
            total += float(loss) * (length - 1)
            count += length - 1
    result = heldout_loss(model.to(device), CalibrationSet(ids, mask, "random", "documents", 0), batch_size=2)
    rel = tolerance(device, 1e-5, 1e-4)
    assert result["tokens"] == count == 9 + 5 + 9
    assert result["loss"] == pytest.approx(total / count, rel=rel)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=rel)
    assert result["normalized_loss"] == pytest.approx(total / count / math.log(VOCAB), rel=rel)
