"""The repair sums of several candidate blocks from ONE walk over the layers of a checkpoint that is never
loaded (`depthcut shrink --stream`): one `streamed._RepairObserver` per block rides the same layer-by-layer
pass (`analysis.streamed.stream_states`), which stops after the furthest block. The fitted samples and
the held-out ones go through together (the held-out rows from `heldout_from` on), so each block gets
the statistics its fit is made from and those that judge it, as `repair_streamed` gives them for one."""

from __future__ import annotations

from pathlib import Path

import torch

from depthcut.analysis.calibration import CalibrationSet
from depthcut.analysis.streamed import stream_states
from depthcut.repair import REPAIRS
from depthcut.repair.statistics import MAX_ROWS, RepairStatistics, contiguous_block
from depthcut.repair.streamed import _RepairObserver


class _Together:
    """Several observers of one stream, each told everything."""

    def __init__(self, observers: list):
        self.observers = observers

    def begin(self, model, stack, batches) -> None:
        for observer in self.observers:
            observer.begin(model, stack, batches)

    def after_layer(self, index: int, b: int, hidden: torch.Tensor) -> None:
        for observer in self.observers:
            observer.after_layer(index, b, hidden)

    def close(self) -> None:
        for observer in self.observers:
            observer.close()


def streamed_block_statistics(source: str | Path, samples: CalibrationSet, heldout_from: int,
                              blocks: dict[tuple[int, ...], list[str]], num_layers: int, architecture: str, *,
                              dtype: torch.dtype | None, device: torch.device, batch_size: int,
                              layer_path: str | None = None, seed: int = 0, trust_remote_code: bool = False,
                              progress: bool = False
                              ) -> tuple[dict[tuple, RepairStatistics], dict[tuple, RepairStatistics]]:
    """({block: the sums of its methods over rows [0, heldout_from) of `samples`}, {block: the sums that
    judge them, over the rows after}) for every block of `blocks` ({layers: methods}, checked already),
    in one layer-by-layer pass over the checkpoint `source`."""
    observers, fitted, judged = [], {}, {}
    for block, methods in blocks.items():
        first, stop = contiguous_block(list(block), num_layers)
        linear = any(REPAIRS.get(method).linear for method in methods)
        fitted[block] = RepairStatistics(first, stop, num_layers, tuple(methods), architecture)
        judged[block] = RepairStatistics(first, stop, num_layers, ("lstsq",) if linear else ("magnitude",),
                                         architecture)
        rows = MAX_ROWS if "cosine" in methods else 0
        observers.append(_RepairObserver(fitted[block], judged[block], heldout_from, linear, rows, seed))
    together = _Together(observers)
    furthest = max(stop for stop in (s.stop for s in fitted.values()))
    try:
        stream_states(source, samples, [], batch_size=batch_size, dtype=dtype, device=device, layer_path=layer_path,
                      trust_remote_code=trust_remote_code, observer=together, last_layer=furthest - 1,
                      progress=progress)
    finally:
        together.close()
    return fitted, judged
