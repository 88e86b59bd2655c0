"""The unit of multiple-choice evaluation: one question, its choices and its answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    """One multiple-choice question, rendered to text and ready to score.

    Each choice is scored as the log-likelihood of a continuation given a context, exactly as
    lm-evaluation-harness does. Usually all choices share one context and differ in their
    continuation (ARC: context "Question: ...\\nAnswer:", continuations " Paris", " Rome", ...).
    WinoGrande is the reverse: one context per choice and one shared continuation. So either
    `contexts` or `continuations` has one entry, and the other has one entry per choice.

    `choice_lengths` are what acc_norm divides the log-likelihood by (lm-eval: the number of
    characters of each choice's text). `doc_id` is the 0-based position of the document in the
    task's source split; `source_line` is its 1-based line number when the source is a JSONL file.
    """

    task: str
    doc_id: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_lengths: tuple[int, ...]
    subject: str | None = None
    source_line: int | None = None

    @property
    def num_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) for every choice, in choice order."""
        n = self.num_choices
        contexts = self.contexts * n if len(self.contexts) == 1 else self.contexts
        continuations = self.continuations * n if len(self.continuations) == 1 else self.continuations
        return list(zip(contexts, continuations))
