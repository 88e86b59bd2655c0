"""`depthcut shrink --stream` against the in-memory shrink on SmolLM2-135M (GGUF, 30 layers) at the
defaults: the same decision table (every option's KL within 1e-4 relative, the same winner), the time
of each, and the peak memory each records in its selection. Run: python benchmarks/shrink_stream.py
[--drop 8] [--out results.json]. Both write a .gguf (the layer-major shrink of a GGUF writes one)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path


def _shrink(stream: bool, drop: int, out: str, queue) -> None:
    from depthcut.model.precision import cpu_bf16_support
    from depthcut.pipeline.shrink import shrink_to

    started = time.perf_counter()
    result = shrink_to(model="smollm2-135m", drop=drop, out=out, stream=stream, quiet=True, force=True)
    selection = result.provenance["selection"]
    queue.put({"seconds": time.perf_counter() - started, "selection": selection, "cpu": cpu_bf16_support()[1]})


def run(stream: bool, drop: int, out: str) -> dict:
    """In a process of its own, so each peak memory is its own."""
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=_shrink, args=(stream, drop, out, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drop", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        memory = run(False, args.drop, str(Path(folder) / "memory.gguf"))
        streamed = run(True, args.drop, str(Path(folder) / "streamed.gguf"))
    worst = 0.0
    for a, b in zip(memory["selection"]["options"], streamed["selection"]["options"], strict=True):
        assert (a["layers"], a["repair"]) == (b["layers"], b["repair"])
        if a["score"] is not None and b["score"] is not None:
            worst = max(worst, abs(a["score"] - b["score"]) / max(abs(a["score"]), 1e-12))
        print(f"{a['layers']!s:>40} {a['repair']:>10} {a['score'] or float('nan'):.6f} "
              f"{b['score'] or float('nan'):.6f} kept {a['kept']}/{b['kept']}")
    same = [(s["selection"]["winner"]["layers"], s["selection"]["winner"]["repair"]) for s in (memory, streamed)]
    summary = {"cpu": memory["cpu"], "drop": args.drop, "seconds_memory": round(memory["seconds"], 1),
               "seconds_stream": round(streamed["seconds"], 1),
               "time_ratio": round(streamed["seconds"] / memory["seconds"], 2),
               "peak_memory_mb_memory": memory["selection"]["peak_memory_bytes"] // 2**20,
               "peak_memory_mb_stream": streamed["selection"]["peak_memory_bytes"] // 2**20,
               "worst_relative_kl_difference": worst, "same_winner": same[0] == same[1], "winners": same,
               "walks": streamed["selection"]["streamed"]["walks"]}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "memory": memory, "streamed": streamed}, indent=1))


if __name__ == "__main__":
    main()
