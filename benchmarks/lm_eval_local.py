"""lm-evaluation-harness on the local copies of its benchmarks, for comparisons with depthcut.

The Hugging Face hub is out of reach here, so lm-eval cannot download its datasets. This module
writes, into a folder, task YAMLs that ``include`` lm-eval's OWN installed default task YAML
(prompt, choices, target, metrics all stay lm-eval's) and replace only the dataset: a local JSON
file holding the reference data of ``../shared/data`` converted to the Hugging Face field layout
that lm-eval's templates read. The same documents are also written in depthcut's data layout
(the one DEPTHCUT_DATA_DIR points at), so that both tools score exactly the same subset.

Used by ``compare_lm_eval.py`` and ``bench_eval.py``; not a test, not part of the package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The reference data beside the project (../shared/data), or wherever DEPTHCUT_DATA_DIR points.
DATA_DIR = Path(os.environ.get("DEPTHCUT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _arc(row: dict) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
    return {"id": row["id"], "question": row["question"], "choices": {"text": row["choices"], "label": labels},
            "answerKey": labels[row["gold"]]}


def _piqa(row: dict, label: str) -> dict:
    return {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)}


def _boolq(row: dict) -> dict:
    return {"question": row["question"], "passage": row["passage"], "label": int(row["answer"])}


def _hellaswag(row: dict) -> dict:
    return {**row, "label": str(row["label"])}  # the hub's HellaSwag stores the label as a string


@dataclass(frozen=True)
class LocalTask:
    """One lm-eval task and where its documents lie locally.

    `files` are row-aligned files under the data folder (PIQA keeps its labels in a second file);
    `convert` turns one row (a parsed JSON object per JSONL file, a plain line otherwise) into the
    document lm-eval's template expects; `split` is the lm-eval split key the task evaluates on.
    """

    name: str
    default_yaml: str  # relative to lm_eval/tasks
    split: str  # "test_split" or "validation_split"
    files: tuple[str, ...]
    convert: Callable[..., dict]


TASKS = {
    "arc_easy": LocalTask("arc_easy", "arc/arc_easy.yaml", "test_split", ("arc_easy/test.jsonl",), _arc),
    "arc_challenge": LocalTask("arc_challenge", "arc/arc_challenge.yaml", "test_split",
                               ("arc_challenge/test.jsonl",), _arc),
    "piqa": LocalTask("piqa", "piqa/piqa.yaml", "validation_split",
                      ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    "boolq": LocalTask("boolq", "super_glue/boolq/default.yaml", "validation_split",
                       ("boolq/validation.jsonl",), _boolq),
    "hellaswag": LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "validation_split",
                           ("hellaswag/hellaswag_val.jsonl",), _hellaswag),
}


def lm_eval_tasks_dir() -> Path:
    """The `tasks` folder of the installed lm-eval, which holds its default task YAMLs."""
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def read_lines(task: LocalTask, data_dir: Path = DATA_DIR) -> list[tuple[str, ...]]:
    """The raw lines of every document, one tuple (a line per file) per document."""
    columns = [(data_dir / f).read_text(encoding="utf-8").splitlines() for f in task.files]
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"{task.name}: files {task.files} differ in length")
    return list(zip(*columns))


def _parse(task: LocalTask, lines: tuple[str, ...]) -> list:
    return [json.loads(line) if f.endswith(".jsonl") else line for f, line in zip(task.files, lines)]


def task_yaml(task: LocalTask, data_file: Path, cache_dir: Path) -> str:
    """A YAML that is lm-eval's default task with only the dataset (and its splits) replaced."""
    split = task.split.removesuffix("_split")
    overrides = {"training_split": None, "validation_split": None, "test_split": None, task.split: split}
    lines = [
        f"include: {lm_eval_tasks_dir() / task.default_yaml}",
        f"task: {task.name}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        f"  data_files: {{{split}: {json.dumps(str(data_file))}}}",
        f"  cache_dir: {json.dumps(str(cache_dir))}",
        *(f"{key}: {value or 'null'}" for key, value in overrides.items()),
    ]
    return "\n".join(lines) + "\n"


def write_task(name: str, folder: Path, limit: int | None = None, indices: Sequence[int] | None = None,
               data_dir: Path = DATA_DIR) -> list[int]:
    """Write a subset of task `name` for both tools and return its documents' source indices.

    The subset is the documents at `indices`, else the first `limit`, else all. Written:
    ``folder/lm_eval/<name>.yaml`` + ``<name>.jsonl`` (lm-eval) and ``folder/data/<files>``
    (the source files' lines of those documents, for DEPTHCUT_DATA_DIR=folder/data).
    """
    task = TASKS[name]
    rows = read_lines(task, data_dir)
    chosen = list(indices) if indices is not None else list(range(len(rows)))[:limit]
    subset = [rows[i] for i in chosen]
    for column, relative in enumerate(task.files):
        target = folder / "data" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(row[column] + "\n" for row in subset), encoding="utf-8")
    lm_dir = folder / "lm_eval"
    lm_dir.mkdir(parents=True, exist_ok=True)
    data_file = lm_dir / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(task.convert(*_parse(task, row))) + "\n" for row in subset))
    (lm_dir / f"{name}.yaml").write_text(task_yaml(task, data_file, folder / "hf_cache"))
    return chosen


def predictions(loglikelihoods: Sequence[float], continuations: Sequence[str], delimiter: str = " ") -> tuple[int, int]:
    """lm-eval's acc and acc_norm predictions: the argmax of the log-likelihoods, raw and divided
    by the length in characters of each choice (its continuation minus the target delimiter)."""
    lengths = [max(len(c.removeprefix(delimiter)), 1) for c in continuations]
    order = range(len(loglikelihoods))
    return (max(order, key=lambda i: loglikelihoods[i]),
            max(order, key=lambda i: loglikelihoods[i] / lengths[i]))


def _sample_predictions(sample: dict, delimiter: str) -> dict:
    """Per-document log-likelihoods and predictions from one of lm-eval's logged samples."""
    loglikelihoods = [float(resp[0]) for resp in sample["filtered_resps"]]
    prediction, prediction_norm = predictions(loglikelihoods, [args[1] for args in sample["arguments"]], delimiter)
    gold = int(sample["target"])
    assert float(prediction == gold) == sample["acc"], f"doc {sample['doc_id']}: prediction disagrees with its acc"
    return {
        "doc_id": sample["doc_id"],
        "loglikelihoods": loglikelihoods,
        "prediction": prediction,
        "prediction_norm": prediction_norm,
        "gold": gold,
        "acc": float(sample["acc"]),
        "acc_norm": float(sample["acc_norm"]) if "acc_norm" in sample else None,
    }


def run_lm_eval(model, tokenizer, tasks: Sequence[str], folder: Path, batch_size: int = 16) -> dict:
    """Run lm-eval in-process on the tasks written into `folder`, zero-shot, with samples logged.

    Returns {task: {"acc", "acc_norm" (None when the task has none), "docs": [per-document dict]}},
    docs sorted by doc_id (the position in the written subset).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(folder / "lm_eval"), include_defaults=False)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=0,
                                     log_samples=True, bootstrap_iters=0)
    results = {}
    for name in tasks:
        figures = output["results"][name]
        delimiter = output["configs"][name].get("target_delimiter", " ")
        docs = sorted((_sample_predictions(s, delimiter) for s in output["samples"][name]), key=lambda d: d["doc_id"])
        results[name] = {"acc": figures["acc,none"], "acc_norm": figures.get("acc_norm,none"), "docs": docs}
    return results
