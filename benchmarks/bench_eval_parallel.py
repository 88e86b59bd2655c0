"""Benchmark: `depthcut eval` in two data-parallel processes against one (issue 25).

One process with every core against `torchrun --nproc_per_node 2` with the cores shared out (one
thread each on a 2-core machine), on the same items: wall time, items per second and whether every
answer agrees. The model loads in each process; the timing covers the whole command, loading
included, as a user would see it.

Run from the repository root:  .venv/bin/python benchmarks/bench_eval_parallel.py --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from environment import record, save


def run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="arc_easy")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/results/eval_parallel.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    common = ["eval", args.model, "--tasks", args.tasks, "--limit", str(args.limit), "--dtype", args.dtype,
              "--log-samples", "--quiet"]
    with tempfile.TemporaryDirectory() as scratch:
        one, two = Path(scratch) / "one.json", Path(scratch) / "two.json"
        single = run([sys.executable, "-m", "depthcut", *common, "--out", str(one)], dict(os.environ))
        threads = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // 2)))
        parallel = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29533", "-m", "depthcut", *common, "--out", str(two)], threads)
        first, second = json.loads(one.read_text()), json.loads(two.read_text())

    def answers(result):
        return sorted((s["task"], s["doc_id"], s.get("prediction")) for s in result["samples"])

    items = len(first["samples"])
    figures = {"items": items, "one_process_s": single, "two_processes_s": parallel,
               "items_per_s": {"one": items / single, "two": items / parallel}, "speedup": single / parallel,
               "same_answers": answers(first) == answers(second), "environment": record(dtype=args.dtype)}
    print(f"{items} items of {args.tasks}: one process {single:.1f} s ({items / single:.2f} items/s), two processes "
          f"{parallel:.1f} s ({items / parallel:.2f} items/s): {single / parallel:.2f}x; same answers: "
          f"{figures['same_answers']}")
    save(figures, args.out, figures.pop("environment"))


if __name__ == "__main__":
    main()
