"""Evidence for `depthcut shrink` (issue 22): on SmolLM2-135M, the training-free winner against every fixed
recipe (angular or deepest block; none, lstsq, cosine or magnitude, the repair always applied), judged on
WikiText-2 **test** loss, which nothing fits on or chooses with; and the shrink's time against one
analysis pass.

For each --drop: `shrink_to` (validating on the held-out C4 documents and WikiText-2 validation), the
same with `--heal-steps` (the winner healed, the heal kept only where it beats the unhealed winner),
then `prune_to` for each fixed recipe (--repair-policy warn: applied whatever it does), then every
output's mean next-token loss on --test-windows windows of WikiText-2 test, with the standard error
over windows.
Figures go to benchmarks/results/shrink_evidence.json with where they ran.

Run from the repository root:  .venv/bin/python benchmarks/shrink_evidence.py --drop 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from environment import record, save
from transformers import AutoModelForCausalLM

from depthcut.analysis.calibration import build_calibration
from depthcut.analysis.passes import analyze
from depthcut.evaluation.loss import heldout_loss
from depthcut.io.data import data_dir, load_texts
from depthcut.model.loading import load_model
from depthcut.pipeline import prune_to, shrink_to

RECIPES = [(strategy, method) for strategy in ("angular", "deepest") for method in ("none", "lstsq", "cosine",
                                                                                    "magnitude")]


def test_loss(folder: Path, windows) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result = heldout_loss(model, windows, batch_size=8)
    return {"loss": result["loss"], "loss_stderr": result["loss_stderr"], "tokens": result["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", type=int, nargs="+", default=[8])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--validation-windows", type=int, default=16)
    parser.add_argument("--test-windows", type=int, default=32)
    parser.add_argument("--heal-steps", type=int, default=50, help="the healed shrink's steps (0: none)")
    parser.add_argument("--no-fixed", action="store_true",
                        help="skip the fixed recipes (deterministic: their figures are in benchmarks/README.md)")
    parser.add_argument("--out", default="benchmarks/results/shrink_evidence.json")
    args = parser.parse_args()
    common = {"model": "smollm2-135m", "data": "c4", "samples": args.samples, "seq_len": args.seq_len,
              "dtype": "float32", "quiet": True}
    model, tokenizer, _ = load_model("smollm2-135m", dtype="float32")
    started = time.perf_counter()
    analyze(model, tokenizer, "c4", samples=args.samples, seq_len=args.seq_len, progress=False)
    analysis_seconds = time.perf_counter() - started
    test_source = load_texts(str(data_dir() / "wikitext-2" / "test.txt"))
    windows = build_calibration(tokenizer, test_source, args.test_windows, 256, "windows", 0, allow_fewer=True)
    unpruned = heldout_loss(model, windows, batch_size=8)
    del model
    figures = {"analysis_seconds": analysis_seconds, "settings": vars(args), "depths": {},
               "unpruned": {"loss": unpruned["loss"], "loss_stderr": unpruned["loss_stderr"]}}
    print(f"unpruned: WikiText-2 test loss {unpruned['loss']:.4f} ± {unpruned['loss_stderr']:.4f}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for drop in args.drop:
            depth = figures["depths"][str(drop)] = {}
            started = time.perf_counter()
            shrunk = shrink_to(**common, drop=drop, validate=("c4", "wikitext"), validation_windows=args.validation_windows,
                               heal_steps=args.heal_steps or None, heal_batch_size=4, out=str(scratch / f"shrink-{drop}"))
            seconds = time.perf_counter() - started
            selection = shrunk.provenance["selection"]
            rows = selection["options"]
            heal_row = next((r for r in rows if r["repair"].endswith("+heal")), None)
            # the training-free winner: the kept option of lowest KL (the worst over the sources), as _decide picks
            free = min((r for r in rows if r["kept"] and not r["repair"].endswith("+heal")),
                       key=lambda r: max(v["kl"] for v in r["validation"].values()))
            free_seconds = seconds - (heal_row["seconds"] if heal_row else 0.0)
            out = scratch / f"shrink-free-{drop}"
            prune_to(**common, layers=",".join(map(str, free["layers"])), repair=free["repair"], repair_policy="warn",
                     validation_windows=4, out=str(out))
            depth["shrink"] = {"seconds": free_seconds, "steps": selection["seconds"], "layers": free["layers"],
                               "found_by": free["found_by"],
                               "repair": free["repair"], "options": len(rows), "test": test_loss(out, windows),
                               "table": rows}
            if heal_row is not None:
                depth["shrink+heal"] = {"seconds": seconds, "kept": heal_row["kept"], "why": heal_row["why"],
                                        "heal": selection["heal"],
                                        "test": test_loss(scratch / f"shrink-{drop}", windows)}
            winner = depth["shrink"]
            for strategy, method in [] if args.no_fixed else RECIPES:
                out = scratch / f"{strategy}-{method}-{drop}"
                try:
                    # applied whatever validation says (policy warn): few windows, only for the record
                    result = prune_to(**common, drop=drop, strategy=strategy, repair=method, repair_policy="warn",
                                      validation_windows=4, out=str(out))
                except Exception as error:  # noqa: BLE001 (a refused recipe is a row, not the end of the run)
                    depth[f"{strategy}+{method}"] = {"refused": str(error).splitlines()[0]}
                    continue
                depth[f"{strategy}+{method}"] = {"layers": result.removed, "test": test_loss(out, windows)}
            print(f"drop {drop}: shrink chose {winner['layers']} + {winner['repair']} in "
                  f"{depth['shrink']['seconds']:.0f} s ({depth['shrink']['seconds'] / analysis_seconds:.1f}x one "
                  f"analysis pass of {analysis_seconds:.1f} s; by step: "
                  + ", ".join(f"{step} {value:.0f} s" for step, value in selection["seconds"].items()) + ")")
            for name, row in depth.items():
                test = row.get("test")
                text = f"{test['loss']:.4f} ± {test['loss_stderr']:.4f}" if test else row.get("refused", "")
                print(f"  {name:<20} WikiText-2 test loss {text}")
            save(figures, args.out, record(dtype=torch.float32))  # after every depth: a long run keeps what it did


if __name__ == "__main__":
    main()
