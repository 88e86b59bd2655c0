"""Evaluation tasks: built-in benchmarks and task files, registered by name.

The built-in tasks render their documents exactly as lm-evaluation-harness's default task
definitions do (docs/tasks.md); task files (YAML/JSON) define new ones without code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.evaluation.items import Item
from depthcut.registry import Registry

TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Task:
    """A multiple-choice task. `description` is one line for listings; `build(num_fewshot, seed)`
    returns the task's items and a description of where its data came from."""

    name: str
    metrics: tuple[str, ...]
    num_fewshot: int
    description: str
    build: Callable[[int, int], tuple[list[Item], str]]


TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    TASKS.register(task.name)(task)
    return task


def get_task(name_or_path: str) -> Task:
    """A built-in task by name, or the task a YAML/JSON task file defines."""
    if name_or_path in TASKS:
        return TASKS.get(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in TASK_FILE_SUFFIXES or path.is_file():
        from depthcut.evaluation.tasks.taskfile import load_task_file

        return load_task_file(path)
    return TASKS.get(name_or_path)  # unknown: the registry's error suggests close names


def load_items(task: Task | str, num_fewshot: int | None = None, seed: int = 0) -> tuple[list[Item], str]:
    """The items of `task` with `num_fewshot` shots (default: the task's own), and their source."""
    if isinstance(task, str):
        task = get_task(task)
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    if shots < 0:
        raise DepthcutError(f"num_fewshot must be 0 or more, got {shots}")
    return task.build(shots, seed)


from depthcut.evaluation.tasks import arc, boolq, hellaswag, mmlu, piqa, winogrande  # noqa: E402,F401
