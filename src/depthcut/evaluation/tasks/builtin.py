"""A built-in benchmark over one split: its data sources and how a row becomes a `Doc`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from depthcut.evaluation.sources import find, resolve
from depthcut.evaluation.tasks import Task
from depthcut.evaluation.tasks.fewshot import with_seeded_shots
from depthcut.evaluation.tasks.render import Doc


def benchmark(
    name: str,
    metrics: tuple[str, ...],
    description: str,
    to_doc: Callable[[dict], Doc],
    sources: Sequence,
    fewshot_sources: Sequence = (),
) -> Task:
    """A 0-shot-by-default task. With shots, they are drawn (seeded) from the first of
    `fewshot_sources` that has data, else from the evaluation split minus the document itself."""

    def build(num_fewshot: int, seed: int):
        split = resolve(sources, f"task {name!r}")
        docs = [to_doc(row) for row in split.rows]
        pool, source = None, split.source
        if num_fewshot:
            found, _ = find(fewshot_sources)
            pool = None if found is None else [to_doc(row) for row in found.rows]
            source += f"; few-shot from {found.source if found else 'the same split, never the item itself'}"
        return with_seeded_shots(name, docs, num_fewshot, seed, pool=pool, lines=split.lines), source

    return Task(name, metrics, 0, description, build)
