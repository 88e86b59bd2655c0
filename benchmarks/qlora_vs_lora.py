"""Does QLoRA train? LoRA and QLoRA on the same pruned SmolLM2-135M, data, steps and seed.

The model: SmolLM2-135M with 8 of its 30 layers removed (the `deepest` baseline, so no analysis
runs). Each method heals it for the same steps on the same C4 windows; the held-out loss is taken
on the same held-out C4 documents (never trained on) before and after. For QLoRA the base is
loaded in 4-bit NF4 and the adapter is merged into the unquantized weights, as `depthcut heal
--quantize 4bit` does; the loss of the 4-bit base with the adapter (as trained) is reported too.

Run from the repository root:  .venv/bin/python benchmarks/qlora_vs_lora.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import depthcut
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.trainer import full_precision_loader, heal

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "qlora_vs_lora.json"
# "c4" is read from the reference data beside the project (../shared/data) unless told otherwise.
os.environ.setdefault("DEPTHCUT_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drop", type=int, default=8, help="layers removed before healing (deepest)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--dtype", default="auto", help="the compute dtype of both runs (default: auto)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    model, tokenizer, source = depthcut.load_model(args.model, dtype="checkpoint", device="cpu")
    layers = depthcut.select("deepest", args.drop, len(depthcut.find_layer_stack(model)))
    depthcut.prune(model, layers)
    data = depthcut.load_texts("c4")
    recipe = dict(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                  warmup_steps=max(1, args.steps // 10), heldout_windows=32, seed=0)
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        for method, quantize in (("lora", None), ("qlora", "4bit")):
            student, tokenizer, loaded = depthcut.load_model(folder, dtype=args.dtype, device=args.device,
                                                             quantize=quantize)

            began = time.perf_counter()
            result = heal(student, tokenizer, data, HealRecipe(quantize=quantize, **recipe), progress=True,
                          full_precision_base=full_precision_loader(
                              folder, dtype=args.dtype, device=args.device))
            runs[method] = {
                "loss_before": result.loss_before["loss"], "loss_after": result.loss_after["loss"],
                "loss_drop": result.loss_before["loss"] - result.loss_after["loss"],
                "loss_stderr": result.loss_after["loss_stderr"],
                "loss_after_adapter": result.loss_after_adapter["loss"] if result.loss_after_adapter else None,
                "train_seconds": result.seconds, "tokens": result.tokens,
                "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
                "wall_seconds": time.perf_counter() - began, "dtype": loaded.dtype.as_dict(),
                "mixed_precision": result.recipe.mixed_precision,
            }
            print(f"{method:6s} loss {runs[method]['loss_before']:.4f} -> {runs[method]['loss_after']:.4f} "
                  f"(drop {runs[method]['loss_drop']:.4f}), {runs[method]['tokens_per_s']:.0f} tokens/s", flush=True)
            del student, result
    facts = environment.record(device=depthcut.model.loading.resolve_device(args.device), dtype=runs["lora"]["dtype"]["dtype"])
    summary = {"model": args.model, "removed_layers": layers, "recipe": recipe, "runs": runs,
               "qlora_drop_over_lora_drop": runs["qlora"]["loss_drop"] / runs["lora"]["loss_drop"],
               "environment": facts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"QLoRA's loss drop / LoRA's: {summary['qlora_drop_over_lora_drop']:.2f}")
    print(environment.describe(facts))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
