"""The base of a layer-similarity metric (`Metric`) and the angular distance they share."""

from __future__ import annotations

import inspect

import torch

from depthcut.metrics import METRICS


class Metric:
    """Base class: accumulates over batches, reports once."""

    name: str = ""
    level: str = "last_token"  # or "all_tokens"
    # An all-token metric that reads only cos(x_l, x_l+1) (Block Influence): the layer-streamed pass
    # computes those as each layer runs and spills nothing to disk for it.
    consecutive_only: bool = False

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def update(self, cosines: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """`cosines` (M, L+1, L+1) float32; `rows` (M,), for all-token metrics: the sequence each token is
        in (a sequence's tokens all in one update), for a standard error over sequences."""
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

    def update_consecutive(self, consecutive: torch.Tensor) -> None:  # (M, L) float32, consecutive_only metrics
        """For a `consecutive_only` metric: the cosines cos(x_l, x_{l+1}) of M tokens, the only ones it reads."""
        raise NotImplementedError

    def state(self) -> list[torch.Tensor]:
        """The accumulators, for summing across processes."""
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


def feed(metric: Metric, cosines: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """`metric.update`, with the tokens' sequences where it takes them (a metric written before they
    were passed takes the cosines alone)."""
    if rows is not None and "rows" in inspect.signature(metric.update).parameters:
        metric.update(cosines, rows=rows)
    else:
        metric.update(cosines)


def register_metric(cls: type[Metric]) -> type[Metric]:
    return METRICS.register(cls.name)(cls)


def angular(cosines: torch.Tensor) -> torch.Tensor:
    """arccos(cos) / pi in [0, 1]; the clamp keeps rounding just past +-1 from making NaN."""
    return torch.arccos(cosines.clamp(-1.0, 1.0)) / torch.pi
