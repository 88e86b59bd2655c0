"""What `depthcut shrink`'s training-free winner keeps on the task preset (issue 22), next to the plain
angular cut and the best fixed recipe by WikiText-2 test loss, at each depth of a `shrink_evidence.py`
run: each model rebuilt with `prune_to` (the same layers, repair and calibration as the evidence run,
the repair applied whatever validation says), scored on `--tasks` (default `retained`) with a seeded
`--limit` per task, and divided by the unpruned model's scores (`evaluation.retained`: per task and the
ratio of the averages, with delta-method standard errors).
Figures go to benchmarks/results/shrink_tasks.json with where they ran.

Run from the repository root:  .venv/bin/python benchmarks/shrink_tasks.py --limit 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from environment import record, save
from transformers import AutoModelForCausalLM, AutoTokenizer

from depthcut.evaluation.evaluate import evaluate
from depthcut.evaluation.retained import retained
from depthcut.model.loading import load_model
from depthcut.pipeline import prune_to


def scored(model, tokenizer, args) -> dict:
    started = time.perf_counter()
    result = evaluate(model, tokenizer, args.tasks.split(","), limit=args.limit or None, seed=0, batch_size=16,
                      progress=True)
    result["seconds"] = time.perf_counter() - started
    return result


def fixed_best(depth: dict) -> str | None:
    """The fixed training-free recipe of lowest WikiText-2 test loss."""
    rows = {name: row for name, row in depth.items() if "+" in name and "test" in row and name != "shrink+heal"}
    return min(rows, key=lambda name: rows[name]["test"]["loss"]) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evidence", default="benchmarks/results/shrink_evidence.json")
    parser.add_argument("--tasks", default="retained")
    parser.add_argument("--limit", type=int, default=200, help="documents per task, seeded (0: every document)")
    parser.add_argument("--recipes", nargs="+", choices=("shrink", "angular+none", "best-fixed"),
                        default=["shrink", "angular+none", "best-fixed"], help="the models to score at each depth")
    parser.add_argument("--depths", nargs="+", help="the evidence run's depths to rebuild (default: all)")
    parser.add_argument("--out", default="benchmarks/results/shrink_tasks.json")
    args = parser.parse_args()
    evidence = json.loads(Path(args.evidence).read_text())
    settings = evidence["settings"]
    common = {"model": "smollm2-135m", "data": "c4", "samples": settings["samples"], "seq_len": settings["seq_len"],
              "dtype": "float32", "quiet": True}
    model, tokenizer, _ = load_model("smollm2-135m", dtype="float32")
    unpruned = scored(model, tokenizer, args)
    del model
    figures = {"settings": vars(args), "unpruned": unpruned, "depths": {}}
    save(figures, args.out, record(dtype=torch.float32))  # kept should a depth fail
    print(f"unpruned: {unpruned['seconds']:.0f} s")
    with tempfile.TemporaryDirectory() as scratch:
        for drop, depth in evidence["depths"].items():
            if args.depths and drop not in args.depths:
                continue
            best = fixed_best(depth)
            # an evidence run with --no-fixed has the shrink's rows alone
            recipes = {name: (depth[name]["layers"], depth[name]["repair"] if name == "shrink" else "none")
                       for name in ("shrink", "angular+none") if name in args.recipes and name in depth}
            if best is not None and best not in recipes and "best-fixed" in args.recipes:
                recipes[best] = (depth[best]["layers"], best.split("+")[1])
            rows = figures["depths"][drop] = {}
            for name, (layers, repair) in recipes.items():
                out = Path(scratch) / f"{name}-{drop}"
                prune_to(**common, layers=",".join(map(str, layers)), repair=repair, repair_policy="warn",
                         validation_windows=4, out=str(out))
                pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                result = scored(pruned, AutoTokenizer.from_pretrained(out), args)
                rows[name] = {"layers": layers, "repair": repair, "wikitext2_test_loss": depth[name]["test"]["loss"],
                              "result": result, "retained": retained(result, unpruned)}
                average = rows[name]["retained"].get("average", {})
                print(f"drop {drop} {name:<18} retained {average.get('ratio', float('nan')):.3f} ± "
                      f"{average.get('ratio_stderr') if average.get('ratio_stderr') is not None else float('nan'):.3f} ({result['seconds']:.0f} s)", flush=True)
            save(figures, args.out, record(dtype=torch.float32))


if __name__ == "__main__":
    main()
