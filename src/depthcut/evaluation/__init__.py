"""Measuring a (pruned) model: held-out loss, and lm-evaluation-harness tasks scored by depthcut.

`evaluate` is the one call; `depthcut.evaluation.lm.DepthcutLM` is the scorer as an lm-eval model
(registered as ``depthcut`` when that module is imported).
"""

from depthcut.evaluation.evaluate import evaluate

__all__ = ["evaluate"]
