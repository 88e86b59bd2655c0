"""Healing: parameter-efficient finetuning that repairs a pruned model. `recipe` (the paper's
defaults, torch-free), `targets` (which modules get LoRA), `trainer` (the loop, exact resume),
`distill` (a teacher's logits), `checkpoint`, `export` (merged and saved with provenance), `run`."""
