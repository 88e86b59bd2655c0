"""Choosing few-shot examples: seeded draws, reproducible per document."""

from __future__ import annotations

import random
from collections.abc import Sequence

from depthcut.errors import DepthcutError
from depthcut.evaluation.items import Item
from depthcut.evaluation.tasks.render import Doc, render


def seeded_indices(pool_size: int, n: int, seed: int, doc_id: int, exclude: int | None = None) -> list[int]:
    """`n` distinct positions in a pool, never `exclude`, drawn by a generator seeded with (seed,
    doc_id), so a document's shots do not depend on which other documents are evaluated."""
    picks = random.Random(f"{seed}:{doc_id}").sample(range(pool_size - (exclude is not None)), n)
    if exclude is None:
        return picks
    return [p + 1 if p >= exclude else p for p in picks]


def with_seeded_shots(
    task: str,
    docs: Sequence[Doc],
    num_fewshot: int,
    seed: int,
    pool: Sequence[Doc] | None = None,
    lines: Sequence[int] | None = None,
    **style,
) -> list[Item]:
    """The items of `docs`, each with `num_fewshot` shots drawn from `pool`, or, without a pool,
    from `docs` minus the document itself. `style`: render's description and delimiters."""
    available = len(docs) - 1 if pool is None else len(pool)
    if num_fewshot > available:
        raise DepthcutError(f"task {task!r}: {num_fewshot} few-shot examples asked for, only {available} available")
    items = []
    for doc_id, doc in enumerate(docs):
        shots: list[Doc] = []
        if num_fewshot and pool is not None:
            shots = [pool[j] for j in seeded_indices(len(pool), num_fewshot, seed, doc_id)]
        elif num_fewshot:
            shots = [docs[j] for j in seeded_indices(len(docs), num_fewshot, seed, doc_id, exclude=doc_id)]
        line = lines[doc_id] if lines else None
        items.append(render(task, doc_id, doc, shots, source_line=line, **style))
    return items
