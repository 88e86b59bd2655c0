"""Any lm-evaluation-harness task on an in-memory (pruned) model, for tasks depthcut lacks.

lm-eval is an optional dependency: it is imported only when `run_harness` is called.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from depthcut.errors import DepthcutError


def _plain(value):
    """JSON-able copy of lm-eval's figures (numpy scalars become Python numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def run_harness(model, tokenizer, tasks: Sequence[str], batch_size: int = 16, limit: int | None = None,
                num_fewshot: int | None = None) -> dict:
    """Run lm-eval `tasks` (registered names or task YAML paths) on `model` as it is in memory.

    Returns lm-eval's per-task results, e.g. {"arc_easy": {"acc,none": 0.6, "acc_stderr,none": ...}}.
    `limit` is lm-eval's: the first `limit` documents of each task.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise DepthcutError(f"lm-eval tasks need lm-evaluation-harness ({error}): pip install lm-eval") from error
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                     log_samples=False)
    return _plain(output["results"])
