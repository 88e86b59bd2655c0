"""The configs of the commands: one dataclass per command, each field one command-line option
(`depthcut.pipeline.options`), shared groups of options as mixins.

This module imports no torch, so that the command line is built, and its mistakes answered, at once
(`depthcut --help` in well under a second); the choices and help of plugin options come from the
registries' declarations (`depthcut.registry`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from depthcut.errors import DepthcutError
from depthcut.healing.recipe import MIXED_PRECISION, OBJECTIVES, HealRecipe
from depthcut.io.data import DATA_DIR_ENV, NAMED_CORPORA, second_domain
from depthcut.metrics import DEFAULT_METRICS, METRICS, TOKEN_POSITIONS
from depthcut.model.source import refuse_misspelled_builtin
from depthcut.pipeline.options import check_fields, comma_list, option
from depthcut.pipeline.search_choice import search_choice, search_width
from depthcut.repair import REPAIRS
from depthcut.strategies import STRATEGIES

DATA_HELP = ("calibration text: .txt/.jsonl/.json/.parquet file or folder, hf:NAME[:CONFIG][:SPLIT], or a named "
             f"corpus ({', '.join(NAMED_CORPORA)}: read from ${DATA_DIR_ENV}, which defaults to ../shared/data beside "
             "the project; else from the hub)")
# evaluation.tasks.PRESETS["retained"], written out here: importing it would import datasets (tested to agree)
RETAINED_HELP = ("retained (the depth-pruning papers' set: arc_challenge, arc_easy, boolq, hellaswag, openbookqa, "
                 "piqa, winogrande, and WikiText-2 perplexity: wikitext)")
DTYPE_HELP = ("auto (default: what the device computes natively: bfloat16 on GPUs and on CPUs with AVX512-BF16/AMX, "
              "else float32), checkpoint (the stored dtype), float32, bfloat16 or float16")


def model_name(text: str) -> str:
    """A MODEL as the parser reads it: a misspelled built-in name is refused with a suggestion at once,
    before argparse's complaint about a missing option (`depthcut prune smolm2-135m`)."""
    try:
        refuse_misspelled_builtin(text)
    except DepthcutError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


@dataclass(kw_only=True)
class ModelOptions:
    model: str = option(positional=True, metavar="MODEL", parse=model_name,
                        help="a local HF folder, a hub id, a .gguf file, or the built-in name smollm2-135m")
    dtype: str = option("auto", help=DTYPE_HELP, show_default=False)
    device: str = option("auto", help="auto (default: cuda where available, else cpu), cpu, cuda or cuda:N",
                         show_default=False)
    layer_path: str | None = option(None, help="dotted path of the decoder layer list when it cannot be found "
                                               "(e.g. model.layers)")
    trust_remote_code: bool = option(False, help="allow a model's own code to run")

    def __post_init__(self):
        check_fields(self)  # a wrong type or an unknown choice is refused here, naming the field


@dataclass(kw_only=True)
class DeviceMapOption:
    device_map: str | None = option(None, metavar="MAP",
                                    help="spread the model over several GPUs with accelerate (auto, balanced, "
                                         "sequential); --device is then ignored")


DEFAULT_SAMPLES = 64  # calibration sequences (a linear repair's fit may take more: prune_repair)


@dataclass(kw_only=True)
class DataOptions:
    data: str | None = option(None, help=DATA_HELP)
    text_field: str = option("text", help="the field holding text in JSON/parquet data")
    samples: int = option(DEFAULT_SAMPLES, help="number of calibration sequences")
    seq_len: int = option(256, help="tokens per sequence")
    batch_size: int = option(8, help="sequences per forward pass")
    sample_mode: str = option("windows", choices=("windows", "documents"),
                              help="fixed-length windows of concatenated text, or one document per sample")
    seed: int = option(0, help="seed of the sample draw")
    metrics: tuple[str, ...] = option(tuple(DEFAULT_METRICS), parse=comma_list,
                                      help=f"comma-separated metrics: {', '.join(METRICS.names())} (default: all); "
                                           "the all-token ones keep a batch's states at every layer, so drop them to "
                                           "save memory on big models",
                                      show_default=False)
    token_positions: int = option(TOKEN_POSITIONS, metavar="N",
                                  help="tokens per sequence the all-token angular distance reads, evenly spaced "
                                       "(its standard error is reported); 0: every token (more memory)")

    def analysis_options(self) -> dict:
        """The keyword arguments of `depthcut.analysis.passes.analyze` these options give."""
        samples = DEFAULT_SAMPLES if self.samples is None else self.samples  # prune, shrink: the repair sizes it
        return {"samples": samples, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "mode": self.sample_mode, "seed": self.seed, "text_field": self.text_field,
                "metrics": list(self.metrics), "token_positions": self.token_positions}


