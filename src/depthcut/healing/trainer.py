"""`heal()`: LoRA finetuning of a (pruned) model, resumable and data-parallel.

Every step's data and dropout noise are functions of (seed, step, process rank) alone, so a run
resumed from a checkpoint ends with the same weights as one that was never interrupted.
Multi-process data parallelism comes from `accelerate` (`accelerate launch ... depthcut heal`).
With a teacher (the unpruned model), the loss can be distillation from it (`healing.distill`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from depthcut.analysis.calibration import build_calibration
from depthcut.errors import DepthcutError
from depthcut.evaluation.loss import heldout_loss
from depthcut.healing.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from depthcut.healing.distill import check_teacher, distillation_loss, heldout_kl, teacher_description, teacher_logits
from depthcut.healing.quiet import unused_kernel_lookup_quiet
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.targets import find_targets
from depthcut.io.data import TextSource, split_documents
from depthcut.model.distributed import process_state
from depthcut.model.loading import load_model
from depthcut.model.precision import autocast_for


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
    kl_before: dict | None = None  # with a teacher: the held-out distillation loss (healing.distill.heldout_kl)
    kl_after: dict | None = None


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


def check_quantization(recipe: HealRecipe) -> None:
    """QLoRA needs bitsandbytes; since 0.46 it has CPU kernels too, so no GPU is required."""
    if recipe.quantize is None:
        return
    try:
        # deferred: optional, for --quantize 4bit
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DepthcutError("--quantize 4bit needs bitsandbytes: pip install 'depthcut[qlora]'") from None


def resolve_mixed_precision(recipe: HealRecipe, device: torch.device) -> tuple[HealRecipe, str]:
    """The recipe with `mixed_precision="auto"` made concrete for `device`, and the reason."""


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
    """peft reads `is_gradient_checkpointing`, which transformers 5 renamed: a warning no user can act on
    (as is the lookup of a kernel depthcut does not use, depthcut.healing.quiet)."""
    with warnings.catch_warnings(), unused_kernel_lookup_quiet():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def full_precision_loader(spec: str, **load_options) -> Callable[[], torch.nn.Module]:
    """`heal(..., full_precision_base=...)` for a QLoRA run on MODEL `spec`: loads it unquantized,
    without a tokenizer, with the same `depthcut.load_model` options (dtype, device, ...)."""

    def load():
        return load_model(spec, with_tokenizer=False, **load_options)[0]

    return load


def merge_adapter(base_model, result: HealResult):
    """Merge a finished heal's LoRA weights into `base_model` (e.g. the unquantized weights of a QLoRA base)."""
    # deferred: peft (and bitsandbytes with it) is imported by healing alone
    from peft import get_peft_model, set_peft_model_state_dict

    with _peft_renamed_property_quiet():
        peft_model = get_peft_model(base_model, result.peft_config)
    set_peft_model_state_dict(peft_model, result.adapter)
    return peft_model.merge_and_unload().eval()


def _adapter_state(peft_model) -> dict:
    """The LoRA weights; embeddings are never adapted, so peft need not look for a base config to compare."""
    # deferred: peft (and bitsandbytes with it) is imported by healing alone
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, save_embedding_layers=False)


def _wrap_with_lora(model, recipe: HealRecipe, layer_path):
    # deferred: peft (and bitsandbytes with it) is imported by healing alone
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


@dataclass
class _Run:
    """One healing run between its set-up and its end: what every step reads and advances."""

    recipe: HealRecipe
    accelerator: object  # accelerate.Accelerator
    model: torch.nn.Module  # the peft model; wrapped for data parallelism once `prepare`d
    optimizer: torch.optim.Optimizer
    scheduler: object
    windows: torch.Tensor  # (windows, seq_len) token ids of the training split
    held: object  # CalibrationSet of the held-out split
    total_steps: int
    fingerprint: dict  # what a checkpoint must match to be resumed
    loss_before: dict
    precision_reason: str
    teacher: torch.nn.Module | None = None  # frozen, in eval mode; never checkpointed
    kl_before: dict | None = None
    start: int = 0
    log: list[dict] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def prepare(self) -> None:
        """Hand the model and optimizer to accelerate (after any restore: it loads into the unwrapped ones)."""
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    def peft_model(self):
        return self.accelerator.unwrap_model(self.model)


