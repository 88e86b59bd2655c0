"""What a training-free repair costs beside one analysis pass (issue 14: a closed-form repair takes
at most 2x the time of one analysis pass).

On SmolLM2-135M and the same calibration windows (C4, 64 x 256 tokens by default), in one process:
the analysis (every metric, `depthcut.analyze`), then for the block the analysis chose, each
repair's statistics pass plus its fit (lstsq and magnitude are closed-form; cosine adds optimizer
steps). Each is timed `--repeats` times; the medians and their ratios to the analysis are printed
and written as JSON.

    .venv/bin/python benchmarks/bench_repair.py --out /tmp/bench_repair.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import environment


def _timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--drop", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="lstsq,magnitude,cosine")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    import depthcut
    from depthcut.analysis.calibration import as_calibration
    from depthcut.repair import fit_repair, repair_statistics

    model, tokenizer, source = depthcut.load_model(args.model, dtype=args.dtype)
    calibration = as_calibration("c4", tokenizer, args.samples, args.seq_len, "windows", 0, "text")
    options = {"batch_size": args.batch_size, "progress": False}
    analysis_seconds, analysis = _timed(lambda: depthcut.analyze(model, tokenizer, calibration, **options),
                                        args.repeats)
    first, stop = analysis.best_block(args.drop)
    block = range(first, stop)
    figures = {"analysis_seconds": analysis_seconds, "block": [first, stop], "methods": {}}
    print(f"{args.model} {source.dtype.name}, {args.samples} x {args.seq_len} tokens, block [{first}, {stop}); "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"analysis (all metrics): {analysis_seconds:.2f} s")
    for method in args.methods.split(","):
        # a block at 0 or a tied embedding may be refused: that is a result too
        try:
            def run(method=method):
                stats = repair_statistics(model, calibration, block, [method], batch_size=args.batch_size)
                return stats, fit_repair(method, stats)

            seconds, (_, fit) = _timed(run, args.repeats)
        except depthcut.DepthcutError as refusal:
            figures["methods"][method] = {"refused": str(refusal)}
            print(f"{method}: refused ({refusal})")
            continue
        entry = {"seconds": seconds, "ratio_to_analysis": seconds / analysis_seconds, **fit.as_dict()}
        figures["methods"][method] = entry
        print(f"{method}: {seconds:.2f} s = {entry['ratio_to_analysis']:.2f}x the analysis; relative error at the "
              f"cut {fit.error_before:.4f} -> {fit.error_after:.4f}")
    figures["environment"] = environment.record("cpu", source.dtype.name)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
