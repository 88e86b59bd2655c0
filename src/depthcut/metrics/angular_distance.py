"""Gromov et al. (2024): angular distance between the residual stream entering layer l and l+n."""

from __future__ import annotations

import torch

from depthcut.metrics.base import Metric, angular, register_metric


class _BlockAngularDistance(Metric):
    """d(l, n) = mean over samples of arccos(cos(x_l, x_{l+n})) / pi, for every n and l; and its standard
    error over sequences (each sequence's own mean taken as one draw)."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        positions = num_layers + 1
        self.total = torch.zeros(positions, positions, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.sequence_total = torch.zeros(positions, positions, dtype=torch.float64)  # sum of per-sequence means
        self.sequence_squares = torch.zeros(positions, positions, dtype=torch.float64)  # ... of their squares
        self.sequences = torch.zeros((), dtype=torch.float64)

    def update(self, cosines: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """`cosines` (M, P, P); `rows` (M,): the sequence each comes from, within this update (each
        sequence whole in one update); None: one per sequence (the last tokens)."""
        distances = angular(cosines)  # float32, as the cosines; every sum below is float64
        self._accumulate("total", distances.sum(dim=0, dtype=torch.float64))
        self.count += cosines.shape[0]
        if rows is not None and len(rows):
            _, rows = torch.unique(rows.to(distances.device), return_inverse=True)
            sums = torch.zeros(int(rows.max()) + 1, *distances.shape[1:], dtype=distances.dtype,
                               device=distances.device).index_add_(0, rows, distances)  # a sequence's few tokens
            distances = sums.double() / torch.bincount(rows).double().view(-1, 1, 1)
        else:
            distances = distances.double()
        self._accumulate("sequence_total", distances.sum(dim=0))
        self._accumulate("sequence_squares", distances.square().sum(dim=0))
        self.sequences += distances.shape[0]

    def state(self) -> list[torch.Tensor]:
        return [self.total, self.count, self.sequence_total, self.sequence_squares, self.sequences]

    def stderr(self) -> list[list[float | None]]:
        """As `result`: the standard error of each distance over sequences (None with fewer than two)."""
        n = float(self.sequences)
        if n < 2:
            return [[None] * self.num_layers for _ in range(self.num_layers)]
        total, squares = self.sequence_total.cpu(), self.sequence_squares.cpu()
        variance = ((squares - total.square() / n) / (n - 1)).clamp_min(0)
        return self._matrix((variance / n).sqrt().tolist())

    def result(self) -> list[list[float | None]]:
        """An L x L matrix: row n-1 is block size n, column l the first layer dropped; None where l+n > L."""
        return self._matrix((self.total.cpu() / self.count.clamp_min(1)).tolist())

    def _matrix(self, mean: list[list[float]]) -> list[list[float | None]]:
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