@dataclass(kw_only=True)
class OutputOptions:
    out: str = option(help="output folder (created; must not exist unless --force)")
    force: bool = option(False, help="replace an existing output folder")
    quiet: bool = option(False, help="no progress bars")


CANDIDATES, VALIDATION, SHRINK_HEALING = "candidates", "validation", "healing the winner"


@dataclass(kw_only=True)
class ValidationSources:
    """The text a cut is scored on by its KL from the unpruned model (`analyze --search`; and below)."""

    validate: tuple[str, ...] = option((), parse=comma_list, group=VALIDATION, metavar="DATA[,DATA]",
                                       help="validation text, as DATA (c4, wikitext, a file, ...); default: the "
                                            "documents of --data held out from every fit and, where the data "
                                            "folder has it, a second domain (WikiText-2 validation beside C4); "
                                            "give one source to judge by it alone", show_default=False)
    validation_windows: int = option(32, group=VALIDATION, help="windows of validation text per source")
    aggregate: str = option("worst", group=VALIDATION, choices=("worst", "mean"),
                            help="over several --validate sources: judge by the worst or the mean")

    def validation_sources(self) -> tuple[str, ...]:
        """--validate, else the held-out documents of --data and a second domain where one is at hand."""
        if self.validate:
            return self.validate
        primary = self.data or "c4"
        second = second_domain(primary)
        return (primary, second) if second else (primary,)


@dataclass(kw_only=True)
class ValidationOptions(ValidationSources):
    """How a training-free repair is judged against the plain cut on text no fit saw (`shrink`, and
    `prune --repair`)."""

    margin: float = option(2.0, group=VALIDATION,
                           help="a repair counts as better only where its KL from the unpruned model is lower than "
                                "the plain cut's by more than this many standard errors (paired over windows), and "
                                "no source's loss is higher by more than as many")


SEARCH = "the search (--search)"


@dataclass(kw_only=True)
class AnalyzeConfig(DeviceMapOption, ValidationSources, OutputOptions, DataOptions, ModelOptions):
    data: str = option(help=DATA_HELP)
    stream: bool = option(False, help="hold one decoder layer in memory at a time, reading it from the safetensors "
                                      "shards (for models bigger than memory; automatic when a local model would "
                                      "not fit)")
    spill_dir: str | None = option(None, metavar="DIR",
                                   help="where --stream writes the all-token states (default: the temp folder; the "
                                        "space needed is checked first)")
    search: str = option("none", group=SEARCH, parse=search_choice, metavar="greedy|beam:K|none",
                         help="also remove one layer at a time, each step the one whose removal raises the KL from "
                              "the unpruned model on the validation windows least (beam:K keeps the K best partial "
                              "cuts): analysis.json keeps the order and each step's KL, heatmap.png their curve; "
                              "`prune --analysis FILE --strategy search --drop k` removes its first k layers")
    search_drop: int | None = option(None, group=SEARCH, metavar="N",
                                     help="the layers the search removes (default: half of them)")
    validation_windows: int = option(4, group=VALIDATION,
                                     help="windows of validation text per source, every trial of the search scored on them")

    def __post_init__(self):
        super().__post_init__()
        search_width(self.search)


WHAT = "what to remove"
REPAIR_SAMPLES_HELP = ("number of calibration sequences (default 64; a linear repair's fit takes enough for 16 "
                       "tokens per row of its d x d map: more on wide models)")


def _strategy_help() -> str:
    described = "; ".join(f"{name}: {STRATEGIES.description(name)}" for name in STRATEGIES.names())
    return f"how to choose them: {', '.join(STRATEGIES.names())} (default: angular). {described}"


def _repair_help() -> str:
    described = "; ".join(f"{name}: {REPAIRS.description(name)}" for name in REPAIRS.names())
    return ("repair the cut without training, folded into the weights (docs/repair.md), fitted on --data (default c4) "
            "with the original model (streamed one layer at a time with --stream or a .gguf --out). " + described)


