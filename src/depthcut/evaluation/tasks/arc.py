"""ARC-Easy and ARC-Challenge as lm-eval's `arc_easy`/`arc_challenge`: test split, acc and acc_norm.

Context "Question: {question}\\nAnswer:", one continuation " {choice text}" per choice.
"""

from __future__ import annotations

from depthcut.evaluation.sources import DataDir, Hub, OlmoDatasets, OlmoRequests
from depthcut.evaluation.tasks import register_task
from depthcut.evaluation.tasks.builtin import benchmark
from depthcut.evaluation.tasks.render import Doc


def _question(row: dict) -> str:
    if "question" in row:
        return row["question"]
    return row["query"].removeprefix("Question: ").removesuffix("\nAnswer:")  # an OLMES request's doc


def to_doc(row: dict) -> Doc:
    """Local rows hold `choices` (texts) and `gold`; Hugging Face rows `choices{text,label}` and `answerKey`."""
    choices = row["choices"]
    if isinstance(choices, dict):
        texts, gold = choices["text"], choices["label"].index(row["answerKey"])
    else:
        texts, gold = choices, row["gold"]
    return Doc(f"Question: {_question(row)}\nAnswer:", tuple(texts), int(gold))


for _name, _config in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
    register_task(
        benchmark(
            _name,
            ("acc", "acc_norm"),
            f"AI2 Reasoning Challenge, {_config} test set (grade-school science)",
            to_doc,
            sources=(
                DataDir(f"{_name}/test.jsonl"),
                OlmoDatasets(f"ai2_arc/{_config}/test"),
                OlmoRequests(f"{_name}/test_rc_5shot"),
                Hub("allenai/ai2_arc", _config, "test"),
            ),
            fewshot_sources=(DataDir(f"{_name}/validation.jsonl"), OlmoDatasets(f"ai2_arc/{_config}/validation")),
        )
    )