def _set_up(model, tokenizer, data: TextSource, recipe: HealRecipe, layer_path, teacher=None) -> _Run:
    """Everything before the first step: the process group, the training and held-out windows, the
    loss (and KL to the teacher) before healing, the LoRA-wrapped model, its optimizer and
    learning-rate schedule."""
    # deferred: accelerate is imported only where processes or empty weights need it
    from accelerate import Accelerator

    if recipe.distils and teacher is None:
        raise DepthcutError(f"objective {recipe.objective!r} distils from a teacher: pass the unpruned model as "
                            "teacher (--teacher MODEL)")
    if teacher is not None:
        check_teacher(model, teacher)
    check_quantization(recipe)
    if recipe.quantize:
        keep_4bit_differentiable(model)
    device = next(model.parameters()).device
    recipe, precision_reason = resolve_mixed_precision(recipe, device)
    state = process_state(device)  # launched as several: the process group forms here, or a DepthcutError says why
    accelerator = Accelerator(mixed_precision=recipe.mixed_precision, cpu=device.type == "cpu")
    world = state.num_processes
    total_steps = recipe.total_steps(world)
    train_source, held_source = split_documents(data, recipe.heldout_fraction, recipe.seed)
    windows = _training_windows(tokenizer, train_source, recipe, total_steps * recipe.batch_size * recipe.grad_accum * world)
    held = build_calibration(tokenizer, held_source, recipe.heldout_windows, recipe.seq_len, "windows", recipe.seed,
                             allow_fewer=True)
    loss_before = heldout_loss(model, held, batch_size=recipe.batch_size)
    kl_before = _heldout_kl(model, teacher, held, recipe)

    model, targets = _wrap_with_lora(model, recipe, layer_path)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, total_steps)
    fingerprint = {**recipe.fingerprint(), "world_size": world, "targets_resolved": len(targets),
                   "data": data.description, "documents": len(data.documents), "windows": len(windows)}
    if recipe.distils:
        fingerprint["teacher"] = teacher_description(teacher)
    return _Run(recipe, accelerator, model, optimizer, scheduler, windows, held, total_steps, fingerprint, loss_before,
                precision_reason, teacher, kl_before)


def _heldout_kl(model, teacher, held, recipe: HealRecipe) -> dict | None:
    if teacher is None:
        return None
    return heldout_kl(model, teacher, held, recipe.kd_temperature, batch_size=recipe.batch_size)


