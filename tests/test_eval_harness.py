"""Parity with lm-eval's own `hf` model (HFLM): the same task definitions and documents scored by
both, identical answers and log-likelihoods equal within float32 rounding; and the ways lm-eval
reaches `DepthcutLM` (its registry, simple_evaluate, `python -m depthcut.lm_eval`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from tiny import tiny_model

from depthcut.evaluation.evaluate import run_tasks
from depthcut.evaluation.lm import DepthcutLM
from depthcut.evaluation.tasks import resolve_tasks, task_manager

LIMITS = {"mmlu": 1}  # per subject: 57 five-shot documents


def documents(lm, names, limit, seed=0):
    """Per (task, doc_id): the document as run_tasks logs it, for `lm` on the same seeded subset."""
    _, docs = run_tasks(lm, resolve_tasks(names), limit=limit, seed=seed, log_samples=True, progress=False)
    return {(d.get("subtask", d["task"]), d["doc_id"]): d for d in docs}


def assert_same_answers(ours: dict, theirs: dict, tolerance: float) -> int:
    """Log-likelihoods within `tolerance`, hence the same predictions but where two choices tie
    within rounding (acc: lm-eval's best two log-likelihoods that close; acc_norm: the same per
    character, which equal log-likelihoods imply). Returns the number of predictions that differ."""
    assert ours.keys() == theirs.keys() and ours
    differing = 0
    for key, doc in theirs.items():
        mine = ours[key]
        # a sum of hundreds of float32 log-probabilities (piqa's long solutions) carries rounding of a
        # few ulps of the sum itself: relative 1e-6, and `tolerance` for small sums
        assert mine["loglikelihoods"] == pytest.approx(doc["loglikelihoods"], abs=tolerance, rel=1e-6), key
        assert mine["gold"] == doc["gold"]
        if mine["prediction"] != doc["prediction"]:
            best, second = sorted(doc["loglikelihoods"], reverse=True)[:2]
            assert best - second <= 2 * tolerance, key
        differing += (mine["prediction"] != doc["prediction"]) + (mine["prediction_norm"] != doc["prediction_norm"])
    return differing


@pytest.mark.parametrize("name", [
    "arc_easy", "arc_challenge", "boolq", pytest.param("hellaswag", marks=pytest.mark.slow),
    pytest.param("mmlu", marks=pytest.mark.slow), "piqa", "winogrande"])
def test_answers_equal_lm_evals_hf_model_on_a_tiny_model(name, tokenizer, device):
    model = tiny_model("llama", device=device, max_position_embeddings=1024)  # HellaSwag endings pass 128 tokens
    limit = LIMITS.get(name, 4)
    ours = documents(DepthcutLM(model, tokenizer, batch_size=4, progress=False), [name], limit)
    theirs = documents(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), [name], limit)
    assert assert_same_answers(ours, theirs, 1e-4 if device.type == "cpu" else 1e-3) <= 2


@pytest.mark.parametrize("scoring", ["packed", "shared", "full"])
@pytest.mark.slow
def test_every_scoring_mode_gives_lm_evals_answers(scoring, tokenizer):
    model = tiny_model("qwen2", max_position_embeddings=1024)
    ours = documents(DepthcutLM(model, tokenizer, batch_size=3, scoring=scoring, progress=False),
                     ["hellaswag", "winogrande"], 3)
    theirs = documents(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3), ["hellaswag", "winogrande"], 3)
    assert assert_same_answers(ours, theirs, 1e-4) <= 1


@pytest.fixture(scope="module")
def smollm2():
    import depthcut

    model, tokenizer, _ = depthcut.load_model("smollm2-135m", dtype="float32", device="cpu")
    return model, tokenizer


@pytest.mark.integration
@pytest.mark.parametrize("name,limit", [("arc_easy", 16), ("hellaswag", 8), ("winogrande", 16), ("boolq", 8)])
def test_answers_equal_lm_evals_hf_model_on_smollm2(name, limit, smollm2):
    model, tokenizer = smollm2
    ours = documents(DepthcutLM(model, tokenizer, batch_size=8, progress=False), [name], limit)
    theirs = documents(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), [name], limit)
    assert assert_same_answers(ours, theirs, 2e-3) <= 1


GENERATE = """task: tiny_generate
dataset_path: json
dataset_kwargs:
  data_files: {test: prompts.jsonl}
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["dog"], max_gen_toks: 8, do_sample: false}
metric_list: [{metric: exact_match}]
"""
ROLLING = """task: tiny_perplexity
dataset_path: json
dataset_kwargs:
  data_files: {test: texts.jsonl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}]
