import os
import subprocess
import sys

import pytest

from depthcut.analysis.result import Analysis
from depthcut.cli import main

# 16 tokens a sequence, 6 of them read by the all-token angular distance: the sample and its standard
# error over sequences summed across processes too
ARGS = ["--samples", "6", "--seq-len", "16", "--batch-size", "1", "--token-positions", "6", "--quiet"]


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path, tiny_llama_dir, corpus_file):
    single = tmp_path / "single"
    assert main(["analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(single), *ARGS]) == 0
    parallel = tmp_path / "parallel"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
               "-m", "depthcut.cli", "analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(parallel),
               *ARGS]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = Analysis.load(single / "analysis.json"), Analysis.load(parallel / "analysis.json")
    assert (one.metadata["processes"], two.metadata["processes"]) == (1, 2)
    assert one.best_blocks() == two.best_blocks()
    for name, rows in one.metrics.items():
        flat_one = [v for row in (rows if isinstance(rows[0], list) else [rows]) for v in row if v is not None]
        flat_two = [v for row in (two.metrics[name] if isinstance(rows[0], list) else [two.metrics[name]])
                    for v in row if v is not None]
        assert max(abs(a - b) for a, b in zip(flat_one, flat_two)) < 1e-6
    for name, rows in one.metadata["metric_stderr"].items():
        pairs = [(a, b) for row_one, row_two in zip(rows, two.metadata["metric_stderr"][name])
                 for a, b in zip(row_one, row_two) if a is not None]
        assert pairs and max(abs(a - b) for a, b in pairs) < 1e-6


PROBE = """
import sys
import torch
from depthcut.model.distributed import is_main_process, process_state
from depthcut.errors import DepthcutError

print("main" if is_main_process() else "not main")
print("group formed" if torch.distributed.is_initialized() else "no group", "accelerate" in sys.modules)
try:
    process_state(torch.device("cpu"))
except DepthcutError as error:
    print(f"DepthcutError: {error}")
"""


def _probe(**environment) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    run = subprocess.run([sys.executable, "-c", PROBE], check=False, capture_output=True, text=True, timeout=120,
                         env={**env, **environment})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def test_a_plain_process_is_the_main_one_and_forms_no_group():
    assert _probe()[:2] == ["main", "no group False"]


def test_a_launched_process_knows_its_rank_and_says_why_its_group_did_not_form():
    # rank 1 of 2 without MASTER_ADDR: the launcher's environment is incomplete, so no group can form
    lines = _probe(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    assert lines[:2] == ["not main", "no group False"]
    assert lines[2].startswith("DepthcutError: the process group did not form (") and "MASTER_ADDR" in lines[2]


@pytest.mark.slow
def test_eval_in_two_processes_scores_each_item_once_and_gives_the_single_process_answers(tmp_path, tiny_llama_dir):
    """lm-eval hands each process its share of the requests (DepthcutLM's rank and world size) and
    the first gathers every item: the same answers and the same scores as one process."""
    import json

    args = ["--tasks", "arc_easy,boolq", "--limit", "10", "--dtype", "float32", "--log-samples", "--quiet"]
    single = tmp_path / "single.json"
    assert main(["eval", str(tiny_llama_dir), *args, "--out", str(single)]) == 0
    parallel = tmp_path / "parallel.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
               "-m", "depthcut.cli", "eval", str(tiny_llama_dir), *args, "--out", str(parallel)]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(parallel.read_text())
    for task in ("arc_easy", "boolq"):
        assert one["tasks"][task]["num_items"] == two["tasks"][task]["num_items"] == 10
        assert one["tasks"][task]["acc"] == two["tasks"][task]["acc"]

    def answers(result):
        return sorted(((s["task"], s["doc_id"], s["prediction"]), s["loglikelihoods"]) for s in result["samples"])

    # every item once, none twice, the same answer; the log-likelihoods equal up to float32 rounding (the
    # two processes batch the requests differently; rounded to 4 decimals, -23.45205 fell either side)
    assert [key for key, _ in answers(one)] == [key for key, _ in answers(two)] and len(answers(two)) == 20
    for (_, first), (_, second) in zip(answers(one), answers(two), strict=True):
        assert first == pytest.approx(second, rel=1e-5, abs=1e-5)
    assert run.stdout.count("results:") == 1  # one process prints
