"""`sweep_to`: the paper's experiment from Python, as `depthcut sweep` runs it: prune (and heal) at
many depths with several strategies, measure each point, append it to results.jsonl, then draw the
figures and write report.html."""

from __future__ import annotations

import logging
from pathlib import Path

from depthcut.analysis.calibration import as_calibration
from depthcut.analysis.result import Analysis
from depthcut.errors import DepthcutError
from depthcut.healing.recipe import OBJECTIVES
from depthcut.io.atomic import continued_output_dir
from depthcut.io.claims import claimed_for_writing
from depthcut.io.data import load_texts
from depthcut.io.output_checks import check_no_overlap
from depthcut.model.distributed import is_main_process
from depthcut.model.layers import find_layer_stack
from depthcut.model.loading import check_context_length, resolve_device, resolve_model
from depthcut.model.precision import choose_dtype
from depthcut.pipeline.common import check_data_options, load, run_analysis
from depthcut.pipeline.configs import SweepConfig
from depthcut.pipeline.evaluate import check_measures
from depthcut.pipeline.options import make_config
from depthcut.repair import REPAIRS
from depthcut.strategies import STRATEGIES
from depthcut.sweep.progress import summary_table
from depthcut.sweep.report import build_report, check_tolerance
from depthcut.sweep.results import ResultsLog
from depthcut.sweep.run import SweepPlan, parse_drops, run_sweep, strategies_needing_analysis

log = logging.getLogger(__name__)


def sweep_settings(config: SweepConfig) -> dict:
    """What must not change between runs that share a results.jsonl. Drops, strategies, repairs and
    heal objectives may: they are the sweep's dimensions, and a rerun adds the points it lacks."""

    recipe = config.recipe()
    return {
        "model": config.model, "dtype": config.dtype, "data": config.data, "samples": config.samples,
        "seq_len": config.seq_len, "sample_mode": config.sample_mode, "seed": config.seed, "tasks": ",".join(config.tasks),
        "limit": config.limit, "num_fewshot": config.num_fewshot, "loss": config.loss, "loss_samples": config.loss_samples,
        "loss_seq_len": config.loss_seq_len, "heal": recipe.as_dict() if recipe else None,
        "heal_data": (config.heal_data or config.data) if recipe else None,
        # Points measured in another dtype are not comparable: a rerun on another kind of machine is refused.
        "dtype_resolved": choose_dtype(config.dtype, resolve_device(config.device)).name,
    }




def _check(config: SweepConfig) -> None:

    if not config.tasks and not config.loss:
        raise DepthcutError("nothing to measure: give --tasks and/or --loss")
    check_measures(config)
    for name in config.strategies:
        STRATEGIES.get(name)
    if not config.repair:
        raise DepthcutError("--repair names no method (none for plain pruning)")
    for name in config.repair:
        if name != "none":
            REPAIRS.get(name)
    check_data_options(config)
    check_tolerance(config.tolerance)
    _check_heals(config)
    config.recipe()  # its own checks


def _check_heals(config: SweepConfig) -> None:
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

    if not strategies_needing_analysis(config.strategies):
        return None
    saved = ResultsLog(folder).analysis()
    if saved is not None:
        return Analysis.from_dict(saved)
    log.info("sweep: analyzing %s (%d samples x %d tokens) to choose blocks", config.data, config.samples,
             config.seq_len)
    analysis = run_analysis(model, tokenizer, config, config.layer_path, progress=not config.quiet)
    analysis.metadata["model"] = source.as_dict()
    return analysis


def _repair_data(config: SweepConfig, tokenizer):
    """The calibration samples every training-free repair of the sweep is fitted on (None without one)."""
    if all(name == "none" for name in config.repair):
        return None

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
    with claimed_for_writing(config.out, config.force, may_exist=True, writer=is_main_process()):
        return _sweep(config)


def _sweep(config: SweepConfig) -> Path:

    recipe, settings, out = config.recipe(), sweep_settings(config), Path(config.out)
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
                  seed=config.seed, layer_path=config.layer_path, progress=not config.quiet)
        build_report(folder, config.tolerance)
    return out / "report.html"


def sweep_summary(out: str | Path) -> list[str]:
    """The lines `depthcut sweep` prints: the table of points and where the outputs are."""

    out = Path(out)
    settings = ResultsLog(out).settings() or {}
    tasks = [t for t in (settings.get("tasks") or "").split(",") if t]
    return [summary_table(list(ResultsLog(out).points().values()), tasks), f"results: {out / 'results.jsonl'}",
            f"report:  {out / 'report.html'}", f"figures: {out / 'figures'}"]
