"""Where `depthcut shrink`'s time goes (issue 22: at most 3x one analysis pass), without the quality
evidence of `shrink_evidence.py`: SmolLM2-135M saved once as a float32 folder (so no GGUF parse is
in the timed call), one plain analysis pass timed in this process, then `shrink_to` for each --drop
with the analysis's settings, its seconds by step, and the ratio to that pass.

Run alone: on a shared 2-core machine anything else running moves these figures by tens of percent.

Run from the repository root:  .venv/bin/python benchmarks/shrink_time.py --drop 4 8 12
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from environment import describe, record, save

from depthcut.analysis.passes import analyze
from depthcut.model.loading import load_model
from depthcut.pipeline import shrink_to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", type=int, nargs="+", default=[8])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--validation-windows", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/shrink_time.json")
    args = parser.parse_args()
    environment = record(dtype=torch.float32)
    print(describe(environment))
    figures = {"settings": vars(args), "depths": {}}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "smollm2-135m"
        model, tokenizer, _ = load_model("smollm2-135m", dtype="float32")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        started = time.perf_counter()
        analyze(model, tokenizer, "c4", samples=args.samples, seq_len=args.seq_len, progress=False)
        figures["analysis_seconds"] = analysis = time.perf_counter() - started
        del model
        print(f"one analysis pass: {analysis:.1f} s")
        for drop in args.drop:
            started = time.perf_counter()
            result = shrink_to(model=str(folder), drop=drop, data="c4", samples=args.samples, seq_len=args.seq_len,
                               dtype="float32", quiet=True, validate=("c4", "wikitext"),
                               validation_windows=args.validation_windows, out=str(Path(scratch) / f"shrink-{drop}"))
            seconds = time.perf_counter() - started
            selection = result.provenance["selection"]
            winner = selection["winner"]
            figures["depths"][str(drop)] = {"seconds": seconds, "ratio": seconds / analysis, "steps": selection["seconds"],
                                            "winner": {"layers": winner["layers"], "repair": winner["repair"]}}
            print(f"drop {drop}: {seconds:.0f} s = {seconds / analysis:.1f}x one analysis pass; chose "
                  f"{winner['layers']} + {winner['repair']}; by step: "
                  + ", ".join(f"{step} {value:.0f} s" for step, value in selection["seconds"].items()))
            save(figures, args.out, environment)


if __name__ == "__main__":
    main()
