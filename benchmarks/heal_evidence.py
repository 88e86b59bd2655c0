"""The paper's prune-then-heal experiment on SmolLM2-135M, on a CPU-sized budget.

Stages: the original model; 8 of 30 layers removed by the angular strategy; the pruned model
healed with LoRA on the C4 sample. At each stage: held-out loss on the same held-out C4
documents that healing never trains on, and arc_easy / piqa accuracy on a fixed subset.

Run from the repository root:  .venv/bin/python benchmarks/heal_evidence.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import depthcut
from depthcut.analysis.calibration import build_calibration
from depthcut.evaluation import evaluate
from depthcut.evaluation.loss import heldout_loss
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.trainer import heal
from depthcut.io.data import split_documents

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "heal_evidence.json"


def measure(model, tokenizer, held, tasks, limit) -> dict:
    loss = heldout_loss(model, held, batch_size=8)
    result = evaluate(model, tokenizer, tasks, limit=limit, batch_size=32, progress=False)
    return {"loss": loss["loss"], "normalized_loss": loss["normalized_loss"],
            **{f"{t}_{m}": result["tasks"][t][m] for t in tasks for m in result["tasks"][t]["metrics"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--limit", type=int, default=500, help="items of each task")
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    tasks = args.tasks.split(",")

    model, tokenizer, _ = depthcut.load_model("smollm2-135m", dtype="float32", device=args.device)
    data = depthcut.load_texts("c4")
    recipe = HealRecipe(rank=args.rank, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                        warmup_steps=min(100, args.steps // 10), mixed_precision="bf16")
    _, held_source = split_documents(data, recipe.heldout_fraction, recipe.seed)
    held = build_calibration(tokenizer, held_source, recipe.heldout_windows, recipe.seq_len, "windows", recipe.seed,
                             allow_fewer=True)
    stages = {"original": measure(model, tokenizer, held, tasks, args.limit)}
    print("original", stages["original"], flush=True)

    analysis = depthcut.analyze(model, tokenizer, "c4", samples=64, seq_len=256, progress=False)
    removed = depthcut.select("angular", args.drop, analysis=analysis)
    pruned = depthcut.prune(copy.deepcopy(model), removed)
    stages["pruned"] = measure(pruned, tokenizer, held, tasks, args.limit)
    print("pruned", removed, stages["pruned"], flush=True)

    began = time.perf_counter()
    result = heal(pruned, tokenizer, data, recipe, progress=True)
    stages["healed"] = measure(result.model, tokenizer, held, tasks, args.limit)
    print("healed", stages["healed"], flush=True)

    gap_closed = (stages["pruned"]["loss"] - stages["healed"]["loss"]) / (stages["pruned"]["loss"] - stages["original"]["loss"])
    summary = {"removed_layers": removed, "recipe": recipe.as_dict(), "stages": stages,
               "heal_tokens": result.tokens, "heal_seconds": result.seconds,
               "heal_tokens_per_s": result.tokens / result.seconds, "loss_gap_closed": gap_closed,
               "wall_seconds": time.perf_counter() - began,
               "environment": environment.record(args.device, "float32", mixed_precision=recipe.mixed_precision)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"\n{'stage':<10} {'loss':>7} {'norm':>7} " + " ".join(f"{k:>16}" for k in stages["original"] if "_" in k and k not in ("normalized_loss",)))
    for name, stage in stages.items():
        print(f"{name:<10} {stage['loss']:7.4f} {stage['normalized_loss']:7.4f} "
              + " ".join(f"{stage[k]:16.4f}" for k in stage if k not in ("loss", "normalized_loss")))
    print(f"healing: {result.tokens:,} tokens in {result.seconds:.0f} s ({result.tokens / result.seconds:.0f} tokens/s); "
          f"closed {100 * gap_closed:.1f}% of the loss gap")
    print(environment.describe(summary["environment"]))


if __name__ == "__main__":
    main()
