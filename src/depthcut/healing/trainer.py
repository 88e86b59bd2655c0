"""`heal()`: LoRA finetuning of a (pruned) model, resumable and data-parallel.

Every step's data and dropout noise are functions of (seed, step, process rank) alone, so a run
resumed from a checkpoint ends with the same weights as one that was never interrupted.
Multi-process data parallelism comes from `accelerate` (`accelerate launch ... depthcut heal`).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
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
    mixed_precision_reason: str = ""
    loss_after_adapter: dict | None = None  # QLoRA: the 4-bit base with the unmerged adapter


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
    """QLoRA needs bitsandbytes; since 0.46 it has CPU kernels too, so no GPU is required."""
    if recipe.quantize is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DepthcutError("--quantize 4bit needs bitsandbytes: pip install 'depthcut[qlora]'") from None


def resolve_mixed_precision(recipe: HealRecipe, device: torch.device) -> tuple[HealRecipe, str]:
    """The recipe with `mixed_precision="auto"` made concrete for `device`, and the reason."""
    from dataclasses import replace

    from depthcut.precision import autocast_for

    if recipe.mixed_precision != "auto":
        return recipe, "asked for"
    chosen, reason = autocast_for(device)
    return replace(recipe, mixed_precision=chosen), f"auto: {reason}"


def keep_4bit_differentiable(model) -> None:
    """Keep bitsandbytes' 4-bit layers on their differentiable path.

    On a CPU with AVX512-BF16, a Linear4bit that runs once in eval mode without gradients (as the
    held-out loss before training does) repacks its weight for a faster kernel, and from then on
    every call, in training too, goes through that kernel, which has no backward: no gradient flows
    through the frozen 4-bit projections to the layers below them, and QLoRA barely trains.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@contextmanager
def _peft_renamed_property_quiet():
    """peft reads `is_gradient_checkpointing`, which transformers 5 renamed: a warning no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def full_precision_loader(spec: str, **load_options) -> Callable[[], torch.nn.Module]:
    """`heal(..., full_precision_base=...)` for a QLoRA run on MODEL `spec`: loads it unquantized,
    without a tokenizer, with the same `depthcut.load_model` options (dtype, device, ...)."""

    def load():
        from depthcut.models import load_model

        return load_model(spec, with_tokenizer=False, **load_options)[0]

    return load


def merge_adapter(base_model, result: HealResult):
    """Merge a finished heal's LoRA weights into `base_model` (e.g. the unquantized weights of a QLoRA base)."""
    from peft import get_peft_model, set_peft_model_state_dict

    with _peft_renamed_property_quiet():
        peft_model = get_peft_model(base_model, result.peft_config)
    set_peft_model_state_dict(peft_model, result.adapter)
    return peft_model.merge_and_unload().eval()


def _adapter_state(peft_model) -> dict:
    """The LoRA weights; embeddings are never adapted, so peft need not look for a base config to compare."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, save_embedding_layers=False)


def _wrap_with_lora(model, recipe: HealRecipe, layer_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = find_targets(model, recipe.targets, layer_path)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with _peft_renamed_property_quiet():
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
    full_precision_base: Callable[[], torch.nn.Module] | None = None,
) -> HealResult:
    """Finetune LoRA adapters on `data`, then merge them; see `HealRecipe` for the settings.

    With a 4-bit base (QLoRA, `recipe.quantize`), merging into the 4-bit weights would round the
    update away, so the adapter is merged into `full_precision_base()` (the same model loaded
    unquantized) and the held-out loss after healing is measured on that merged model;
    `loss_after_adapter` is the loss of the 4-bit base with the adapter, as it was trained.
    Without `full_precision_base`, `result.model` is the 4-bit model with the adapter unmerged.
    """
    recipe = recipe or HealRecipe()
    from accelerate import Accelerator
    from peft import set_peft_model_state_dict
    from transformers import get_cosine_schedule_with_warmup

    _check_quantization(recipe)
    if recipe.quantize:
        keep_4bit_differentiable(model)
    recipe, precision_reason = resolve_mixed_precision(recipe, next(model.parameters()).device)
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
                        "adapter": _adapter_state(unwrapped), "optimizer": optimizer.state_dict(),
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
    adapter = {k: v.detach().clone() for k, v in _adapter_state(peft_model).items()}
    result = HealResult(None, recipe, adapter, peft_model.peft_config["default"], loss_before, None,
                        total_steps - start, (total_steps - start) * recipe.tokens_per_step(world), seconds, log,
                        precision_reason)
    if recipe.quantize:
        result.loss_after_adapter = heldout_loss(peft_model, held, batch_size=recipe.batch_size)
        if full_precision_base is None:
            result.model, result.loss_after = peft_model, result.loss_after_adapter
            return result
        del peft_model, model
        merged = merge_adapter(full_precision_base(), result)
    else:
        merged = peft_model.merge_and_unload()
    if recipe.gradient_checkpointing:
        merged.gradient_checkpointing_disable()
    result.model = merged
    result.loss_after = heldout_loss(merged, held, batch_size=recipe.batch_size)
    return result

