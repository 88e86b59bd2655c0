"""`heal_to`: what `depthcut heal` does and writes, as one call (from the CLI or a notebook).

Checkpoints go to `OUT-checkpoints` while the run lasts: a failed or interrupted run keeps them
for `resume=True`, a finished one removes them. In a data-parallel launch every process trains
and returns the result; the first one writes it.

With a teacher (`teacher_spec`, the unpruned model), each process loads it, unquantized even for
QLoRA, with the same dtype and device options, and computes its logits for its own micro-batches.
It is not checkpointed: a resumed run loads it again.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.healing.checkpoint import latest_checkpoint, remove_stale_checkpoints
from depthcut.healing.distill import kl_line
from depthcut.healing.export import run_totals, save_healed
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.trainer import HealResult, check_finite_loss, check_quantization, full_precision_loader, heal
from depthcut.io.claims import claimed_for_writing
from depthcut.io.data import load_texts
from depthcut.io.output_checks import check_no_overlap
from depthcut.model.distributed import is_main_process
from depthcut.model.loading import check_context_length, load_model_announced, resolve_model

log = logging.getLogger(__name__)


def checkpoint_folder(out: str | Path) -> Path:
    """Where a heal writing `out` keeps its checkpoints: `OUT-checkpoints`, beside it."""
    return Path(f"{str(out).rstrip('/')}-checkpoints")


def heal_to(
    model_spec: str,
    data_spec: str,
    out: str | Path,
    recipe: HealRecipe,
    *,
    text_field: str = "text",
    dtype: str = "auto",
    device: str = "auto",
    layer_path: str | None = None,
    trust_remote_code: bool = False,
    checkpoint_every: int = 100,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    teacher_spec: str | None = None,
) -> HealResult:
    """Heal MODEL `model_spec` on DATA `data_spec` with `recipe` and save the merged model to `out`
    (with `adapter/`, `train_log.jsonl`, `depthcut.json` and a model card), as `depthcut heal` does.

    `out` is claimed before any heavy work: it must not exist unless `force`. Checkpoints of an
    earlier run in `OUT-checkpoints` are continued with `resume`, or replaced with `force`.
    `teacher_spec` (MODEL, the unpruned model) is the teacher that `recipe.objective` "kd" or "kd+lm"
    distils from; it is loaded unquantized.
    """

    for written in (out, checkpoint_folder(out)):
        check_no_overlap([model_spec, teacher_spec, data_spec], written)
    _check_teacher_spec(recipe, teacher_spec)
    check_quantization(recipe)
    if checkpoint_every < 1:
        raise DepthcutError(f"--checkpoint-every must be at least 1, got {checkpoint_every}")
    with claimed_for_writing(out, force, writer=is_main_process()):
        checkpoints = _checkpoints_for(out, resume, force)
        resolve_model(model_spec)  # a bad MODEL fails here, before the data and the heavy imports
        if teacher_spec is not None:
            resolve_model(teacher_spec)
        data = load_texts(data_spec, text_field)
        model, tokenizer, source = load_model_announced(model_spec, quiet=not progress, dtype=dtype, device=device,
                                                        trust_remote_code=trust_remote_code, quantize=recipe.quantize)
        check_context_length(model, recipe.seq_len)
        teacher, teacher_source = None, None
        if teacher_spec is not None:
            teacher, _, teacher_source = load_model_announced(teacher_spec, quiet=not progress, dtype=dtype,
                                                              device=device, trust_remote_code=trust_remote_code,
                                                              with_tokenizer=False)
            check_context_length(teacher, recipe.seq_len)
        full_precision_base = full_precision_loader(model_spec, dtype=dtype, device=device,
                                                    trust_remote_code=trust_remote_code) if recipe.quantize else None
        log_path = checkpoints / "train_log.jsonl"
        with _kept_on_failure(checkpoints):
            result = heal(model, tokenizer, data, recipe, layer_path=layer_path, checkpoint_dir=checkpoints,
                          checkpoint_every=checkpoint_every, resume=resume, log_path=log_path, progress=progress,
                          full_precision_base=full_precision_base, teacher=teacher)
            check_finite_loss(result.loss_after["loss"], result.log[-1]["step"] if result.log else 0)
            if not is_main_process():
                return result  # data-parallel run: the first process writes the result
            save_healed(result, tokenizer, out, base_model=source.as_dict(), data=data.description,
                        log_path=log_path, force=force,
                        teacher=teacher_source.as_dict() if teacher_source is not None else None)
        shutil.rmtree(checkpoints, ignore_errors=True)
    return result


def _check_teacher_spec(recipe: HealRecipe, teacher_spec: str | None) -> None:
    if recipe.distils and teacher_spec is None:
        raise DepthcutError(f"--objective {recipe.objective} distils from a teacher: give the unpruned model as "
                            "--teacher MODEL")
    if teacher_spec is not None and not recipe.distils:
        raise DepthcutError("--teacher needs --objective kd or kd+lm (the default objective, lm, uses no teacher)")


def print_heal_summary(result: HealResult, out: str | Path, stream=None) -> None:
    """The lines `depthcut heal` ends with: the held-out loss (and KL to the teacher) before and after,
    the run's size, where it went."""

    before, after, totals = result.loss_before, result.loss_after, run_totals(result)
    print(f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f} (normalized {before['normalized_loss']:.4f} -> "
          f"{after['normalized_loss']:.4f}); {totals['steps']} steps, {totals['tokens']:,} tokens, "
          f"{result.tokens / max(result.seconds, 1e-9):.0f} tokens/s", file=stream or sys.stdout)
    kl = kl_line(result.kl_before, result.kl_after)
    if kl is not None:
        print(kl, file=stream or sys.stdout)
    print(f"healed model: {out}", file=stream or sys.stdout)


def _checkpoints_for(out: str | Path, resume: bool, force: bool) -> Path:
    """`OUT-checkpoints`, ready for this run: an earlier run's checkpoints are continued (resume),
    removed (force) or refused; half-written ones are removed."""

    checkpoints = checkpoint_folder(out)
    if checkpoints.exists() and not resume and not force:
        raise DepthcutError(f"{checkpoints} holds checkpoints of an earlier run: pass --resume to continue it "
                            "or --force to start over")
    if is_main_process():
        if not resume:
            shutil.rmtree(checkpoints, ignore_errors=True)
        remove_stale_checkpoints(checkpoints)
    return checkpoints


@contextmanager
def _kept_on_failure(checkpoints: Path) -> Iterator[None]:
    """When the block fails or is interrupted, checkpoints stay for --resume (and the user is told);
    a checkpoint folder it made without a checkpoint in it is removed."""

    existed = checkpoints.exists()
    try:
        yield
    except BaseException:
        if is_main_process() and checkpoints.exists():
            if latest_checkpoint(checkpoints) is not None:
                log.warning("checkpoints kept in %s: the same command with --resume continues", checkpoints)
            elif not existed:
                shutil.rmtree(checkpoints, ignore_errors=True)
        raise