@dataclass(kw_only=True)
class PruneConfig(ValidationOptions, OutputOptions, DataOptions, ModelOptions):
    samples: int | None = option(None, help=REPAIR_SAMPLES_HELP, show_default=False)
    drop: int | None = option(None, group=WHAT, help="number of layers to remove")
    strategy: str = option("angular", group=WHAT, help=_strategy_help(), show_default=False,
                           choices=tuple(STRATEGIES.names()))
    layers: str | None = option(None, group=WHAT,
                                help="explicit 0-based layers: a half-open block 21:29, or 3,7,12")
    analysis: str | None = option(None, group=WHAT,
                                  help="an analysis.json from `depthcut analyze` (else --data is analyzed)")
    repair: str = option("none", group=WHAT, choices=("none", *REPAIRS.names()), help=_repair_help(),
                         show_default=False)
    allow_unknown_config: tuple[str, ...] = option(
        (), group=WHAT, parse=comma_list, metavar="FIELD[,FIELD]",
        help="config fields that look as if they described layer positions but that you know do not: the cut goes "
             "on and depthcut.json records them (by default such a field stops the prune)")
    repair_policy: str = option("keep", group=WHAT, choices=("keep", "warn", "refuse"),
                                help="when the repair does not beat the plain cut on validation text (below): keep "
                                     "the plain cut and say why (default), warn and write the repair anyway, or "
                                     "refuse (exit 2, nothing written). A streamed repair (--stream, a .gguf --out) is "
                                     "not validated: the model is never loaded", show_default=False)
    stream: bool = option(False, group=WHAT,
                          help="rewrite the safetensors shards one tensor at a time without loading the model "
                               "(automatic for a sharded folder when no analysis or repair has to run); with "
                               "--repair, its statistics are gathered one layer at a time")


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
    teacher: str | None = option(None, group=DISTILLATION, metavar="MODEL", parse=model_name,
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


MEASURE = "what to measure"


@dataclass(kw_only=True)
class MeasureOptions:
    """Tasks and held-out loss, shared by `eval` and `sweep`."""

    tasks: tuple[str, ...] = option((), parse=comma_list, group=MEASURE,
                                    help="comma-separated lm-evaluation-harness task, group or tag names, "
                                         f"{RETAINED_HELP}, or task YAML files (docs/tasks.md; "
                                         "a task file is code: its !function entries run the Python files beside it, "
                                         "so use only task files you trust)")
    limit: int | None = option(None, group=MEASURE,
                               help="a seeded random subset of N documents per task (per subtask of a group; "
                                    "default: every document)")
    num_fewshot: int | None = option(None, group=MEASURE, help="override each task's default shots (default: the "
                                                               "task's own)")
    loss: str | None = option(None, group=MEASURE, metavar="DATA", help="held-out text for the loss (e.g. c4)")
    loss_samples: int = option(64, group=MEASURE, help="windows of held-out text")
    loss_seq_len: int = option(512, group=MEASURE, help="tokens per loss window")

    def evaluation_options(self) -> dict:
        """The keyword arguments of `depthcut.evaluation.evaluate` these options give."""
        return {"loss_data": self.loss, "loss_samples": self.loss_samples, "loss_seq_len": self.loss_seq_len,
                "limit": self.limit, "num_fewshot": self.num_fewshot}


@dataclass(kw_only=True)
class EvalConfig(DeviceMapOption, MeasureOptions, ModelOptions):
    seed: int = option(0, help="seed of --limit and lm-eval's few-shot draws")
    batch_size: int = option(16, help="contexts per forward pass")
    scoring: str = option("packed", choices=("packed", "shared", "full"),
                          help="packed: a context and all its choices in one masked row (default); shared: each "
                               "context once, its KV cache reused per choice; full: one sequence per choice",
                          show_default=False)
    log_samples: bool = option(False, help="add every item's scores to the output")
    max_length: int | None = option(None, metavar="N",
                                    help="the longest context scored, WikiText-2's rolling perplexity windows "
                                         "included; a longer one keeps its last N tokens, as in lm-eval's hf model "
                                         "(default: the model's own, 8192 for SmolLM2: on 2 CPU cores about two "
                                         "minutes a WikiText-2 page)", show_default=False)
    baseline: str | None = option(None, metavar="MODEL", parse=model_name,
                                  help="the model before pruning, evaluated the same way: each task's score is also "
                                       "given as a share of the baseline's (%% retained; on average the ratio of the "
                                       "averages), with a standard error")
    out: str = option(help="the JSON result file (must not exist unless --force)")
    force: bool = option(False, help="replace an existing result file")
    quiet: bool = option(False, help="no progress bars")


DEPTH, HEALING = "what to sweep", "healing"


@dataclass(kw_only=True)
class SweepConfig(DataOptions, MeasureOptions, ModelOptions):
    drop: str | None = option(None, group=DEPTH, help="drop counts, e.g. 0,2,4,8 (0 is the unpruned model)")
    fractions: str | None = option(None, group=DEPTH, help="fractions of layers START:STOP:STEP, e.g. 0:0.6:0.1")
    strategies: tuple[str, ...] = option(("angular", "deepest"), parse=comma_list, group=DEPTH,
                                         help=f"comma-separated strategies: {', '.join(STRATEGIES.names())}")
    repair: tuple[str, ...] = option(("none",), parse=comma_list, group=DEPTH,
                                     help=f"training-free repairs to compare: none, {', '.join(REPAIRS.names())} "
                                          "(fitted on --data with the unpruned model; with --heal, each is also "
                                          "followed by LoRA)")
    loss_samples: int = option(32, group=MEASURE, help="windows of held-out text")
    loss_seq_len: int = option(256, group=MEASURE, help="tokens per loss window")
    eval_batch_size: int = option(32, group=MEASURE, help="contexts per scoring pass")
    tolerance: float = option(0.05, group=MEASURE, help="relative accuracy loss accepted")
    heal: bool = option(False, group=HEALING, help="also heal every pruned model with LoRA")
    heal_objective: tuple[str, ...] = option(("lm",), parse=comma_list, group=HEALING,
                                             help="the heals to compare, comma-separated: lm (next-token loss), kd "
                                                  "(distillation from the unpruned model), kd+lm")
    heal_after: tuple[str, ...] | None = option(None, parse=comma_list, group=HEALING,
                                                help="the --repair methods that heals follow, e.g. none,lstsq "
                                                     "(default: every one)", show_default=False)
    heal_kd_temperature: float = option(_RECIPE["kd_temperature"], group=HEALING, help="distillation temperature")
    heal_kd_weight: float = option(_RECIPE["kd_weight"], group=HEALING, help="the KD term's share of the kd+lm loss")
    heal_data: str | None = option(None, group=HEALING, help="healing text (default: --data)")
    heal_steps: int | None = option(_RECIPE["steps"], group=HEALING, help="steps per heal (default: 5000)")
    heal_tokens: int | None = option(_RECIPE["tokens"], group=HEALING, help="tokens per heal, instead of steps")
    # A sweep heals many models: shorter sequences and batches than the paper's single heal by default.
    heal_seq_len: int = option(256, group=HEALING, help="tokens per healing sequence")
    heal_batch_size: int = option(8, group=HEALING, help="sequences per healing step")
    heal_rank: int = option(_RECIPE["rank"], group=HEALING, help="LoRA rank")
    heal_lr: float = option(_RECIPE["lr"], group=HEALING, help="peak learning rate")
    heal_warmup_steps: int = option(_RECIPE["warmup_steps"], group=HEALING, help="linear warmup steps")
    heal_heldout_windows: int = option(_RECIPE["heldout_windows"], group=HEALING, help="held-out windows for each heal's before/after loss")
    heal_mixed_precision: str = option(_RECIPE["mixed_precision"], group=HEALING, choices=MIXED_PRECISION,
                                       help="autocast while healing (default auto: bf16 where native, else no)",
                                       show_default=False)
    data: str = option("c4", help=DATA_HELP)
    keep_models: bool = option(False, help="save every pruned/healed model under OUT/models")
    out: str = option(help="the sweep folder; a rerun continues it")
    force: bool = option(False, help="discard the folder's earlier results and start afresh")
    quiet: bool = option(False, help="no progress bars")

    def recipe(self) -> HealRecipe | None:
        """The healing recipe of every healed point (None without --heal)."""
        if not self.heal:
            return None
        return HealRecipe(rank=self.heal_rank, lr=self.heal_lr, warmup_steps=self.heal_warmup_steps,
                          steps=self.heal_steps, tokens=self.heal_tokens, seq_len=self.heal_seq_len,
                          batch_size=self.heal_batch_size, seed=self.seed, mixed_precision=self.heal_mixed_precision,
                          heldout_windows=self.heal_heldout_windows, kd_temperature=self.heal_kd_temperature,
                          kd_weight=self.heal_kd_weight)

    def heals(self) -> list[bool | str]:
        """The healed dimension of the plan: False (no heal), then each --heal-objective."""
        return [False, *dict.fromkeys(self.heal_objective)] if self.heal else [False]


@dataclass(kw_only=True)
class ReportConfig:
    folder: str = option(positional=True, help="a sweep's --out folder")
    tolerance: float = option(0.05, help="relative accuracy loss accepted")

    def __post_init__(self):
        check_fields(self)


@dataclass(kw_only=True)
class GenerateConfig(ModelOptions):
    prompt: tuple[str, ...] = option(positional=True, help="one or more prompts")
    max_new_tokens: int = option(40, help="tokens generated per prompt")
    chat: bool = option(False, help="wrap each prompt in the model's chat template")


@dataclass(kw_only=True)
class ShrinkConfig(DeviceMapOption, ValidationOptions, OutputOptions, DataOptions, ModelOptions):
    samples: int | None = option(None, help=REPAIR_SAMPLES_HELP, show_default=False)
    drop: int | None = option(None, group=CANDIDATES, exclusive="size", help="number of layers to remove")
    fraction: float | None = option(None, group=CANDIDATES, exclusive="size",
                                    help="fraction of the layers to remove (rounded to a layer count)")
    params: str | None = option(None, group=CANDIDATES, exclusive="size", metavar="P",
                                help="the most parameters the smaller model may have (e.g. 100M, 1.5B, 95000000): "
                                     "as few layers are removed as reach it")
    candidates: int = option(4, group=CANDIDATES,
                             help="the best N contiguous blocks by angular distance to try (the deepest block and "
                                  "Block Influence's layers are tried too)")
    repairs: tuple[str, ...] = option(("none", *REPAIRS.names()), parse=comma_list, group=CANDIDATES,
                                      help="the training-free repairs to try on every candidate (a scattered one gap by gap), "
                                           f"comma-separated: {', '.join(REPAIRS.names())}, or none (the plain cut, "
                                           "always tried) (default: all: "
                                           f"{','.join(('none', *REPAIRS.names()))})", show_default=False)
    screen_windows: int = option(4, group=CANDIDATES,
                                 help="score every candidate on the first N validation windows per source, and only "
                                      "the --finalists best blocks on them all, cosine fitted for those alone (0: "
                                      "every candidate on every window)")
    finalists: int = option(2, group=CANDIDATES, help="the blocks the screening keeps")
    search: str = option("none", group=CANDIDATES, parse=search_choice, metavar="greedy|beam:K|none",
                         help="a candidate found on the output: greedy removes one layer at a time, each step the "
                              "one whose removal raises the KL on the screening windows least (drop x layers trials "
                              "on them: about 19 analysis passes at 8 of 30 layers, so not yet the default; left "
                              "out where --budget cannot afford it); beam:K keeps the K best partial cuts a step "
                              "(about K times the trials); none: only the blocks and Block Influence's layers")
    allow_unknown_config: tuple[str, ...] = option((), parse=comma_list, metavar="FIELD[,FIELD]",
                                                   help="as for prune")
    data: str = option("c4", help="calibration text (analysis and the repairs' fit), as DATA")
    heal_steps: int | None = option(None, group=SHRINK_HEALING, metavar="K",
                                    help="heal the training-free winner with K LoRA steps on --data's training "
                                         "documents; the heal is kept only where it beats the unhealed winner on "
                                         "validation as a repair must (HF folder output)")
    objective: str = option("lm", group=SHRINK_HEALING, choices=OBJECTIVES,
                            help="the heal's loss: lm (next-token), kd (distillation from the unpruned model), kd+lm")
    heal_seq_len: int = option(256, group=SHRINK_HEALING, help="tokens per healing sequence")
    heal_batch_size: int = option(8, group=SHRINK_HEALING, help="sequences per healing step")
    heal_lr: float = option(_RECIPE["lr"], group=SHRINK_HEALING, help="peak learning rate of the heal")
    budget: float | None = option(None, metavar="MINUTES",
                                  help="the time the choice may take: the candidates and validation windows are cut "
                                       "to fit, from the analysis pass's measured speed")
    tasks: tuple[str, ...] = option((), parse=comma_list, metavar="TASK[,TASK]",
                                    help="evaluate the winner against MODEL on these tasks (as `depthcut eval "
                                         "--baseline`), e.g. retained; the results go to OUT/eval.json",
                                    show_default=False)
    limit: int | None = option(None, help="with --tasks: a seeded random subset of N documents per task")
    stream: bool = option(False, help="layer by layer: every phase (analysis, repair sums, the scoring of every "
                                      "option at once) holds one decoder layer at a time, read from the "
                                      "safetensors shards or dequantized from the GGUF; automatic where a local "
                                      "model would not fit in memory")
    spill_dir: str | None = option(None, metavar="DIR",
                                   help="where --stream keeps what does not fit in memory (default: the temp folder)")

    def recipe(self) -> HealRecipe:
        """The winner's heal: the paper's LoRA settings, a warmup of a tenth of the (few) steps."""
        return HealRecipe(steps=self.heal_steps, seq_len=self.heal_seq_len, batch_size=self.heal_batch_size,
                          lr=self.heal_lr, warmup_steps=max(1, (self.heal_steps or 0) // 10), seed=self.seed,
                          objective=self.objective, heldout_windows=8)

    def __post_init__(self):
        super().__post_init__()
        search_width(self.search)
