"""Run from tests: a small healing run on a tiny model, optionally killed mid-way or under DDP.

usage: python heal_worker.py CHECKPOINT_DIR RESULT_FILE [--die-at STEP] [--resume]
The result file receives the merged weights (rank 0) and the per-step losses.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from tiny import tiny_model, tiny_tokenizer

from depthcut.healing.recipe import HealRecipe
from depthcut.healing.trainer import heal
from depthcut.io.data import TextSource

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "depth", "pruning", "removes", "layers",
         "from", "models"]
DOCS = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(60)) for i in range(40)]
RECIPE = HealRecipe(rank=4, steps=8, seq_len=24, batch_size=2, grad_accum=2, warmup_steps=2, lr=5e-3, dropout=0.1,
                    heldout_windows=2)


def main() -> None:
    checkpoint_dir, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    die_at = int(sys.argv[sys.argv.index("--die-at") + 1]) if "--die-at" in sys.argv else None

    def on_step(step, entry):
        if step == die_at:
            os._exit(9)  # as abrupt as a kill: no cleanup, no finally blocks

    result = heal(tiny_model("llama"), tiny_tokenizer(), TextSource("words", DOCS), RECIPE, checkpoint_dir=checkpoint_dir,
                  checkpoint_every=2, resume="--resume" in sys.argv, progress=False, on_step=on_step)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"state": result.model.state_dict(), "losses": [e["loss"] for e in result.log],
                "before": result.loss_before["loss"], "after": result.loss_after["loss"]},
               result_file.with_name(f"{result_file.stem}-rank{rank}{result_file.suffix}"))


if __name__ == "__main__":
    main()