def _restore(run: _Run, checkpoints: Path) -> None:
    """Continue from the newest checkpoint in `checkpoints`, if there is one (before `run.prepare()`)."""
    # deferred: peft (and bitsandbytes with it) is imported by healing alone
    from peft import set_peft_model_state_dict

    found = latest_checkpoint(checkpoints)
    if found is None:
        return
    state = load_checkpoint(found, run.fingerprint)
    set_peft_model_state_dict(run.model, state["adapter"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    run.start, run.log = state["step"], state["log"]


def _save(run: _Run, checkpoints: Path, step: int) -> None:
    """Checkpoint after `step` steps; every process waits for it, the first one writes it."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        save_checkpoint(checkpoints, step, {
            "adapter": _adapter_state(run.peft_model()), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rng_state(), "log": run.log}, run.fingerprint)


def _micro_batch_losses(run: _Run, ids: torch.Tensor, sync) -> dict[str, torch.Tensor]:
    """The micro-batch's loss under the recipe's objective ("loss"), and its "lm" and "kd" parts
    when it has two; the forward passes run under `sync`."""
    recipe = run.recipe
    with sync, run.accelerator.autocast():
        output = run.model(input_ids=ids, labels=None if recipe.objective == "kd" else ids, use_cache=False)
        if not recipe.distils:
            return {"loss": output.loss}
        theirs = teacher_logits(run.teacher, ids)  # (B, T, V), no gradient
    kd = distillation_loss(output.logits, theirs, temperature=recipe.kd_temperature)
    if recipe.objective == "kd":
        return {"loss": kd}
    return {"loss": recipe.kd_weight * kd + (1 - recipe.kd_weight) * output.loss, "kd": kd, "lm": output.loss}


def _step(run: _Run, step: int) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches: the loss (and its parts, for kd+lm),
    averaged over the processes."""
    recipe, accelerator = run.recipe, run.accelerator
    torch.manual_seed(recipe.seed * 7919 + step * 104729 + run.rank)  # dropout noise of this step
    sums: dict[str, float] = {}
    for micro in range(recipe.grad_accum):
        ids = _batch(run.windows, recipe, step, micro, run.rank, run.world).to(accelerator.device)
        # Gradients are averaged across processes only on the last micro-batch.
        sync = accelerator.no_sync(run.model) if micro < recipe.grad_accum - 1 else nullcontext()
        losses = {name: value / recipe.grad_accum for name, value in _micro_batch_losses(run, ids, sync).items()}
        accelerator.backward(losses["loss"])
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    reduced = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "mean")
    return {name: float(value) for name, value in zip(sums, reduced)}


@contextmanager
def _step_log(path: str | Path | None, append: bool):
    """A function that writes a step's log entry as one JSON line of `path` (for no path, nowhere)."""
    if path is None:
        yield lambda entry: None
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as file:

        def write(entry: dict) -> None:
            file.write(json.dumps(entry) + "\n")
            file.flush()

        yield write


def check_finite_loss(loss: float, step: int) -> None:
    """Stop a run whose loss is no longer a number: the weights it would save are NaN or infinite."""
    if not math.isfinite(loss):
        raise DepthcutError(f"the training loss became {loss} at step {step}: training diverged, nothing was written "
                            "(a lower --lr, or more --warmup-steps, may help)")


def _train(run: _Run, checkpoints: Path | None, checkpoint_every: int, log_path, progress: bool,
           on_step: Callable[[int, dict], None] | None) -> float:
    """Steps from `run.start` to the end, logging each; the seconds they took."""
    main = run.accelerator.is_main_process
    per_step = run.recipe.tokens_per_step(run.world)
    bar = tqdm(total=run.total_steps, initial=run.start, desc="heal", unit="step", disable=not progress or not main)
    began = time.perf_counter()
    run.model.train()
    with bar, _step_log(log_path if main and log_path else None, append=run.start > 0) as write_log:
        for step in range(run.start, run.total_steps):
            losses = _step(run, step)
            loss = losses["loss"]
            check_finite_loss(loss, step + 1)
            elapsed = time.perf_counter() - began
            entry = {"step": step + 1, **losses, "lr": run.scheduler.get_last_lr()[0], "tokens": (step + 1) * per_step,
                     "tokens_per_s": (step + 1 - run.start) * per_step / max(elapsed, 1e-9)}
            run.log.append(entry)
            write_log(entry)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            bar.update(1)
            if checkpoints is not None and (step + 1) % checkpoint_every == 0 and step + 1 < run.total_steps:
                _save(run, checkpoints, step + 1)
            if on_step is not None:
                on_step(step + 1, entry)
    return time.perf_counter() - began


def _finish(run: _Run, seconds: float, full_precision_base: Callable[[], torch.nn.Module] | None) -> HealResult:
    """The result: the adapter merged (into `full_precision_base()` for QLoRA), the held-out loss after."""
    recipe, held = run.recipe, run.held
    peft_model = run.peft_model()
    peft_model.eval()
    adapter = {k: v.detach().clone() for k, v in _adapter_state(peft_model).items()}
    steps = run.total_steps - run.start
    result = HealResult(None, recipe, adapter, peft_model.peft_config["default"], run.loss_before, None, steps,
                        steps * recipe.tokens_per_step(run.world), seconds, run.log, run.precision_reason,
                        kl_before=run.kl_before)
    if recipe.quantize:
        result.loss_after_adapter = heldout_loss(peft_model, held, batch_size=recipe.batch_size)
        if full_precision_base is None:
            result.model, result.loss_after = peft_model, result.loss_after_adapter
            result.kl_after = _heldout_kl(peft_model, run.teacher, held, recipe)
            return result
        run.model = None  # the 4-bit model goes before the full-precision one is loaded
        del peft_model
        merged = merge_adapter(full_precision_base(), result)
    else:
        merged = peft_model.merge_and_unload()
    if recipe.gradient_checkpointing:
        merged.gradient_checkpointing_disable()
    result.model = merged
    result.loss_after = heldout_loss(merged, held, batch_size=recipe.batch_size)
    result.kl_after = _heldout_kl(merged, run.teacher, held, recipe)
    return result


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
    teacher: torch.nn.Module | None = None,
) -> HealResult:
    """Finetune LoRA adapters on `data`, then merge them; see `HealRecipe` for the settings.

    With a 4-bit base (QLoRA, `recipe.quantize`), merging into the 4-bit weights would round the
    update away, so the adapter is merged into `full_precision_base()` (the same model loaded
    unquantized) and the held-out loss after healing is measured on that merged model;
    `loss_after_adapter` is the loss of the 4-bit base with the adapter, as it was trained.
    Without `full_precision_base`, `result.model` is the 4-bit model with the adapter unmerged.

    `teacher`, the unpruned model (the same vocabulary), is what `recipe.objective` "kd" and "kd+lm"
    distil from: it is frozen and put in eval mode, and runs each micro-batch without gradients.
    With a teacher, `kl_before` and `kl_after` hold the distillation loss on the held-out windows
    (with objective "lm" too, where it is only measured).
    """
    run = _set_up(model, tokenizer, data, recipe or HealRecipe(), layer_path, teacher)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else None
    if resume and checkpoints is not None:
        _restore(run, checkpoints)
    run.prepare()
    seconds = _train(run, checkpoints, checkpoint_every, log_path, progress, on_step)
    return _finish(run, seconds, full_precision_base)
