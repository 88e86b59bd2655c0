"""Measuring a (pruned) model: held-out loss and log-likelihood multiple-choice benchmarks."""

from depthcut.evaluation.evaluate import evaluate

__all__ = ["evaluate"]
