"""WinoGrande (XL) as lm-eval's `winogrande`: validation split (dev.jsonl), acc.

Partial evaluation: one context per option, the sentence up to the blank with the option filled
in; one shared continuation, " " + the rest of the sentence after the blank.
"""

from __future__ import annotations

from depthcut.evaluation.sources import DataDir, Hub, OlmoDatasets
from depthcut.evaluation.tasks import register_task
from depthcut.evaluation.tasks.builtin import benchmark
from depthcut.evaluation.tasks.render import Doc


def to_doc(row: dict) -> Doc:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = (sentence[:blank] + row["option1"], sentence[:blank] + row["option2"])
    return Doc("", contexts, int(row["answer"]) - 1, target=sentence[blank + 1 :].strip())


register_task(
    benchmark(
        "winogrande",
        ("acc",),
        "WinoGrande (XL) pronoun resolution: which option fills the blank, validation set",
        to_doc,
        sources=(
            DataDir("winogrande/dev.jsonl"),
            OlmoDatasets("winogrande/winogrande_xl/validation"),
            Hub("allenai/winogrande", "winogrande_xl", "validation"),
        ),
    )
)
