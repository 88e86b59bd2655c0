"""Gromov et al. (2024): angular distance between the residual stream entering layer l and l+n."""

from __future__ import annotations

import torch

from depthcut.metrics.base import Metric, angular, register_metric


class _BlockAngularDistance(Metric):
    """d(l, n) = mean over samples of arccos(cos(x_l, x_{l+n})) / pi, for every n and l."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        positions = num_layers + 1
        self.total = torch.zeros(positions, positions, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, cosines: torch.Tensor) -> None:
        self._accumulate("total", angular(cosines).sum(dim=0, dtype=torch.float64))
        self.count += cosines.shape[0]

    def state(self) -> list[torch.Tensor]:
        return [self.total, self.count]

    def result(self) -> list[list[float | None]]:
        """An L x L matrix: row n-1 is block size n, column l the first layer dropped; None where l+n > L."""
        mean = (self.total.cpu() / self.count.clamp_min(1)).tolist()
        size = self.num_layers
        return [
            [mean[first][first + n] if first + n <= size else None for first in range(size)]
            for n in range(1, size + 1)
        ]


@register_metric
class AngularLastToken(_BlockAngularDistance):
    name = "angular_last_token"
    level = "last_token"


@register_metric
class AngularAllTokens(_BlockAngularDistance):
    name = "angular_all_tokens"
    level = "all_tokens"
