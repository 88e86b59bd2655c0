"""`evaluate_to`: what `depthcut eval` writes, from Python: task accuracy and held-out loss of a
model, saved as one JSON file with provenance."""

from __future__ import annotations

from dataclasses import dataclass

from depthcut.errors import DepthcutError
from depthcut.io.claims import claimed_for_writing
from depthcut.io.output_checks import check_no_overlap
from depthcut.pipeline.common import DeviceMapOption, ModelOptions, check_positive, load
from depthcut.pipeline.options import comma_list, make_config, option

MEASURE = "what to measure"


@dataclass(kw_only=True)
class MeasureOptions:
    """Tasks and held-out loss, shared by `eval` and `sweep`."""

    tasks: tuple[str, ...] = option((), parse=comma_list, group=MEASURE,
                                    help="comma-separated lm-evaluation-harness task, group or tag names, or task "
                                         "YAML files (docs/tasks.md; a task file is code: its !function entries "
                                         "run the Python files beside it, so use only task files you trust)")
    limit: int | None = option(None, group=MEASURE,
                               help="a seeded random subset of N documents per task (per subtask of a group)")
    num_fewshot: int | None = option(None, group=MEASURE, help="override each task's default shots")
    loss: str | None = option(None, group=MEASURE, metavar="DATA", help="held-out text for the loss (e.g. c4)")
    loss_samples: int = option(64, group=MEASURE, help="windows of held-out text")
    loss_seq_len: int = option(512, group=MEASURE, help="tokens per loss window")

    def check_measures(self) -> None:
        """Unknown task names and impossible numbers fail before any model loads."""
        from depthcut.evaluation.tasks import get_task

        for name in self.tasks:
            get_task(name)
        check_positive(limit=self.limit, loss_samples=self.loss_samples, loss_seq_len=self.loss_seq_len)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise DepthcutError("--num-fewshot must be 0 or more")

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
    out: str = option(help="the JSON result file (must not exist unless --force)")
    force: bool = option(False, help="replace an existing result file")
    quiet: bool = option(False, help="no progress bars")


def evaluate_to(config: EvalConfig | None = None, /, **fields) -> dict:
    """Evaluate a model and write the JSON result file, as `depthcut eval` does.

    Takes an `EvalConfig`, or its fields: `evaluate_to(model="pruned", tasks=("arc_easy",), loss="c4",
    out="eval.json")`. Returns the result written.
    """
    config = make_config(EvalConfig, config, fields)
    check_no_overlap([config.model, config.loss, *config.tasks], config.out)
    if not config.tasks and not config.loss:
        raise DepthcutError("nothing to evaluate: give --tasks and/or --loss")
    config.check_measures()
    check_positive(batch_size=config.batch_size)
    with claimed_for_writing(config.out, config.force, kind="file"):
        return _evaluate(config)


def _evaluate(config: EvalConfig) -> dict:
    from depthcut.evaluation import evaluate
    from depthcut.io.atomic import atomic_output_file, write_json
    from depthcut.models import resolve_model
    from depthcut.output import environment

    resolve_model(config.model)
    model, tokenizer, source = load(config, quiet=config.quiet)
    result = {}
    if config.tasks or config.loss:
        result = evaluate(model, tokenizer, list(config.tasks), seed=config.seed, batch_size=config.batch_size,
                          scoring=config.scoring, log_samples=config.log_samples, progress=not config.quiet,
                          **config.evaluation_options())
    result["model"] = source.as_dict()
    result["environment"] = environment()
    with atomic_output_file(config.out, config.force) as staging:
        write_json(staging, result)
    return result
