"""Benchmark: how fast the command line answers before any work (issue 23's target: under 0.5 s).

Times, in fresh processes, `depthcut --help`, `depthcut prune --help`, a mistyped option (an argument
error, exit 2) and `depthcut --version`, beside two references measured the same way: a bare Python
start and `import torch` (what every one of them paid before the command line was built from the
torch-free configs). Median and range of --repeats runs each; the ratio of each to `import torch`
is the figure to compare across machines.

Run from the repository root:  .venv/bin/python benchmarks/bench_startup.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from environment import describe, record

CASES = {
    "python (no import)": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
    "depthcut --help": [sys.executable, "-m", "depthcut", "--help"],
    "depthcut prune --help": [sys.executable, "-m", "depthcut", "prune", "--help"],
    "depthcut prune (argument error)": [sys.executable, "-m", "depthcut", "prune", "m", "--no-such-option"],
    "depthcut --version": [sys.executable, "-m", "depthcut", "--version"],
}
TARGET_S = 0.5


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/startup.json")
    args = parser.parse_args()
    for argv in CASES.values():  # warm the file cache
        timed(argv)
    results = {}
    for name, argv in CASES.items():
        times = [timed(argv) for _ in range(args.repeats)]
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    torch_s = results["import torch"]["median_s"]
    environment = record(dtype=None)
    print(f"{describe(environment)}; {args.repeats} runs each")
    for name, figures in results.items():
        verdict = "" if not name.startswith("depthcut") else (
            "  within target" if figures["median_s"] < TARGET_S else f"  OVER the {TARGET_S} s target")
        print(f"  {name:34s} {figures['median_s']:.3f} s (range {figures['min_s']:.3f}-{figures['max_s']:.3f}), "
              f"{figures['median_s'] / torch_s:.2f}x import torch{verdict}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "target_s": TARGET_S, "environment": environment}, indent=2))


if __name__ == "__main__":
    main()
