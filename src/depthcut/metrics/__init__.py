"""Layer-similarity metrics: small plugins fed with per-sample cosine matrices.

The analysis engine captures the residual stream at every position p = 0..L (p < L: entering
layer p; p = L: leaving the last layer, before the final norm) and hands each metric, per batch,
the cosines between all pairs of positions: a float32 tensor of shape (M, L+1, L+1), one matrix
per sample's last token (``level = "last_token"``) or per non-padding token (``"all_tokens"``).
A metric reduces them into float64 accumulators and reports a JSON-ready result.
"""

from __future__ import annotations

import torch

from depthcut.registry import Registry


class Metric:
    """Base class: accumulates over batches, reports once."""

    name: str = ""
    level: str = "last_token"  # or "all_tokens"
    description: str = ""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def update(self, cosines: torch.Tensor) -> None:  # cosines: (M, L+1, L+1) float32
        raise NotImplementedError

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        """Add `value` to the float64 accumulator `name`, on the device the cosines are on.

        Keeping the sums where the work happens spares a host synchronisation per batch; they
        are read once, by `result`.
        """
        total = getattr(self, name)
        if total.device != value.device:
            total = total.to(value.device)
            setattr(self, name, total)
        total += value

    def state(self) -> list[torch.Tensor]:
        """The accumulators, for summing across processes."""
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


METRICS: Registry[type[Metric]] = Registry("metric")


def register_metric(cls: type[Metric]) -> type[Metric]:
    return METRICS.register(cls.name)(cls)


def angular(cosines: torch.Tensor) -> torch.Tensor:
    """arccos(cos) / pi in [0, 1]; the clamp keeps rounding just past +-1 from making NaN."""
    return torch.arccos(cosines.clamp(-1.0, 1.0)) / torch.pi


# Importing the plugin modules registers them.
from depthcut.metrics import angular_distance, block_influence  # noqa: F401

DEFAULT_METRICS = ("angular_last_token", "angular_all_tokens", "block_influence")
