"""The commands: each parses into its config (`depthcut.pipeline.configs`), runs one pipeline
function and prints what it returns.

The pipeline modules are imported inside each `run_*`: they import torch, and the parser is built
from the configs alone so that `--help` and a mistyped option answer without it (docs/architecture.md).
"""

from __future__ import annotations

import inspect

from depthcut.cli.epilogs import (
    EPILOG_ANALYZE,
    EPILOG_EVAL,
    EPILOG_GENERATE,
    EPILOG_HEAL,
    EPILOG_PRUNE,
    EPILOG_REPORT,
    EPILOG_SHRINK,
    EPILOG_SWEEP,
)
from depthcut.pipeline.configs import (
    AnalyzeConfig,
    EvalConfig,
    GenerateConfig,
    HealConfig,
    PruneConfig,
    ReportConfig,
    ShrinkConfig,
    SweepConfig,
)

# name, config, run, help, description (the run function's docstring), epilog; in the order --help lists them
COMMANDS: list[tuple] = []


def command(name: str, config: type, summary: str, epilog: str | None):
    """Register the decorated `run(config)` as the command `name`."""

    def register(run):
        COMMANDS.append((name, config, run, summary, inspect.cleandoc(run.__doc__), epilog))
        return run

    return register


@command("analyze", AnalyzeConfig, "measure layer similarity on calibration data", EPILOG_ANALYZE)
def run_analyze(config: AnalyzeConfig) -> None:
    """One forward pass computes the angular distance between the residual stream entering layer l and entering
    layer l+n for every n and l (last token and all tokens), and ShortGPT's Block Influence."""
    # deferred: torch is imported once a command runs, not to parse its arguments (start-up)
    from depthcut.model.distributed import is_main_process
    from depthcut.pipeline.analyze import analysis_summary, analyze_to

    analysis = analyze_to(config)
    if is_main_process():
        print("\n".join(analysis_summary(analysis, config.out)))


@command("prune", PruneConfig, "remove layers and save a standard HF model", EPILOG_PRUNE)
def run_prune(config: PruneConfig) -> None:
    """Remove N layers chosen by a strategy, or the layers named by --layers."""
    # deferred: torch is imported once a command runs, not to parse its arguments (start-up)
    from depthcut.pipeline.prune import prune_to

    print("\n".join(prune_to(config).summary()))


@command("shrink", ShrinkConfig, "the best smaller model: candidate cuts x repairs judged on validation text",
         EPILOG_SHRINK)
def run_shrink(config: ShrinkConfig) -> None:
    """Try the best few cuts of the size asked, each plain and with every training-free repair, score each on
    validation text no fit saw (KL from the unpruned model and loss), keep a repair only where it beats the
    plain cut beyond the noise, and write the winner with the decision table in depthcut.json."""
    # deferred: torch is imported once a command runs, not to parse its arguments (start-up)
    from depthcut.evaluation.table import format_table
    from depthcut.pipeline.shrink import shrink_to
    from depthcut.selection.decision_table import decision_table, expectation_lines, size_lines

    result = shrink_to(config)
    print("\n".join([*decision_table(result.provenance["selection"]), *result.summary(),
                     *size_lines(result.provenance), *expectation_lines(result.provenance, config.out)]))
    if result.evaluation is not None:
        print(format_table(result.evaluation))
        print(f"evaluation: {config.out}/eval.json")


@command("eval", EvalConfig, "held-out loss and multiple-choice benchmarks", EPILOG_EVAL)
def run_eval(config: EvalConfig) -> None:
    """Any lm-evaluation-harness task, scored by depthcut's packed scorer as an lm-eval model (the same answers,
    faster), and the mean next-token loss on held-out text."""
    # deferred: torch is imported once a command runs, not to parse its arguments (start-up)
    from depthcut.evaluation.table import format_table
    from depthcut.model.distributed import is_main_process
    from depthcut.pipeline.evaluate import evaluate_to

    result = evaluate_to(config)
    if is_main_process():  # launched as several, the first process prints what they all scored
        print(format_table(result))
        print(f"results: {config.out}")


@command("heal", HealConfig, "LoRA/QLoRA finetuning that repairs a pruned model", EPILOG_HEAL)
def run_heal(config: HealConfig) -> None:
    """Train LoRA adapters with next-token loss on packed text, measure held-out loss before and after, merge, and
    save a plain Hugging Face model."""
    # deferred: torch is imported once a command runs, not to parse its arguments (start-up)
    from depthcut.healing.run import print_heal_summary
    from depthcut.model.distributed import is_main_process
    from depthcut.pipeline.heal import heal_to

    result = heal_to(config)
    if is_main_process():
        print_heal_summary(result, config.out)


@command("sweep", SweepConfig, "the paper's experiment: prune, heal and measure at many depths", EPILOG_SWEEP)
def run_sweep(config: SweepConfig) -> None:
    """For each drop count and strategy, with and without healing: prune, measure held-out loss and task accuracy,
    append to results.jsonl; then draw figures and write report.html."""
    # deferred: torch is imported once a command runs, not to parse its arguments (start-up)
    from depthcut.pipeline.sweep import sweep_summary, sweep_to

    sweep_to(config)
    print("\n".join(sweep_summary(config.out)))


@command("report", ReportConfig, "rebuild a sweep's figures and report.html from results.jsonl", EPILOG_REPORT)
def run_report(config: ReportConfig) -> None:
    """Draw the figures and write report.html again from FOLDER/results.jsonl alone (no model is loaded), e.g.
    with another --tolerance."""
    # deferred: torch is imported once a command runs, not to parse its arguments (start-up)
    from depthcut.pipeline.report import report_to

    print(f"report: {report_to(config)}")


@command("generate", GenerateConfig, "greedy text generation, to compare models by eye", EPILOG_GENERATE)
def run_generate(config: GenerateConfig) -> None:
    """Greedy completions of prompts, to compare models by eye."""
    # deferred: torch is imported once a command runs, not to parse its arguments (start-up)
    from depthcut.pipeline.generate import generate

    for prompt, completion in generate(config).items():
        print(f"> {prompt}\n{completion}\n")
