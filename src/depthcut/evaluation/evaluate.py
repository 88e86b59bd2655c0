"""`evaluate()`: the held-out loss and lm-evaluation-harness tasks of one model, as one JSON-ready result.

The tasks run through lm-eval's evaluator with `DepthcutLM` as the model: lm-eval builds the
prompts, few-shot contexts and metrics, depthcut scores the requests (lm.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from depthcut.analysis.calibration import build_calibration
from depthcut.errors import DepthcutError
from depthcut.evaluation.lm import DepthcutLM
from depthcut.evaluation.loss import heldout_loss
from depthcut.evaluation.metrics import chance, document, group_summary, task_summary
from depthcut.evaluation.tasks import load_task, resolve_tasks
from depthcut.io.data import load_texts

RESULT_FORMAT = "depthcut.eval"


def subsets(tasks: dict, limit: int | None, seed: int) -> dict[str, list[int]] | None:
    """A fixed random subset of `limit` documents of every task (lm-eval's `samples`), drawn with
    a generator seeded by (seed, task name); tasks with no more than `limit` documents run whole.
    (lm-eval's own `limit` takes the first documents, which are often ordered by source or topic.)"""
    if limit is None:
        return None
    chosen = {}
    for name, task in tasks.items():
        size = len(task.eval_docs)
        if limit < size:
            chosen[name] = sorted(random.Random(f"{seed}:{name}").sample(range(size), limit))
    return chosen or None


@contextmanager
def _seeded(seed: int, quiet: bool):
    """lm-eval's seeds for the run (its few-shot draws and any task's own randomness), the caller's
    random state back afterwards; `quiet` turns lm-eval's and datasets' progress bars off."""
    # deferred: datasets takes seconds to import; only Hugging Face datasets need it
    import datasets
    import lm_eval.api.task

    states = random.getstate(), np.random.get_state()
    task_bar, dataset_bars = lm_eval.api.task.tqdm, datasets.is_progress_bar_enabled()
    if quiet:
        lm_eval.api.task.tqdm = lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True})
        datasets.disable_progress_bars()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        lm_eval.api.task.tqdm = task_bar
        if dataset_bars:
            datasets.enable_progress_bars()


def run_tasks(lm, specs, *, limit: int | None = None, num_fewshot: int | None = None, seed: int = 0,
              log_samples: bool = False, progress: bool = True) -> tuple[dict | None, list[dict]]:
    """Summaries of `specs` (resolved --tasks entries) scored by `lm`, and their documents when
    `log_samples`. Every task runs in one lm-eval evaluation, so all requests are batched together.
    Launched as several processes, each scores its share; the first gets every summary, the others
    (None, [])."""
    # deferred: lm-eval takes seconds to import; only evaluation needs it
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    with _seeded(seed, quiet=not progress):
        loaded = {spec.name: load_task(spec) for spec in specs}
        everything = {"tasks": {}, "groups": {}, "group_map": {}}
        for part in loaded.values():
            for key, merged in everything.items():
                merged.update(part.get(key, {}))
        for task in everything["tasks"].values():  # what lm-eval's simple_evaluate does with num_fewshot
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        output = lm_eval_evaluate(lm=lm, task_dict=everything, samples=subsets(everything["tasks"], limit, seed),
                                  log_samples=True)
    if output is None:  # one of several processes, not the first: its share went to the first one
        return None, []
    summaries, documents = {}, []
    for spec in specs:
        part = loaded[spec.name]
        name = spec.name if spec.name in part.get("groups", {}) else None
        if name is not None:
            leaves = [t for t in part["tasks"] if t in output["results"]]
            summary = group_summary(name, leaves, output)
            entries = {name: summary}
        else:
            entries = {leaf: task_summary(leaf, output) for leaf in part["tasks"]}
        for entry, summary in entries.items():
            tasks = part["tasks"] if entry == name else {entry: part["tasks"][entry]}
            summary.update(chance=chance(tasks, output["samples"]), source=spec.source, limit=limit, seed=seed)
            summaries[entry] = summary
            if log_samples:
                documents += [document(entry, task, s, subtask=leaf if entry == name else None)
                              for leaf, task in tasks.items() for s in output["samples"].get(leaf, [])]
    return summaries, documents


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str] = (),
    *,
    loss_data=None,
    loss_samples: int = 64,
    loss_seq_len: int = 512,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    scoring: str = "packed",
    log_samples: bool = False,
    progress: bool = True,
    max_length: int | None = None,
) -> dict:
    """Evaluate `model` on lm-evaluation-harness `tasks` (names, built-in benchmarks on local
    data, task YAML files; docs/tasks.md) and/or the held-out loss on `loss_data` (a DATA string,
    as for calibration). `limit`: a fixed random subset of that many documents per task (seeded
    by `seed`, which also seeds lm-eval's few-shot draws). `max_length`: the longest context scored,
    rolling perplexity windows included (None: the model's own, as lm-eval's hf model takes it).
    Returns a JSON-ready dict."""

    if not tasks and loss_data is None:
        raise DepthcutError("nothing to evaluate: give tasks and/or loss data")
    if limit is not None and limit < 1:
        raise DepthcutError("--limit must be at least 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise DepthcutError("--num-fewshot must be 0 or more")
    if max_length is not None and max_length < 2:
        raise DepthcutError(f"--max-length must be at least 2 tokens, got {max_length}")
    specs = resolve_tasks(tasks)  # unknown names and bad task files fail before any work
    result: dict = {"format": RESULT_FORMAT, "format_version": 2, "tasks": {}}
    if loss_data is not None:

        source = load_texts(loss_data) if isinstance(loss_data, str) else loss_data
        windows = build_calibration(tokenizer, source, loss_samples, loss_seq_len, "windows", seed)
        result["loss"] = heldout_loss(model, windows, batch_size=max(1, batch_size // 2), progress=progress)
    if specs:
        lm = DepthcutLM(model, tokenizer, batch_size=batch_size, scoring=scoring, progress=progress,
                        max_length=max_length)
        result["tasks"], samples = run_tasks(lm, specs, limit=limit, num_fewshot=num_fewshot, seed=seed,
                                             log_samples=log_samples, progress=progress)
        if log_samples:
            result["samples"] = samples
    result["settings"] = {"limit": limit, "num_fewshot": num_fewshot, "seed": seed, "batch_size": batch_size,
                          "scoring": scoring, "max_length": lm.max_length if specs else max_length,
                          "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return result
