"""Benchmark: pruning a quantized GGUF (SmolLM2-135M, Q4_1) and what the pruned file gives llama.cpp.

- ``prune``: ``depthcut.model.gguf_surgery.prune_gguf`` removing 8 of the 30 layers: wall time, CPU time and
  peak RSS, in a fresh subprocess (this script with ``--worker``; on Linux a child's ``ru_maxrss``
  starts from its parent's peak, so the parent stays small). The worker records its RSS after its
  imports (the baseline); the peak above it is what the prune itself takes, beside the file's size.
- ``llama.cpp``: prompt processing and generation speed of the original and the pruned file, in
  xllamacpp's in-process server, greedy, a fixed number of tokens (end of text ignored): tokens
  per second from llama.cpp's own timings, and the CPU seconds of the request (one thread by
  default, so that CPU time is the work done even on a machine busy with other work, where wall
  times wander). The two files alternate for ``--repeats`` rounds and the best round of each
  counts. The speed-up is set beside the ideal 30 / 22 (the layers' share of the compute; the
  embeddings and the output head do not shrink).
- sizes: the pruned file beside the original.

Run from the repository root:  .venv/bin/python benchmarks/bench_gguf.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # standard library only until record() is called

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gguf.json"
REMOVED = list(range(12, 20))  # 8 of SmolLM2's 30 layers (its greedy text stays readable without them)
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. ") * 3
MIB = 1024 * 1024


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(source: str, out: str) -> None:
    """Prune `source` into `out` and print its figures as JSON (run as a subprocess of its own)."""
    import gguf  # noqa: F401  (imported before the baseline: the prune's own memory is what counts)

    from depthcut.model.gguf_surgery import prune_gguf

    baseline = current_rss()
    cpu, wall = time.process_time(), time.perf_counter()
    summary = prune_gguf(source, out, REMOVED, provenance={"strategy": "explicit", "benchmark": True}, force=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "baseline_rss": baseline, "peak_rss": peak,
                      "summary": summary}))


def run_prune(source: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", str(source), str(out)], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # llama.cpp's threads are this process's
    return usage.ru_utime + usage.ru_stime


def llama_cpp_speed(path: Path, tokens: int, threads: int) -> dict:
    """llama.cpp's prompt and generation speed on `path` (one fresh in-process server, one request):
    its own wall timings, and the CPU seconds the request took, which other work on a shared machine
    disturbs much less than wall time."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 1024
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    server = xllamacpp.Server(params)
    try:
        started = cpu_seconds()
        reply = server.handle_completions({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "top_k": 1,
                                           "ignore_eos": True, "cache_prompt": False})
        cpu = cpu_seconds() - started
    finally:
        del server
    timings = reply["timings"]
    return {"prompt_tokens": timings["prompt_n"], "prompt_per_second": timings["prompt_per_second"],
            "generated_tokens": timings["predicted_n"], "generated_per_second": timings["predicted_per_second"],
            "request_cpu_seconds": cpu, "text": reply["choices"][0]["text"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per llama.cpp run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each measurement (the best counts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp threads (default 1: its CPU time is then its work, whatever else runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the figures are stored as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    from depthcut.model.loading import resolve_model

    source = resolve_model("smollm2-135m")
    source_path = Path(source.location) / source.gguf_file
    facts = environment.record(device="cpu", llama_cpp_threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as folder:
        pruned_path = Path(folder) / "smollm2-pruned.gguf"
        prunes = [run_prune(source_path, pruned_path) for _ in range(args.repeats)]
        best = min(prunes, key=lambda run: run["seconds"])
        summary = best["summary"]
        size_before, size_after = summary["file_bytes_before"], summary["file_bytes_after"]
        lowest_peak = min(run["peak_rss"] - run["baseline_rss"] for run in prunes)
        print(f"prune {source_path.name}: {summary['num_layers_before']} -> {summary['num_layers_after']} layers "
              f"(removed {REMOVED[0]}:{REMOVED[-1] + 1}), {summary['quantization']}")
        print(f"  time {best['seconds']:.2f} s wall, {best['cpu_seconds']:.2f} s CPU (best of {args.repeats})")
        print(f"  peak RSS {min(r['peak_rss'] for r in prunes) / MIB:.1f} MiB, of which {lowest_peak / MIB:.1f} MiB "
              f"above the imports' {best['baseline_rss'] / MIB:.1f} MiB; file {size_before / MIB:.1f} MiB: peak above "
              f"baseline / file size = {lowest_peak / size_before:.3f}")
        print(f"  size {size_before / MIB:.1f} MiB -> {size_after / MIB:.1f} MiB ({size_after / size_before:.3f} of "
              f"the original; the 22/30 layer share would be {22 / 30:.3f})")

        speeds = {"original": [], "pruned": []}
        try:
            for _ in range(args.repeats):
                for name, path in (("original", source_path), ("pruned", pruned_path)):
                    speeds[name].append(llama_cpp_speed(path, args.tokens, args.threads))
        except ImportError:
            print("llama.cpp: skipped (pip install xllamacpp)")
        llama = {}
        if speeds["original"]:
            for name, runs in speeds.items():
                llama[name] = {key: max(run[key] for run in runs) for key in ("prompt_per_second", "generated_per_second")}
                llama[name]["request_cpu_seconds"] = min(run["request_cpu_seconds"] for run in runs)
                llama[name]["text"] = runs[0]["text"]
            ideal = summary["num_layers_before"] / summary["num_layers_after"]
            by_bytes = summary["tensor_bytes_before"] / summary["tensor_bytes_after"]
            print(f"llama.cpp, {args.threads} thread(s), {speeds['original'][0]['prompt_tokens']}-token prompt, "
                  f"{args.tokens} generated (best of {args.repeats}; ideal speed-up {ideal:.2f}x by layers, "
                  f"{by_bytes:.2f}x by weight bytes read per token, the tied output head included):")
            for key, label in (("prompt_per_second", "prompt tokens/s"), ("generated_per_second", "generated tokens/s")):
                before, after = llama["original"][key], llama["pruned"][key]
                print(f"  {label}: {before:.1f} -> {after:.1f}, speed-up {after / before:.2f}x")
            before, after = llama["original"]["request_cpu_seconds"], llama["pruned"]["request_cpu_seconds"]
            print(f"  CPU seconds per request: {before:.2f} -> {after:.2f}, speed-up {before / after:.2f}x")
            print(f"  pruned greedy text: {llama['pruned']['text'][:80]!r}")
    print(f"CPU capability: {facts['cpu_capability']} ({facts['cpu']}); {environment.describe(facts)}; "
          f"load average {facts['load_average']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prune": prunes, "llama_cpp": speeds, "best": llama, "environment": facts,
                                    "removed_layers": REMOVED}, indent=1) + "\n")
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
