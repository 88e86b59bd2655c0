"""ShortGPT (Men et al. 2024): Block Influence of a layer = 1 - cos(its input, its output)."""

from __future__ import annotations

import torch

from depthcut.metrics.base import Metric, register_metric


@register_metric
class BlockInfluence(Metric):
    name = "block_influence"
    level = "all_tokens"
    consecutive_only = True

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.total = torch.zeros(num_layers, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, cosines: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        index = torch.arange(self.num_layers, device=cosines.device)
        consecutive = cosines[:, index, index + 1]  # (M, L): cos(x_l, x_{l+1})
        self._accumulate("total", (1.0 - consecutive).sum(dim=0, dtype=torch.float64))
        self.count += cosines.shape[0]

    def update_consecutive(self, consecutive: torch.Tensor) -> None:  # (M, L): cos(x_l, x_{l+1}) only
        self._accumulate("total", (1.0 - consecutive).sum(dim=0, dtype=torch.float64))
        self.count += consecutive.shape[0]

    def state(self) -> list[torch.Tensor]:
        return [self.total, self.count]

    def result(self) -> list[float]:
        return (self.total.cpu() / self.count.clamp_min(1)).tolist()
