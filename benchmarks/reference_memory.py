"""The memory the unpruned model's reference probabilities take (issue 34: at most 64 MB per 10,000
validation tokens at a 150k vocabulary), in memory and on disk: each (windows, store) point runs in a
fresh process (a stand-in model whose logits are a fixed function of the tokens, over Qwen's
151,936-token vocabulary, so the model itself weighs nothing), and its peak resident memory is read
from getrusage. Large blocks come from mmap (MALLOC_MMAP_THRESHOLD_), so the peak counts what is kept,
not what glibc's heap happened to retain.

Run from the repository root:  .venv/bin/python benchmarks/reference_memory.py --windows 6 12 24
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from environment import describe, record, save

VOCABULARY = 151_936
POINT = """
import resource, sys, torch
sys.path.insert(0, {tests!r})
from test_divergence import TableModel
from depthcut.analysis.calibration import CalibrationSet
from depthcut.pipeline.validation import references
windows, limit = int(sys.argv[1]), int(sys.argv[2])
ids = torch.randint(0, {vocabulary}, (windows, 256), generator=torch.Generator().manual_seed(0))
model = TableModel({vocabulary}, 8, spread=4.0, seed=0)
model.get_output_embeddings = lambda: None
model.config = type("C", (), {{"vocab_size": {vocabulary}}})()
sets = {{"text": CalibrationSet(ids, torch.ones_like(ids), "random", "windows", 0)}}
predictions = references(model, sets, batch_size=1, memory_limit=limit)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, type(predictions["text"].probabilities).__name__)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--out", default="benchmarks/results/reference_memory.json")
    args = parser.parse_args()
    environment = record()
    print(describe(environment))
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    script = POINT.format(tests=tests, vocabulary=VOCABULARY)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for store, limit in (("memory", 10**15), ("disk", 256 * 2**20)):
        for windows in args.windows:
            done = subprocess.run([sys.executable, "-c", script, str(windows), str(limit)], capture_output=True,
                                  text=True, check=True, env=env)
            peak, kind = done.stdout.split()
            rows.append({"store": store, "kind": kind, "windows": windows, "tokens": windows * 255,
                         "peak_mb": int(peak) / 2**20})
    print(f"{'store':<8} {'windows':>8} {'tokens':>8} {'peak MB':>9}")
    for row in rows:
        print(f"{row['store']:<8} {row['windows']:>8} {row['tokens']:>8} {row['peak_mb']:>9.0f}")
    for store in ("memory", "disk"):
        points = [r for r in rows if r["store"] == store]
        first, last = points[0], points[-1]
        slope = (last["peak_mb"] - first["peak_mb"]) / (last["tokens"] - first["tokens"]) * 10_000
        print(f"{store}: {slope:.0f} MB per 10,000 tokens (target at most 64)")
    save({"rows": rows}, args.out, environment)


if __name__ == "__main__":
    main()
