"""Writing a healed model: merged weights, the adapter beside them, provenance carried forward."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from depthcut.healing.trainer import HealResult
from depthcut.io.model_card import PROVENANCE_FILE, loading_snippet, render_card
from depthcut.io.model_files import read_model_text
from depthcut.io.model_folder import save_model
from depthcut.io.provenance import environment


def previous_provenance(model_spec: str) -> dict | None:
    """The depthcut.json of a local MODEL folder (the pruning that came before), if any."""
    if (Path(model_spec) / PROVENANCE_FILE).exists():
        return json.loads(read_model_text(model_spec, PROVENANCE_FILE))
    return None


def heal_card(provenance: dict, out) -> str:
    healing = provenance["healing"]
    before, after = healing["loss_before"]["loss"], healing["loss_after"]["loss"]
    lines = [
        "| | |", "|---|---|",
        f"| base model | `{provenance['base_model']['spec']}` |",
    ]
    if provenance.get("pruning"):
        pruning = provenance["pruning"]
        lines.append(f"| pruning | layers {pruning.get('removed_layers')} removed ({pruning.get('strategy')}) |")
    recipe = healing["recipe"]
    if healing.get("teacher"):
        weight = recipe["kd_weight"]
        objective = {"kd": "distillation", "kd+lm": f"{weight:g} × distillation + {1 - weight:g} × next-token loss"}
        lines.append(f"| objective | {objective.get(recipe['objective'], recipe['objective'])} from "
                     f"`{healing['teacher']['spec']}`, temperature {recipe['kd_temperature']} |")
    lines += [
        (f"| LoRA | rank {recipe['rank']}, alpha {recipe['alpha'] or recipe['rank']}, dropout {recipe['dropout']}, "
         f"targets {recipe['targets']} |"),
        (f"| training | {healing['steps']} steps, {healing['tokens']:,} tokens, lr {recipe['lr']} cosine, "
         f"{recipe['warmup_steps']} warmup |"),
        f"| held-out loss | {before:.4f} → {after:.4f} |",
        *([f"| held-out KL to the teacher | {healing['kl_before']['kl']:.4f} → {healing['kl_after']['kl']:.4f} |"]
          if healing.get("kl_after") else []), "",
        "The LoRA weights are merged into this model; the adapter alone is in `adapter/`.",
        f"`{PROVENANCE_FILE}` records the whole recipe, and `train_log.jsonl` every step.", "",
        *loading_snippet(out),
    ]
    return render_card(provenance["base_model"], f"{provenance['base_model']['spec']}, healed with LoRA", lines,
                       tags=("lora",))


def run_totals(result: HealResult) -> dict:
    """The whole run's steps and tokens, a resumed run's included (its log holds every step since the
    start); `resumed_from_step` is None for a run that was not resumed."""
    this_run = {"steps_this_run": result.steps, "tokens_this_run": result.tokens}
    if not result.log:
        return {"steps": result.steps, "tokens": result.tokens, "resumed_from_step": None, **this_run}
    last = result.log[-1]
    resumed = last["step"] - result.steps
    return {"steps": last["step"], "tokens": last.get("tokens", result.tokens), "resumed_from_step": resumed or None,
            **this_run}


def save_healed(result: HealResult, tokenizer, out, *, base_model: dict, data: str, log_path: Path | None,
                force: bool = False, teacher: dict | None = None) -> Path:
    """Write the healed folder; `teacher`: the source (spec, dtype, ...) of the model distilled from."""

    pruning = previous_provenance(base_model["spec"])
    provenance = {
        "base_model": base_model,
        "pruning": pruning,
        "healing": {
            "recipe": result.recipe.as_dict(), "data": data,
            "objective": result.recipe.objective, "teacher": teacher,
            "mixed_precision": {"used": result.recipe.mixed_precision, "reason": result.mixed_precision_reason},
            "loss_after_adapter": result.loss_after_adapter,
            "loss_before": result.loss_before, "loss_after": result.loss_after,
            "kl_before": result.kl_before, "kl_after": result.kl_after,
            **run_totals(result), "seconds_this_run": result.seconds,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        },
        "environment": environment(),
    }

    def write_adapter(folder: Path) -> None:
        folder.mkdir()
        result.peft_config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in result.adapter.items()}, folder / "adapter_model.safetensors")

    extra = {"adapter": write_adapter}
    if log_path is not None and log_path.is_file():
        extra["train_log.jsonl"] = lambda path: path.write_bytes(log_path.read_bytes())
    return save_model(result.model, tokenizer, out, provenance, heal_card(provenance, out), force, extra)
