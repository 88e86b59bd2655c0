"""The analysis result and its stable on-disk format, `analysis.json` (see docs/analysis-format.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.text import read_utf8

FORMAT_NAME = "depthcut.analysis.passes"
FORMAT_VERSION = 1
BLOCK_METRIC = "angular_last_token"


@dataclass
class Analysis:
    """Per-layer and per-block similarity of one model on one calibration set.

    Matrix metrics are L x L lists: row n-1 is block size n, column l the first layer of the
    block, None where l+n > L. Per-layer metrics are lists of L values. Layers are 0-based.
    `search`: what `depthcut analyze --search` found (the order of removal, each step's KL), or None.
    """

    num_layers: int
    metrics: dict[str, list]
    metadata: dict = field(default_factory=dict)
    search: dict | None = None

    def search_order(self) -> list[int]:
        """The layers `analyze --search` removed, in its order: the first k are its cut of k layers."""
        if not self.search or not self.search.get("order"):
            raise DepthcutError("this analysis has no search order: run `depthcut analyze --search greedy` "
                                "(or beam:K) and give its analysis.json")
        return list(self.search["order"])

    def distance(self, first: int, size: int, metric: str = BLOCK_METRIC) -> float | None:
        return self.metric(metric)[size - 1][first]

    def metric(self, name: str) -> list:
        if name not in self.metrics:
            raise DepthcutError(f"this analysis has no metric {name!r} (it has: {', '.join(self.metrics)})")
        return self.metrics[name]

    def best_block(self, size: int, metric: str = BLOCK_METRIC) -> tuple[int, int]:
        """The half-open block [l, l+n) of smallest distance that keeps the final layer."""
        if not 1 <= size < self.num_layers:
            raise DepthcutError(f"block size must be between 1 and {self.num_layers - 1}, got {size}")
        row = self.metric(metric)[size - 1]
        # l + n <= L - 1: the block never includes the final layer L-1.
        choices = [(row[first], first) for first in range(self.num_layers - size)]
        _, first = min(choices)
        return first, first + size

    def ranked_blocks(self, size: int, metric: str = BLOCK_METRIC) -> list[tuple[int, int]]:
        """Every block [l, l+n) that keeps the final layer, from the smallest distance up."""
        self.best_block(size, metric)  # checks the size
        row = self.metric(metric)[size - 1]
        return [(l, l + size) for _, l in sorted((row[l], l) for l in range(self.num_layers - size))]

    def best_blocks(self, metric: str = BLOCK_METRIC) -> dict[str, list[int]]:
        if metric not in self.metrics:
            return {}
        return {str(n): list(self.best_block(n, metric)) for n in range(1, self.num_layers)}

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "metrics": self.metrics,
            "best_block": self.best_blocks(),
            "metadata": self.metadata,
            **({"search": self.search} if self.search is not None else {}),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Analysis:
        path = Path(path)
        try:
            data = json.loads(read_utf8(path))
        except FileNotFoundError:
            raise DepthcutError(f"analysis file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as error:
            raise DepthcutError(f"cannot read analysis file {path}: {error}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise DepthcutError(f"{path} is not a depthcut analysis.json")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise DepthcutError(f"{path} has format version {data['format_version']}; this depthcut reads up to {FORMAT_VERSION}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> Analysis:
        """The inverse of `to_dict` (the best blocks are derived again from the metrics)."""
        return cls(num_layers=data["num_layers"], metrics=data["metrics"], metadata=data.get("metadata", {}),
                   search=data.get("search"))
