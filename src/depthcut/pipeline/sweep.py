"""`sweep_to`: the paper's experiment from Python, as `depthcut sweep` runs it: prune (and heal) at
many depths with several strategies, measure each point, append it to results.jsonl, then draw the
figures and write report.html."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.healing.recipe import MIXED_PRECISION, HealRecipe
from depthcut.io.claims import claimed_for_writing
from depthcut.io.output_checks import check_no_overlap
from depthcut.pipeline.common import DataOptions, ModelOptions, check_data_options, load, run_analysis
from depthcut.pipeline.evaluate import MEASURE, MeasureOptions
from depthcut.pipeline.options import comma_list, make_config, option

DEPTH, HEALING = "what to sweep", "healing"


@dataclass(kw_only=True)
class SweepConfig(DataOptions, MeasureOptions, ModelOptions):
    drop: str | None = option(None, group=DEPTH, help="drop counts, e.g. 0,2,4,8 (0 is the unpruned model)")
    fractions: str | None = option(None, group=DEPTH, help="fractions of layers START:STOP:STEP, e.g. 0:0.6:0.1")
    strategies: tuple[str, ...] = option(("angular", "deepest"), parse=comma_list, group=DEPTH,
                                         help="comma-separated strategies")
    repair: tuple[str, ...] = option(("none",), parse=comma_list, group=DEPTH,
                                     help="training-free repairs to compare, e.g. none,lstsq,cosine,magnitude "
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
    heal_kd_temperature: float = option(1.0, group=HEALING, help="distillation temperature")
    heal_kd_weight: float = option(0.5, group=HEALING, help="the KD term's share of the kd+lm loss")
    heal_data: str | None = option(None, group=HEALING, help="healing text (default: --data)")
    heal_steps: int | None = option(None, group=HEALING, help="steps per heal (default: 5000)")
    heal_tokens: int | None = option(None, group=HEALING, help="tokens per heal, instead of steps")
    heal_seq_len: int = option(256, group=HEALING, help="tokens per healing sequence")
    heal_batch_size: int = option(8, group=HEALING, help="sequences per healing step")
    heal_rank: int = option(64, group=HEALING, help="LoRA rank")
    heal_lr: float = option(3e-4, group=HEALING, help="peak learning rate")
    heal_warmup_steps: int = option(100, group=HEALING, help="linear warmup steps")
    heal_heldout_windows: int = option(32, group=HEALING, help="held-out windows for each heal's before/after loss")
    heal_mixed_precision: str = option("auto", group=HEALING, choices=MIXED_PRECISION,
                                       help="autocast while healing (default auto: bf16 where native, else no)",
                                       show_default=False)
    data: str = option("c4", help="calibration text: .txt/.jsonl/.json/.parquet file or folder, "
                                  "hf:NAME[:CONFIG][:SPLIT], or c4")
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

    def settings(self) -> dict:
        """What must not change between runs that share a results.jsonl. Drops, strategies, repairs and
        heal objectives may: they are the sweep's dimensions, and a rerun adds the points it lacks."""
        from depthcut.models import resolve_device
        from depthcut.precision import choose_dtype

        recipe = self.recipe()
        return {
            "model": self.model, "dtype": self.dtype, "data": self.data, "samples": self.samples,
            "seq_len": self.seq_len, "sample_mode": self.sample_mode, "seed": self.seed, "tasks": ",".join(self.tasks),
            "limit": self.limit, "num_fewshot": self.num_fewshot, "loss": self.loss, "loss_samples": self.loss_samples,
            "loss_seq_len": self.loss_seq_len, "heal": recipe.as_dict() if recipe else None,
            "heal_data": (self.heal_data or self.data) if recipe else None,
            # Points measured in another dtype are not comparable: a rerun on another kind of machine is refused.
            "dtype_resolved": choose_dtype(self.dtype, resolve_device(self.device)).name,
        }


def _check(config: SweepConfig) -> None:
    from depthcut.strategies import STRATEGIES
    from depthcut.sweep.report import check_tolerance

    if not config.tasks and not config.loss:
        raise DepthcutError("nothing to measure: give --tasks and/or --loss")
    config.check_measures()
    for name in config.strategies:
        STRATEGIES.get(name)
    if not config.repair:
        raise DepthcutError("--repair names no method (none for plain pruning)")
    for name in config.repair:
        if name != "none":
            from depthcut.repair import REPAIRS

            REPAIRS.get(name)
    check_data_options(config)
    check_tolerance(config.tolerance)
    _check_heals(config)
    config.recipe()  # its own checks


