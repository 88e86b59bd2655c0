"""Turning one document, and its few-shot examples, into an `Item` exactly as lm-eval renders it.

lm-eval (`ConfigurableTask.fewshot_context` / `construct_requests`, plain-text, no chat template):
context = description + every shot as `text + target_delimiter + answer + fewshot_delimiter` + text;
each continuation = target_delimiter + choice. acc_norm divides by `len(choice)`, the delimiter not
counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from depthcut.evaluation.items import Item


@dataclass(frozen=True)
class Doc:
    """One document as lm-eval sees it: doc_to_text (`query`), doc_to_choice and the gold index.

    Partial-evaluation tasks (WinoGrande) have one context per choice: then `choices` are those
    contexts, `target` is the continuation they share, and `query` is unused.
    """

    query: str
    choices: tuple[str, ...]
    gold: int
    target: str | None = None
    subject: str | None = None

    def solved(self, target_delimiter: str) -> str:
        """This document with its answer, as lm-eval writes a few-shot example."""
        if self.target is None:
            return self.query + target_delimiter + self.choices[self.gold]
        return self.choices[self.gold] + target_delimiter + self.target


def render(
    task: str,
    doc_id: int,
    doc: Doc,
    shots: Sequence[Doc] = (),
    description: str = "",
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
    source_line: int | None = None,
) -> Item:
    """The Item of `doc`, its context prefixed by the description and the solved `shots`."""
    prefix = description + "".join(shot.solved(target_delimiter) + fewshot_delimiter for shot in shots)
    if doc.target is None:
        contexts = (prefix + doc.query,)
        continuations = tuple(target_delimiter + choice for choice in doc.choices)
    else:
        contexts = tuple(prefix + choice for choice in doc.choices)
        continuations = (target_delimiter + doc.target,)
    return Item(
        task=task,
        doc_id=doc_id,
        contexts=contexts,
        continuations=continuations,
        gold=doc.gold,
        choice_lengths=tuple(len(choice) for choice in doc.choices),
        subject=doc.subject,
        source_line=source_line,
    )