"""


def write(folder: Path, yaml: str, data: str, rows: list[dict]) -> str:
    (folder / data).write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{data}.yaml"
    path.write_text(yaml)
    return str(path)


def test_generation_tasks_run_the_models_own_generate_as_hflm_does(tmp_path, tokenizer):
    model = tiny_model("llama")
    rows = [{"prompt": p, "answer": "fox"} for p in ("the quick brown", "depth pruning", "the lazy", "over the")]
    task = write(tmp_path, GENERATE, "prompts.jsonl", rows)
    ours = documents(DepthcutLM(model, tokenizer, batch_size=3, progress=False), [task], None)
    theirs = documents(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3), [task], None)
    assert [d["response"] for d in ours.values()] == [d["response"] for d in theirs.values()]
    assert all("dog" not in d["response"] and "exact_match" in d for d in ours.values())


def test_perplexity_tasks_score_rolling_windows_as_hflm_does(tmp_path, tokenizer):
    model = tiny_model("llama")
    rows = [{"text": "the quick brown fox jumps over the lazy dog " * n} for n in (1, 5, 20)]
    task = write(tmp_path, ROLLING, "texts.jsonl", rows)
    ours, _ = run_tasks(DepthcutLM(model, tokenizer, progress=False), resolve_tasks([task]), progress=False)
    theirs, _ = run_tasks(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), resolve_tasks([task]),
                          progress=False)
    assert ours["tiny_perplexity"]["word_perplexity"] == pytest.approx(theirs["tiny_perplexity"]["word_perplexity"],
                                                                       rel=1e-4)


def test_lm_evals_registry_builds_depthcut_from_model_args(tiny_llama_dir):
    from lm_eval.api.registry import get_model

    lm = get_model("depthcut").create_from_arg_string(f"pretrained={tiny_llama_dir},dtype=float32,scoring=shared",
                                                      {"batch_size": "auto", "max_batch_size": 64, "device": None})
    assert isinstance(lm, DepthcutLM) and lm.scorer.mode == "shared" and lm.batch_size == 16
    assert lm.source["spec"] == str(tiny_llama_dir) and get_model("hf") is HFLM  # lm-eval's own stay visible


def test_simple_evaluate_runs_depthcut_by_name(tiny_llama_dir):
    """By name, as lm-eval's own `hf` model is run: the same items scored the same (lm-eval's HFLM is
    the reference), item by item."""
    import lm_eval

    runs = {name: lm_eval.simple_evaluate(model=name, model_args=f"pretrained={tiny_llama_dir},dtype=float32",
                                          tasks=["arc_easy"], task_manager=task_manager(with_index=False), limit=6,
                                          batch_size=2, log_samples=True, device="cpu")
            for name in ("depthcut", "hf")}
    ours, theirs = runs["depthcut"], runs["hf"]
    assert ours["results"]["arc_easy"]["acc,none"] == theirs["results"]["arc_easy"]["acc,none"]
    assert ours["results"]["arc_easy"]["acc_norm,none"] == theirs["results"]["arc_easy"]["acc_norm,none"]
    for mine, reference in zip(ours["samples"]["arc_easy"], theirs["samples"]["arc_easy"], strict=True):
        assert mine["doc_id"] == reference["doc_id"] and mine["acc"] == reference["acc"]
        assert [float(r[0]) for r in mine["filtered_resps"]] == pytest.approx(
            [float(r[0]) for r in reference["filtered_resps"]], abs=1e-4)


@pytest.mark.slow
def test_lm_evals_command_line_with_depthcut(tiny_llama_dir, tmp_path):
    """`python -m depthcut.lm_eval` is lm-eval's command line with the model registered and the
    built-in benchmarks on local data (the hub is out of reach here)."""
    command = [sys.executable, "-m", "depthcut.lm_eval", "--model", "depthcut", "--model_args",
               f"pretrained={tiny_llama_dir},dtype=float32", "--tasks", "arc_easy,piqa", "--limit", "3",
               "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|arc_easy|" in done.stdout.replace(" ", "") and "depthcut" in done.stdout
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert set(results["results"]) == {"arc_easy", "piqa"}


def test_batch_size_auto_finds_the_largest_batch_that_fits():
    from depthcut.evaluation.lm import largest_batch, probe_batch_size

    tried = []

    def fits_up_to(ceiling):
        def fits(size):
            tried.append(size)
            return size <= ceiling
        return fits

    assert largest_batch(fits_up_to(37), 64) == 37 and max(tried) <= 64
    tried.clear()
    assert largest_batch(fits_up_to(10**6), 64) == 64 and max(tried) == 64
    assert largest_batch(fits_up_to(0), 64) == 1  # nothing fits: one row at a time
    assert largest_batch(fits_up_to(1), 64) == 1 and largest_batch(fits_up_to(2), 3) == 2
    # on a CPU nothing is probed (an allocation that does not fit kills the process): the default
    assert probe_batch_size(torch.nn.Linear(2, 2), 128) == 16


@pytest.mark.slow
def test_wikitext_runs_on_the_local_copy_as_hflm_scores_it(tokenizer, shared_data):
    """lm-eval's own `wikitext` task (its detokenizer, rolling windows, word perplexity) on the articles of
    the local WikiText-2 test file: one page per ` = Title = ` line, and HFLM's figures."""
    from depthcut.evaluation.local_data import split_rows

    pages = split_rows("wikitext", "test")
    text = (shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    titles = [line for line in text.splitlines() if line.startswith(" = ") and line.endswith(" = ")
              and not line.startswith(" = = ")]  # " = <unk> for the next round " is a table's row, not a title
    assert len(pages) == len(titles) == 62 and [p["page"].splitlines()[0] for p in pages] == titles
    assert "".join(p["page"] for p in pages) == text[text.index(titles[0]):]  # every line, once, in order
    assert pages[0]["page"].startswith(" = Robert <unk> = \n") and " = = Career = = " in pages[0]["page"]
    model = tiny_model("llama")
    ours, _ = run_tasks(DepthcutLM(model, tokenizer, progress=False), resolve_tasks(["wikitext"]), limit=2,
                        progress=False)
    theirs, _ = run_tasks(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), resolve_tasks(["wikitext"]),
                          limit=2, progress=False)
    assert ours["wikitext"]["word_perplexity"] == pytest.approx(theirs["wikitext"]["word_perplexity"], rel=1e-4)
    assert "wikitext-2/test.txt" in resolve_tasks(["wikitext"])[0].source


