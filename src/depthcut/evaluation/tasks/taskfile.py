"""User task files: a multiple-choice task defined in YAML or JSON, without code (docs/tasks.md).

The file is checked, and its data read and rendered, when the task is looked up, so that every
mistake is reported before a model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from depthcut.data import read_parquet_records
from depthcut.errors import DepthcutError
from depthcut.io.text import read_jsonl, read_utf8
from depthcut.evaluation.tasks import TASKS, Task
from depthcut.evaluation.tasks.fewshot import with_seeded_shots
from depthcut.evaluation.tasks.render import Doc

REQUIRED = ("name", "data", "prompt", "choices", "answer")
DEFAULTS = {"target_delimiter": " ", "metrics": ["acc", "acc_norm"], "num_fewshot": 0,
            "fewshot_delimiter": "\n\n", "description": ""}
TYPES = {"name": str, "data": str, "prompt": str, "choices": (str, list), "answer": str, "target_delimiter": str,
         "metrics": list, "num_fewshot": int, "fewshot_delimiter": str, "description": str}
METRICS = ("acc", "acc_norm")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_task_file(path: Path) -> Task:
    """The task a YAML/JSON file defines, its data already read and checked."""
    spec = _read_spec(path)
    data = (path.parent / spec["data"]).resolve()
    records, lines = _read_records(data, path)
    docs = [_to_doc(spec, row, _where(path, data, i, lines)) for i, row in enumerate(records)]
    style = {key: spec[key] for key in ("description", "target_delimiter", "fewshot_delimiter")}

    def build(num_fewshot: int, seed: int):
        items = with_seeded_shots(spec["name"], docs, num_fewshot, seed, lines=lines, **style)
        return items, f"task file {path}: {data}"

    return Task(spec["name"], tuple(spec["metrics"]), spec["num_fewshot"], f"defined by {path}", build)


def _read_spec(path: Path) -> dict:
    """The file's fields, defaults filled in, each checked."""
    if not path.is_file():
        raise DepthcutError(f"task file {path} not found")
    try:
        text = read_utf8(path)
        spec = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise DepthcutError(f"task file {path}: cannot parse it ({error})") from None
    if not isinstance(spec, dict):
        raise DepthcutError(f"task file {path}: expected a mapping with the fields {', '.join(REQUIRED)}")
    for field in REQUIRED:
        if field not in spec:
            raise DepthcutError(f"task file {path}: the required field {field!r} is missing")
    spec = {**DEFAULTS, **spec}
    for field, value in spec.items():
        _check_field(path, field, value)
    return spec


def _check_field(path: Path, field: str, value) -> None:
    def fail(why: str):
        raise DepthcutError(f"task file {path}: field {field!r} {why}")

    if field not in TYPES:
        fail(f"is not a task-file field (fields: {', '.join(TYPES)})")
    if not isinstance(value, TYPES[field]) or isinstance(value, bool):
        fail(f"has the wrong type ({type(value).__name__})")
    if field == "name" and (not value.strip() or value in TASKS):
        fail(f"{value!r} is empty or the name of a built-in task; choose another")
    if field == "metrics" and (not value or not set(value) <= set(METRICS)):
        fail(f"must list some of {', '.join(METRICS)}, got {value}")
    if field == "num_fewshot" and value < 0:
        fail("must be 0 or more")
    if field == "choices" and isinstance(value, list) and (len(value) < 2 or not all(isinstance(c, str) for c in value)):
        fail("must be a field name or a list of at least 2 strings")
    if field == "data" and Path(value).suffix.lower() not in DATA_SUFFIXES:
        fail(f"must name a {', '.join(DATA_SUFFIXES)} file, got {value!r}")


def _read_records(data: Path, task_file: Path) -> tuple[list, list[int] | None]:
    """The records of the data file, and their line numbers when it is JSON Lines."""
    if not data.is_file():
        raise DepthcutError(f"task file {task_file}: field 'data': {data} not found")
    suffix = data.suffix.lower()
    if suffix == ".jsonl":
        records, lines = read_jsonl(data)
    elif suffix == ".json":
        try:
            records, lines = json.loads(read_utf8(data)), None
        except ValueError as error:
            raise DepthcutError(f"task file {task_file}: field 'data': {data} is not valid JSON ({error})") from None
    else:
        records, lines = read_parquet_records(data), None
    if not isinstance(records, list) or not records:
        raise DepthcutError(f"task file {task_file}: field 'data': {data} holds no list of records")
    return records, lines


def _where(task_file: Path, data: Path, index: int, lines: list[int] | None) -> str:
    line = f", line {lines[index]}" if lines else ""
    return f"task file {task_file}: record {index + 1} of {data}{line}"


def _fill(template: str, row: dict, field: str, where: str) -> str:
    """`template` with the record's {field} placeholders filled in."""
    try:
        return template.format_map(row)
    except KeyError as error:
        raise DepthcutError(
            f"{where}: field {field!r} uses {{{error.args[0]}}}, which the record lacks (it has: {', '.join(row)})"
        ) from None
    except (IndexError, ValueError, AttributeError, TypeError) as error:
        raise DepthcutError(f"{where}: field {field!r} cannot be filled in: {error}") from None


def _choices(spec: dict, row: dict, where: str) -> tuple[str, ...]:
    if isinstance(spec["choices"], list):
        return tuple(_fill(choice, row, "choices", where) for choice in spec["choices"])
    value = row.get(spec["choices"])
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise DepthcutError(f"{where}: field 'choices' names {spec['choices']!r}, which is not a list of 2+ strings there")
    return tuple(value)


def _gold(value, choices: tuple[str, ...], where: str) -> int:
    """The index the answer names: a 0-based index, a choice's text, or its letter (A, B, ...)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return value
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if isinstance(value, str) and value in letters:
        return letters.index(value)
    raise DepthcutError(f"{where}: field 'answer' is {value!r}, which is not among the choices {list(choices)}")


def _to_doc(spec: dict, row, where: str) -> Doc:
    if not isinstance(row, dict):
        raise DepthcutError(f"{where}: not an object")
    choices = _choices(spec, row, where)
    if spec["answer"] not in row:
        raise DepthcutError(f"{where}: field 'answer' names {spec['answer']!r}, which the record lacks")
    return Doc(_fill(spec["prompt"], row, "prompt", where), choices, _gold(row[spec["answer"]], choices, where))
