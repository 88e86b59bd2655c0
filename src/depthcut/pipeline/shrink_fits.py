"""The training-free repairs of every candidate block of `depthcut shrink`, from shared passes: one pass
over the calibration samples gathers every block's sums (`block_statistics`), one over the held-out
samples the sums that judge them (and choose a linear map's ridge); each fit is made when first asked
for. The cosine repair also keeps token rows (3 x rows x d floats per block): they are gathered in the
shared pass while every block's together fit in `SHARED_ROWS_BYTES`, else in a pass of their own for
the blocks that still need them (the screening's finalists)."""

from __future__ import annotations

import logging

from depthcut.errors import DepthcutError
from depthcut.model.layers import text_config
from depthcut.repair import REPAIRS, check_repair
from depthcut.repair.methods import RepairFit
from depthcut.repair.run import fit_judged
from depthcut.repair.statistics import MAX_ROWS, block_statistics

log = logging.getLogger(__name__)

SHARED_ROWS_BYTES = 2**30
ROWS_KEPT_BY = ("cosine",)  # the repairs fitted on token rows, not on sums alone


class BlockFits:
    """{block: {method: fit}} for the candidate `blocks` (each a list of layers), fitted lazily."""

    def __init__(self, model, blocks: list[list[int]], methods: list[str], samples, config):
        self.model, self.samples = model, samples
        self.gather = {"layer_path": config.layer_path, "batch_size": config.batch_size, "seed": config.seed}
        self.refused: dict[tuple, dict[str, DepthcutError]] = {}
        self.usable: dict[tuple, list[str]] = {}
        for layers in blocks:
            block = tuple(layers)
            self.refused[block], self.usable[block] = {}, []
            for method in methods:
                try:
                    check_repair(model, layers, method, config.layer_path)
                    self.usable[block].append(method)
                except DepthcutError as error:
                    self.refused[block][method] = error
        self.fits: dict[tuple, dict[str, RepairFit]] = {block: {} for block in self.usable}
        rows = min(MAX_ROWS, samples.calibration.num_tokens)
        with_rows = [block for block, usable in self.usable.items() if set(usable) & set(ROWS_KEPT_BY)]
        width = text_config(model).hidden_size
        self.rows_shared = 3 * rows * width * 4 * len(with_rows) <= SHARED_ROWS_BYTES
        wanted = {block: [m for m in usable if self.rows_shared or m not in ROWS_KEPT_BY]
                  for block, usable in self.usable.items()}
        wanted = {block: methods for block, methods in wanted.items() if methods}
        self.statistics = block_statistics(model, samples.calibration, wanted, **self.gather) if wanted else {}
        # a linear map's error needs M^T M; a scale's, the three sums magnitude gathers
        judging = {block: sorted({"lstsq" if REPAIRS.get(m).linear else "magnitude" for m in usable})
                   for block, usable in self.usable.items() if usable}
        self.judged = block_statistics(model, samples.heldout, judging, **self.gather) if judging else {}

    def get(self, layers: list[int], method: str) -> RepairFit:
        """The fit of `method` for cutting `layers`; `DepthcutError` where the method refuses this cut."""
        block = tuple(layers)
        if method in self.refused[block]:
            raise self.refused[block][method]
        if method not in self.fits[block]:
            statistics = self.statistics.get(block)
            if statistics is None or method not in statistics.methods:
                self.gather_rows([layers])
                statistics = self.statistics[block]
            self.fits[block][method] = fit_judged(method, statistics, self.judged[block])
        return self.fits[block][method]

    def gather_rows(self, blocks: list[list[int]]) -> None:
        """One more pass, for the `blocks` (of those asked for) that lack the token rows their methods need."""
        missing = {}
        for layers in blocks:
            block, usable = tuple(layers), self.usable[tuple(layers)]
            gathered = self.statistics[block].methods if block in self.statistics else ()
            if set(usable) - set(gathered):
                missing[block] = usable
        if missing:
            log.info("shrink: gathering token rows for %d block(s) ...", len(missing))
            self.statistics.update(block_statistics(self.model, self.samples.calibration, missing, **self.gather))
