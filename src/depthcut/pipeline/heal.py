"""`heal_to`: what `depthcut heal` writes, from Python: LoRA/QLoRA healing of a (pruned) model, the
adapters merged, saved as a plain Hugging Face folder with provenance and the training log."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from depthcut.healing.recipe import MIXED_PRECISION, OBJECTIVES, HealRecipe
from depthcut.pipeline.common import ModelOptions, OutputOptions
from depthcut.pipeline.options import make_config, option

_RECIPE = {field.name: field.default for field in dataclasses.fields(HealRecipe)}
LORA, TRAINING, DISTILLATION, RUN = "LoRA", "training", "distillation", "the run"


@dataclass(kw_only=True)
class HealConfig(OutputOptions, ModelOptions):
    data: str = option(help="training text (as for analyze); a share is held out for the loss")
    text_field: str = option("text", help="the field holding text in JSON/parquet data")
    rank: int = option(_RECIPE["rank"], group=LORA, help="LoRA rank")
    alpha: float | None = option(_RECIPE["alpha"], group=LORA, help="LoRA alpha (default: the rank)")
    dropout: float = option(_RECIPE["dropout"], group=LORA, help="LoRA dropout")
    targets: str = option(_RECIPE["targets"], group=LORA,
                          help="mlp (default), attn, all-linear, or names like gate_proj,up_proj", show_default=False)
    quantize: str | None = option(_RECIPE["quantize"], group=LORA, choices=("4bit",),
                                  help="QLoRA: a frozen 4-bit NF4 base (CUDA)")
    lr: float = option(_RECIPE["lr"], group=TRAINING, help="peak learning rate")
    warmup_steps: int = option(_RECIPE["warmup_steps"], group=TRAINING, help="linear warmup steps")
    steps: int | None = option(_RECIPE["steps"], group=TRAINING, exclusive="budget",
                               help="optimizer steps (default: 5000)")
    tokens: int | None = option(_RECIPE["tokens"], group=TRAINING, exclusive="budget",
                                help="training tokens, instead of --steps")
    seq_len: int = option(_RECIPE["seq_len"], group=TRAINING, help="tokens per packed sequence")
    batch_size: int = option(_RECIPE["batch_size"], group=TRAINING, help="sequences per micro-batch and process")
    grad_accum: int = option(_RECIPE["grad_accum"], group=TRAINING, help="micro-batches per optimizer step")
    seed: int = option(_RECIPE["seed"], group=TRAINING, help="seed of the data order, split and LoRA init")
    mixed_precision: str = option(_RECIPE["mixed_precision"], group=TRAINING, choices=MIXED_PRECISION,
                                  help="autocast: auto (default: bf16 where the device computes it natively, else "
                                       "no), no, bf16 or fp16", show_default=False)
    gradient_checkpointing: bool = option(_RECIPE["gradient_checkpointing"], group=TRAINING,
                                          help="trade compute for activation memory")
    heldout_fraction: float = option(_RECIPE["heldout_fraction"], group=TRAINING, help="share of documents held out")
    heldout_windows: int = option(_RECIPE["heldout_windows"], group=TRAINING, help="held-out windows for the loss")
    teacher: str | None = option(None, group=DISTILLATION, metavar="MODEL",
                                 help="the unpruned model to distil from; needs --objective kd or kd+lm")
    objective: str = option(_RECIPE["objective"], group=DISTILLATION, choices=OBJECTIVES,
                            help="lm: next-token loss; kd: KL(teacher || student) at --kd-temperature, times its "
                                 "square; kd+lm: --kd-weight x kd + (1 - --kd-weight) x lm")
    kd_temperature: float = option(_RECIPE["kd_temperature"], group=DISTILLATION,
                                   help="softmax temperature of the distillation loss")
    kd_weight: float = option(_RECIPE["kd_weight"], group=DISTILLATION, help="the KD term's share of kd+lm")
    checkpoint_every: int = option(100, group=RUN, help="steps between checkpoints")
    resume: bool = option(False, group=RUN, help="continue from the newest checkpoint in OUT-checkpoints")

    def recipe(self) -> HealRecipe:
        """The healing recipe these options give (it checks its own values)."""
        return HealRecipe(**{name: getattr(self, name) for name in _RECIPE if hasattr(self, name)})


def heal_to(config: HealConfig | None = None, /, **fields):
    """Heal a model with LoRA (QLoRA with quantize="4bit") and save the merged result, as `depthcut
    heal` does: checkpoints in `OUT-checkpoints` (kept for `resume` when a run fails), removed at the
    end. Takes a `HealConfig`, or its fields: `heal_to(model="pruned", data="c4", out="healed",
    steps=200, seq_len=256, batch_size=8)`. Returns the `HealResult`.
    """
    from depthcut.healing.run import heal_to as run_heal

    config = make_config(HealConfig, config, fields)
    return run_heal(config.model, config.data, config.out, config.recipe(), text_field=config.text_field,
                    dtype=config.dtype, device=config.device, layer_path=config.layer_path,
                    trust_remote_code=config.trust_remote_code, checkpoint_every=config.checkpoint_every,
                    resume=config.resume, force=config.force, progress=not config.quiet,
                    teacher_spec=config.teacher)