def test_max_length_caps_the_rolling_windows_as_hflm_does(capsys, tmp_path, tokenizer, shared_data):
    """`depthcut eval --max-length N`: WikiText-2's rolling windows of N tokens, scored as lm-eval's hf model
    scores them with its own max_length, and recorded in the result."""
    from depthcut.cli import main

    model = tiny_model("llama")  # its own context: 128 positions
    capped, _ = run_tasks(DepthcutLM(model, tokenizer, progress=False, max_length=16), resolve_tasks(["wikitext"]),
                          limit=1, progress=False)
    theirs, _ = run_tasks(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=16),
                          resolve_tasks(["wikitext"]), limit=1, progress=False)
    whole, _ = run_tasks(DepthcutLM(model, tokenizer, progress=False), resolve_tasks(["wikitext"]), limit=1,
                         progress=False)
    assert capped["wikitext"]["word_perplexity"] == pytest.approx(theirs["wikitext"]["word_perplexity"], rel=1e-4)
    assert capped["wikitext"]["word_perplexity"] != pytest.approx(whole["wikitext"]["word_perplexity"], rel=1e-3)
    folder, out = tmp_path / "tiny", tmp_path / "eval.json"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["eval", str(folder), "--tasks", "wikitext", "--limit", "1", "--max-length", "16", "--dtype", "float32",
                 "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["max_length"] == 16
    assert result["tasks"]["wikitext"]["word_perplexity"] == pytest.approx(capped["wikitext"]["word_perplexity"],
                                                                          rel=1e-4)
