"""Benchmark: training tokens/s of `depthcut heal` beside a minimal hand-written peft + torch loop.

Both train the same LoRA (rank, alpha, dropout, MLP targets) on the same model, batch size,
sequence length and precision, on windows of the C4 sample. The hand-written loop is what a user
would write in a notebook: get_peft_model, AdamW, a cosine schedule, autocast, backward, step.
The runs alternate (loop, depthcut, loop, depthcut, ...) and the best of each is kept, so both
see the same machine; the ratio depthcut / loop is the figure (target >= 0.95).

Run from the repository root:  .venv/bin/python benchmarks/bench_heal.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402

import depthcut
from depthcut.analysis.calibration import build_calibration
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.targets import find_targets
from depthcut.healing.trainer import heal
from depthcut.io.data import TextSource, load_texts

DATA_DIR = Path(os.environ.get("DEPTHCUT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
OUT = Path(__file__).resolve().parent / "results" / "heal.json"


def hand_written_loop(model, windows: torch.Tensor, recipe: HealRecipe, steps: int, warmup: int) -> float:
    """tokens/s of the plain loop over `steps` steps after `warmup` untimed ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.dropout,
                        target_modules=find_targets(model, recipe.targets), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=recipe.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, steps + warmup)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if recipe.mixed_precision == "bf16" else nullcontext()
    peft_model.train()
    began = None
    for step in range(steps + warmup):
        if step == warmup:
            began = time.perf_counter()
        ids = windows[(step * recipe.batch_size) % len(windows):][: recipe.batch_size].to(device)
        with autocast:
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - began
    return steps * recipe.batch_size * recipe.seq_len / elapsed


def depthcut_heal(model, tokenizer, source: TextSource, recipe: HealRecipe, steps: int, warmup: int) -> float:
    """tokens/s of `heal()` over its steps after `warmup`, from the step times it logs."""
    stamps = {}
    recipe = HealRecipe(**{**recipe.as_dict(), "steps": steps + warmup})
    heal(model, tokenizer, source, recipe, progress=False,
         on_step=lambda step, entry: stamps.setdefault(step, time.perf_counter()))
    return steps * recipe.batch_size * recipe.seq_len / (stamps[steps + warmup] - stamps[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    pristine, tokenizer, _ = depthcut.load_model(args.model, dtype="float32", device=args.device)
    recipe = HealRecipe(rank=args.rank, seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=2,
                        mixed_precision=args.mixed_precision, heldout_windows=1)
    source = load_texts(str(DATA_DIR / "c4" / "c4_validation_2k.jsonl"))
    windows = build_calibration(tokenizer, source, args.batch_size * (args.steps + args.warmup), args.seq_len).input_ids
    results = {"loop": [], "depthcut": []}
    for round_ in range(args.rounds):
        for name in ("loop", "depthcut"):
            model = copy.deepcopy(pristine)  # both runs change the model they train
            if name == "loop":
                speed = hand_written_loop(model, windows, recipe, args.steps, args.warmup)
            else:
                speed = depthcut_heal(model, tokenizer, source, recipe, args.steps, args.warmup)
            results[name].append(speed)
            print(f"round {round_ + 1}  {name:<8} {speed:8.1f} tokens/s", flush=True)
    best = {name: max(values) for name, values in results.items()}
    ratio = best["depthcut"] / best["loop"]
    print(f"\nbest: hand-written loop {best['loop']:.1f} tokens/s, depthcut heal {best['depthcut']:.1f} tokens/s, "
          f"ratio {ratio:.3f} (target >= 0.95: {'PASS' if ratio >= 0.95 else 'FAIL'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    where = environment.record(args.device, "float32", mixed_precision=args.mixed_precision)
    print(environment.describe(where))
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "environment": where,
                                    "runs": results, "best": best, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
