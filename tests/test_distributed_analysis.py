import subprocess
import sys

from depthcut.cli import main
from depthcut.result import Analysis

ARGS = ["--samples", "6", "--seq-len", "16", "--batch-size", "1", "--quiet"]


def test_two_processes_give_the_single_process_result(tmp_path, tiny_llama_dir, corpus_file):
    single = tmp_path / "single"
    assert main(["analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(single), *ARGS]) == 0
    parallel = tmp_path / "parallel"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
               "-m", "depthcut.cli", "analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(parallel),
               *ARGS]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = Analysis.load(single / "analysis.json"), Analysis.load(parallel / "analysis.json")
    assert (one.metadata["processes"], two.metadata["processes"]) == (1, 2)
    assert one.best_blocks() == two.best_blocks()
    for name, rows in one.metrics.items():
        flat_one = [v for row in (rows if isinstance(rows[0], list) else [rows]) for v in row if v is not None]
        flat_two = [v for row in (two.metrics[name] if isinstance(rows[0], list) else [two.metrics[name]])
                    for v in row if v is not None]
        assert max(abs(a - b) for a, b in zip(flat_one, flat_two)) < 1e-6
