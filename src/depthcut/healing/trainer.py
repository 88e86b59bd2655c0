"""`heal()`: LoRA finetuning of a (pruned) model, resumable and data-parallel.

Every step's data and dropout noise are functions of (seed, step, process rank) alone, so a run
resumed from a checkpoint ends with the same weights as one that was never interrupted.
Multi-process data parallelism comes from `accelerate` (`accelerate launch ... depthcut heal`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from depthcut.calibration import build_calibration
from depthcut.data import TextSource
from depthcut.errors import DepthcutError
from depthcut.evaluation.loss import heldout_loss
from depthcut.healing.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.targets import find_targets


@dataclass
class HealResult:
    model: torch.nn.Module  # the merged, plain model
    recipe: HealRecipe
    adapter: dict  # the LoRA weights before merging (peft state dict)
    peft_config: object
    loss_before: dict
    loss_after: dict
    steps: int
    tokens: int
    seconds: float
    log: list[dict] = field(default_factory=list)


def split_documents(source: TextSource, fraction: float, seed: int) -> tuple[TextSource, TextSource]:
    """A seeded split into (training, held-out) documents: training never sees the held-out ones."""
    if source.documents is None:
        raise DepthcutError("healing needs local data (a file, folder or c4 sample), not a streamed dataset")
    order = list(range(len(source.documents)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(order) * fraction))
    if len(order) - count < 1:
        raise DepthcutError(f"data {source.description!r} has {len(order)} documents: too few to hold some out")
    held = [source.documents[i] for i in sorted(order[:count])]
    train = [source.documents[i] for i in sorted(order[count:])]
    return (TextSource(f"{source.description} (training)", train), TextSource(f"{source.description} (held out)", held))


def _training_windows(tokenizer, source: TextSource, recipe: HealRecipe, needed: int) -> torch.Tensor:
    windows = build_calibration(tokenizer, source, needed, recipe.seq_len, "windows", recipe.seed, allow_fewer=True)
    if len(windows) < recipe.batch_size:
        raise DepthcutError(
            f"too little training text: {len(windows)} windows of {recipe.seq_len} tokens, but one batch needs "
            f"{recipe.batch_size}. Use more data, a shorter --seq-len or a smaller --batch-size"
        )
    return windows.input_ids


def _batch(windows: torch.Tensor, recipe: HealRecipe, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
    """The micro-batch of one process: position in a seeded per-epoch permutation of the windows."""
    per_step = recipe.batch_size * recipe.grad_accum * world
    start = step * per_step + (micro * world + rank) * recipe.batch_size
    rows = []
    for position in range(start, start + recipe.batch_size):
        epoch, offset = divmod(position, len(windows))
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch))
        rows.append(int(order[offset]))
    return windows[rows]


def _check_quantization(recipe: HealRecipe) -> None:
    if recipe.quantize is None:
        return
    if not torch.cuda.is_available():
        raise DepthcutError(
            "--quantize 4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no CUDA GPU. "
            "Leave out --quantize for plain LoRA, which runs on CPU (add --mixed-precision bf16 for speed)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DepthcutError("--quantize 4bit needs bitsandbytes: pip install bitsandbytes") from None


def _wrap_with_lora(model, recipe: HealRecipe, layer_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = find_targets(model, recipe.targets, layer_path)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    if recipe.quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(recipe.seed)  # the LoRA A matrices are drawn here
    return get_peft_model(model, config), targets


def heal(
    model,
    tokenizer,
    data: TextSource,
    recipe: HealRecipe | None = None,
    *,
    layer_path: str | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    log_path: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> HealResult:
    """Finetune LoRA adapters on `data`, then merge them; see `HealRecipe` for the settings."""
    recipe = recipe or HealRecipe()
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_cosine_schedule_with_warmup

    _check_quantization(recipe)
    accelerator = Accelerator(mixed_precision=recipe.mixed_precision, cpu=next(model.parameters()).device.type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    total_steps = recipe.total_steps(world)
    train_source, held_source = split_documents(data, recipe.heldout_fraction, recipe.seed)
    windows = _training_windows(tokenizer, train_source, recipe, total_steps * recipe.batch_size * recipe.grad_accum * world)
    held = build_calibration(tokenizer, held_source, recipe.heldout_windows, recipe.seq_len, "windows", recipe.seed,
                             allow_fewer=True)
    loss_before = heldout_loss(model, held, batch_size=recipe.batch_size)

    model, targets = _wrap_with_lora(model, recipe, layer_path)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, total_steps)
    fingerprint = {**recipe.as_dict(), "world_size": world, "targets_resolved": len(targets),
                   "data": data.description, "documents": len(data.documents), "windows": len(windows)}

    start, log = 0, []
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else None
    if resume and checkpoints is not None and (found := latest_checkpoint(checkpoints)) is not None:
        state = load_checkpoint(found, fingerprint)
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, log = state["step"], state["log"]
    model, optimizer = accelerator.prepare(model, optimizer)

    log_file = None
    if log_path and accelerator.is_main_process:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a" if start else "w", encoding="utf-8")
    bar = tqdm(total=total_steps, initial=start, desc="heal", unit="step", disable=not progress or not accelerator.is_main_process)
    began = time.perf_counter()
    model.train()
    try:
        for step in range(start, total_steps):
            torch.manual_seed(recipe.seed * 7919 + step * 104729 + rank)  # dropout noise of this step
            step_loss = 0.0
            for micro in range(recipe.grad_accum):
                ids = _batch(windows, recipe, step, micro, rank, world).to(accelerator.device)
                # Gradients are averaged across processes only on the last micro-batch.
                sync = accelerator.no_sync(model) if micro < recipe.grad_accum - 1 else nullcontext()
                with sync, accelerator.autocast():
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss / recipe.grad_accum
                accelerator.backward(loss)
                step_loss += float(loss.detach())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mean_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean"))
            elapsed = time.perf_counter() - began
            entry = {"step": step + 1, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                     "tokens": (step + 1) * recipe.tokens_per_step(world),
                     "tokens_per_s": (step + 1 - start) * recipe.tokens_per_step(world) / max(elapsed, 1e-9)}
            log.append(entry)
            if log_file:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            bar.update(1)
            if checkpoints is not None and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    unwrapped = accelerator.unwrap_model(model)
                    save_checkpoint(checkpoints, step + 1, {
                        "adapter": get_peft_model_state_dict(unwrapped), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": rng_state(), "log": log}, fingerprint)
            if on_step is not None:
                on_step(step + 1, entry)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    seconds = time.perf_counter() - began

    peft_model = accelerator.unwrap_model(model)
    peft_model.eval()
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    merged = peft_model.merge_and_unload()
    if recipe.gradient_checkpointing:
        merged.gradient_checkpointing_disable()
    loss_after = heldout_loss(merged, held, batch_size=recipe.batch_size)
    return HealResult(merged, recipe, adapter, peft_model.peft_config["default"], loss_before, loss_after,
                      total_steps - start, (total_steps - start) * recipe.tokens_per_step(world), seconds, log)

