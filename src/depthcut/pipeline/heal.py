"""`heal_to`: what `depthcut heal` writes, from Python: LoRA/QLoRA healing of a (pruned) model, the
adapters merged, saved as a plain Hugging Face folder with provenance and the training log."""

from __future__ import annotations

from depthcut.healing.run import heal_to as run_heal
from depthcut.pipeline.configs import HealConfig
from depthcut.pipeline.options import make_config


def heal_to(config: HealConfig | None = None, /, **fields):
    """Heal a model with LoRA (QLoRA with quantize="4bit") and save the merged result, as `depthcut
    heal` does: checkpoints in `OUT-checkpoints` (kept for `resume` when a run fails), removed at the
    end. Takes a `HealConfig`, or its fields: `heal_to(model="pruned", data="c4", out="healed",
    steps=200, seq_len=256, batch_size=8)`. Returns the `HealResult`.
    """

    config = make_config(HealConfig, config, fields)
    return run_heal(config.model, config.data, config.out, config.recipe(), text_field=config.text_field,
                    dtype=config.dtype, device=config.device, layer_path=config.layer_path,
                    trust_remote_code=config.trust_remote_code, checkpoint_every=config.checkpoint_every,
                    resume=config.resume, force=config.force, progress=not config.quiet,
                    teacher_spec=config.teacher)
