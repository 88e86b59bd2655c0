"""`evaluate_to`: what `depthcut eval` writes, from Python: task accuracy and held-out loss of a
model, saved as one JSON file with provenance."""

from __future__ import annotations

import dataclasses

from depthcut.errors import DepthcutError
from depthcut.evaluation import evaluate
from depthcut.evaluation.retained import retained
from depthcut.evaluation.tasks import resolve_tasks
from depthcut.io.atomic import atomic_output_file, write_json
from depthcut.io.claims import claimed_for_writing
from depthcut.io.output_checks import check_no_overlap
from depthcut.io.provenance import environment
from depthcut.model.distributed import is_main_process
from depthcut.model.loading import resolve_model
from depthcut.pipeline.common import check_positive, load
from depthcut.pipeline.configs import EvalConfig, MeasureOptions
from depthcut.pipeline.options import make_config


def check_measures(options: MeasureOptions) -> None:
    """Unknown task names and impossible numbers fail before any model loads."""
    resolve_tasks(options.tasks)  # presets expanded, every entry checked
    check_positive(limit=options.limit, loss_samples=options.loss_samples, loss_seq_len=options.loss_seq_len)
    if options.num_fewshot is not None and options.num_fewshot < 0:
        raise DepthcutError("--num-fewshot must be 0 or more")


def evaluate_to(config: EvalConfig | None = None, /, **fields) -> dict:
    """Evaluate a model and write the JSON result file, as `depthcut eval` does.

    Takes an `EvalConfig`, or its fields: `evaluate_to(model="pruned", tasks=("arc_easy",), loss="c4",
    out="eval.json")`. Returns the result written.
    """
    config = make_config(EvalConfig, config, fields)
    check_no_overlap([config.model, config.baseline, config.loss, *config.tasks], config.out)
    if not config.tasks and not config.loss:
        raise DepthcutError("nothing to evaluate: give --tasks and/or --loss")
    check_measures(config)
    check_positive(batch_size=config.batch_size)
    if config.max_length is not None and config.max_length < 2:  # before any model loads
        raise DepthcutError(f"--max-length must be at least 2 tokens, got {config.max_length}")
    with claimed_for_writing(config.out, config.force, kind="file", writer=is_main_process()):
        return evaluate_with(config)


def evaluate_with(config: EvalConfig) -> dict:
    """`evaluate_to`'s work once `--out` is claimed (`depthcut shrink --tasks` calls it too)."""
    resolve_model(config.model)
    if config.baseline:
        resolve_model(config.baseline)
    result = _measure(config, config.model)
    if config.baseline:
        result["baseline"] = _measure(config, config.baseline)
        if is_main_process():
            result["retained"] = retained(result, result["baseline"])
    result["environment"] = environment()
    if is_main_process():  # several processes share the scoring; the first writes what they found
        with atomic_output_file(config.out, config.force) as staging:
            write_json(staging, result)
    return result


def _measure(config: EvalConfig, spec: str) -> dict:
    """The tasks and loss of the model `spec`, as this config asks, with where the model came from."""
    model, tokenizer, source = load(dataclasses.replace(config, model=spec), quiet=config.quiet)
    result = evaluate(model, tokenizer, list(config.tasks), seed=config.seed, batch_size=config.batch_size,
                      scoring=config.scoring, log_samples=config.log_samples, progress=not config.quiet,
                      max_length=config.max_length, **config.evaluation_options())
    result["model"] = source.as_dict()
    return result
