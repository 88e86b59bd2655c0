import json
from pathlib import Path

import pytest
from tiny import tiny_model

from depthcut.cli import main
from depthcut.evaluation import evaluate


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_writes_metrics_samples_and_a_table(capsys, tmp_path, tiny_llama_dir, corpus_file, device):
    out = tmp_path / "eval.json"
    code, stdout, err = run(capsys, "eval", tiny_llama_dir, "--tasks", "arc_easy,boolq,winogrande", "--limit", 6,
                            "--loss", corpus_file, "--loss-samples", 4, "--loss-seq-len", 32, "--log-samples",
                            "--out", out, "--quiet", "--batch-size", 4, "--device", device)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"arc_easy", "boolq", "winogrande"}
    arc = result["tasks"]["arc_easy"]
    assert arc["num_items"] == 6 and arc["source"].startswith("DEPTHCUT_DATA_DIR")
    assert set(arc) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    samples = [s for s in result["samples"] if s["task"] == "arc_easy"]
    assert len(samples) == 6 and all(s["source_line"] == s["doc_id"] + 1 for s in samples)
    assert arc["acc"] == pytest.approx(sum(s["prediction"] == s["gold"] for s in samples) / 6)
    assert result["loss"]["tokens"] == 4 * 31 and result["loss"]["normalized_loss"] > 0
    assert "arc_easy" in stdout and "perplexity" in stdout


def test_eval_with_a_device_map_scores_like_the_plain_model(capsys, tmp_path, tiny_llama_dir, device):
    """--device-map hands placement to accelerate: on a GPU "auto" puts the model there, on a
    CPU-only machine "cpu" exercises the same loading path."""
    results = []
    mapping = "auto" if device.type == "cuda" else "cpu"
    for name, extra in (("plain", ["--device", device]), ("mapped", ["--device-map", mapping])):
        out = tmp_path / f"{name}.json"
        code, _, err = run(capsys, "eval", tiny_llama_dir, "--tasks", "arc_easy", "--limit", 6, "--log-samples",
                           "--out", out, "--quiet", "--batch-size", 4, *extra)
        assert code == 0, err
        results.append(json.loads(out.read_text()))
    plain, mapped = ([s["loglikelihoods"] for s in r["samples"]] for r in results)
    assert [x for row in mapped for x in row] == pytest.approx([x for row in plain for x in row], abs=1e-5)


def test_mmlu_reports_lm_evals_figure_the_mean_over_subjects_and_each_subject(tokenizer, device):
    result = evaluate(tiny_model("llama", device=device), tokenizer, ["mmlu"], limit=2, num_fewshot=1, progress=False,
                      log_samples=True)
    mmlu = result["tasks"]["mmlu"]
    assert mmlu["num_fewshot"] == 1 and mmlu["num_items"] == 57 * 2 and len(mmlu["subjects"]) == 57
    assert all(s["num_items"] == 2 for s in mmlu["subjects"].values())
    assert {"acc", "acc_stderr", "acc_by_subtask", "acc_by_subtask_stderr", "chance"} <= set(mmlu)
    assert mmlu["acc"] == pytest.approx(sum(s["acc"] for s in result["samples"]) / 114)
    assert {s["subtask"] for s in result["samples"]} == {f"mmlu_{name}" for name in mmlu["subjects"]}


def test_limit_is_a_seeded_random_subset_and_a_small_task_runs_whole(tokenizer):
    model = tiny_model("llama")
    example = str(Path(__file__).parents[1] / "docs" / "examples" / "sciq_style_task.yaml")  # 6 documents
    runs = [evaluate(model, tokenizer, ["piqa", example], limit=5, seed=seed,
                     log_samples=True, progress=False) for seed in (0, 0, 1)]
    ids = [[s["doc_id"] for s in run["samples"] if s["task"] == "piqa"] for run in runs]
    assert ids[0] == ids[1] != ids[2] and ids[0] == sorted(ids[0]) and ids[0] != list(range(5))
    assert runs[0]["tasks"]["piqa"] == runs[1]["tasks"]["piqa"]
    assert runs[0]["tasks"]["sciq_style"]["num_items"] == 5 and runs[0]["tasks"]["piqa"]["num_items"] == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "arc_esay"], "Did you mean 'arc_easy'"),
        (["--tasks", "arc_easy", "--limit", "0"], "--limit must be"),
        ([], "nothing to evaluate"),
        (["--tasks", "{bad_task}"], "former task-file format"),
        (["--tasks", "piqa", "--num-fewshot", "-1"], "0 or more"),
        (["--tasks", "wikitext", "--max-length", "1"], "--max-length must be at least 2"),
    ],
)
@pytest.mark.slow
def test_eval_bad_input(capsys, tmp_path, tiny_llama_dir, argv, message):
    bad_task = tmp_path / "bad.yaml"
    bad_task.write_text("name: bad\ndata: x.jsonl\nchoices: options\nanswer: label\n")
    out = tmp_path / "out.json"
    code, _, err = run(capsys, "eval", tiny_llama_dir, *[a.format(bad_task=bad_task) for a in argv], "--out", out,
                       "--quiet")
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_missing_task_data_says_where_it_looked(capsys, tmp_path, tiny_llama_dir, monkeypatch):
    from depthcut.evaluation import local_data

    monkeypatch.setenv("DEPTHCUT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(local_data, "olmo_root", lambda: None)
    code, _, err = run(capsys, "eval", tiny_llama_dir, "--tasks", "piqa", "--out", tmp_path / "o.json", "--quiet")
    assert code == 2 and str(tmp_path) in err and "Traceback" not in err
