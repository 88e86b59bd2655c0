"""HellaSwag as lm-eval's `hellaswag`: validation split, acc and acc_norm.

Context preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}"), continuations
" {preprocess(ending)}", where preprocess is lm-eval's clean-up of WikiHow artifacts.
"""

from __future__ import annotations

import re

from depthcut.evaluation.sources import DataDir, Hub, OlmoDatasets
from depthcut.evaluation.tasks import register_task
from depthcut.evaluation.tasks.builtin import benchmark
from depthcut.evaluation.tasks.render import Doc


def preprocess(text: str) -> str:
    """lm-eval's `hellaswag/utils.preprocess`: drop the bracketed WikiHow markup."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def to_doc(row: dict) -> Doc:
    query = preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return Doc(query, tuple(preprocess(ending) for ending in row["endings"]), int(row["label"]))


register_task(
    benchmark(
        "hellaswag",
        ("acc", "acc_norm"),
        "HellaSwag: the most plausible continuation of an activity description, validation set",
        to_doc,
        sources=(
            DataDir("hellaswag/hellaswag_val.jsonl"),
            OlmoDatasets("hellaswag/none/validation"),
            Hub("Rowan/hellaswag", None, "validation"),
        ),
    )
)