def _check_heals(config: SweepConfig) -> None:
    from depthcut.healing.recipe import OBJECTIVES

    unknown = [name for name in config.heal_objective if name not in OBJECTIVES]
    if unknown or not config.heal_objective:
        raise DepthcutError(f"--heal-objective takes {', '.join(OBJECTIVES)}, comma-separated; got "
                            f"{','.join(config.heal_objective) or 'nothing'}")
    if config.heal_after is not None:
        stray = [name for name in config.heal_after if name not in config.repair]
        if stray or not config.heal_after:
            raise DepthcutError(f"--heal-after names repairs of --repair ({','.join(config.repair)}); got "
                                f"{','.join(config.heal_after) or 'nothing'}")
    if not config.heal and (config.heal_after is not None or config.heal_objective != ("lm",)):
        raise DepthcutError("--heal-objective and --heal-after choose among heals: add --heal")


def _sweep_analysis(config: SweepConfig, folder: Path, model, tokenizer, source):
    """The analysis that chooses the blocks: the one the folder's results hold, else a new one."""
    from depthcut.result import Analysis
    from depthcut.sweep.results import ResultsLog
    from depthcut.sweep.run import strategies_needing_analysis

    if not strategies_needing_analysis(config.strategies):
        return None
    saved = ResultsLog(folder).analysis()
    if saved is not None:
        return Analysis.from_dict(saved)
    print(f"sweep: analyzing {config.data} ({config.samples} samples x {config.seq_len} tokens) to choose blocks",
          file=sys.stderr)
    analysis = run_analysis(model, tokenizer, config, config.layer_path, progress=not config.quiet)
    analysis.metadata["model"] = source.as_dict()
    return analysis


def _repair_data(config: SweepConfig, tokenizer):
    """The calibration samples every training-free repair of the sweep is fitted on (None without one)."""
    if all(name == "none" for name in config.repair):
        return None
    from depthcut.analysis import as_calibration

    return as_calibration(config.data, tokenizer, config.samples, config.seq_len, config.sample_mode, config.seed,
                          config.text_field)


def sweep_to(config: SweepConfig | None = None, /, **fields) -> Path:
    """Run the sweep into `out` (a rerun with the same settings continues it) and write its report.

    Takes a `SweepConfig`, or its fields: `sweep_to(model="smollm2-135m", out="sweeps/s", drop="0,4,8",
    tasks=("arc_easy",), limit=100, loss="c4")`. Returns the report's path.
    """
    config = make_config(SweepConfig, config, fields)
    check_no_overlap([config.model, config.data, config.loss, config.heal_data, *config.tasks], config.out)
    _check(config)
    with claimed_for_writing(config.out, config.force, may_exist=True):
        return _sweep(config)


def _sweep(config: SweepConfig) -> Path:
    from depthcut.data import load_texts
    from depthcut.io.atomic import continued_output_dir
    from depthcut.layers import find_layer_stack
    from depthcut.models import check_context_length, resolve_model
    from depthcut.sweep.report import build_report
    from depthcut.sweep.results import ResultsLog
    from depthcut.sweep.run import SweepPlan, parse_drops, run_sweep

    recipe, settings, out = config.recipe(), config.settings(), Path(config.out)
    if ResultsLog(out).settings() is not None and not config.force:
        ResultsLog(out).start(settings)  # raises if the settings differ
    resolve_model(config.model)
    model, tokenizer, source = load(config, quiet=config.quiet)
    num_layers = len(find_layer_stack(model, config.layer_path))
    plan = SweepPlan(parse_drops(config.drop, config.fractions, num_layers), list(config.strategies), config.heals(),
                     list(dict.fromkeys(config.repair)), list(config.heal_after) if config.heal_after else None)
    if recipe is not None:
        check_context_length(model, recipe.seq_len, "--heal-seq-len")
    heal_data = load_texts(config.heal_data or config.data) if recipe else None
    # --force on an existing folder: a fresh one beside it replaces it at the end; the old stays until then.
    with continued_output_dir(out, config.force) as folder:
        analysis = _sweep_analysis(config, folder, model, tokenizer, source)
        evaluation = {"tasks": list(config.tasks), "seed": config.seed, "batch_size": config.eval_batch_size,
                      "progress": not config.quiet, **config.evaluation_options()}
        run_sweep(model, tokenizer, folder, plan, settings, evaluation, analysis=analysis, heal_recipe=recipe,
                  heal_data=heal_data, repair_data=_repair_data(config, tokenizer), keep_models=config.keep_models,
                  seed=config.seed, progress=not config.quiet)
        build_report(folder, config.tolerance)
    return out / "report.html"


def sweep_summary(out: str | Path) -> list[str]:
    """The lines `depthcut sweep` prints: the table of points and where the outputs are."""
    from depthcut.sweep.progress import summary_table
    from depthcut.sweep.results import ResultsLog

    out = Path(out)
    settings = ResultsLog(out).settings() or {}
    tasks = [t for t in (settings.get("tasks") or "").split(",") if t]
    return [summary_table(list(ResultsLog(out).points().values()), tasks), f"results: {out / 'results.jsonl'}",
            f"report:  {out / 'report.html'}", f"figures: {out / 'figures'}"]
