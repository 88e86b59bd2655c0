"""The training-free repairs of every candidate block of `depthcut shrink`, from shared passes. The sums
of every block the analysis can rank ride on the analysis pass itself (`every_block_gatherer`: two
d x d float64 sums per block, while they fit in `SHARED_SUMS_BYTES`); where they do not, one pass over
the calibration samples gathers the candidate blocks' sums after the analysis (`block_statistics`).
One pass over the held-out samples gathers the sums that judge them (and choose a linear map's
ridge); each fit is made when first asked for. The cosine repair also keeps token rows (3 x rows x d
floats per block): they are gathered in that calibration pass while every block's together fit in
`SHARED_ROWS_BYTES`, else (and always after sums from the analysis) in a pass of their own for the
blocks that need them (those where cosine is fitted: `decision.refinements`)."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from depthcut.errors import DepthcutError
from depthcut.model.distributed import launched_as_several
from depthcut.model.layers import find_layer_stack, text_config
from depthcut.repair import REPAIRS, check_repair
from depthcut.repair.gaps import apply_gaps, check_gaps, fit_gaps, gaps_folded
from depthcut.repair.methods import RepairFit
from depthcut.repair.reach import first_changed_layer
from depthcut.repair.run import fit_judged
from depthcut.repair.statistics import MAX_ROWS, BlockGatherer, RepairStatistics, block_statistics
from depthcut.selection.decision_table import contiguous

log = logging.getLogger(__name__)

SHARED_ROWS_BYTES = 2**30
SHARED_SUMS_BYTES = 2**30
ROWS_KEPT_BY = ("cosine",)  # the repairs fitted on token rows, not on sums alone


def every_block_gatherer(model, calibration, size: int, methods: list[str], config) -> BlockGatherer | None:
    """The sums of `methods` (but the token rows of cosine) for every block of `size` layers that the
    analysis ranks (every [l, l+size) keeping the final layer), to gather during the analysis pass; None
    where there is nothing to gather, where their d x d sums together would pass `SHARED_SUMS_BYTES`, or
    where the analysis is shared out between processes (each would hold a share of the sums)."""
    sums = [method for method in methods if method != "none" and method not in ROWS_KEPT_BY]
    starts = range(len(find_layer_stack(model, config.layer_path)) - size)
    width = text_config(model).hidden_size
    linear = any(REPAIRS.get(method).linear for method in sums)
    if not sums or launched_as_several() or linear and 2 * width * width * 8 * len(starts) > SHARED_SUMS_BYTES:
        return None
    blocks = {}
    for first in starts:
        layers = tuple(range(first, first + size))
        usable = []
        for method in sums:
            try:
                check_repair(model, list(layers), method, config.layer_path)
                usable.append(method)
            except DepthcutError:  # refused here: BlockFits says why, for the candidates
                pass
        if usable:
            blocks[layers] = usable
    return BlockGatherer(model, calibration, blocks, config.layer_path, seed=config.seed) if blocks else None


class BlockFits:
    """{block: {method: fit}} for the candidate `blocks` (each a list of layers), fitted lazily; the sums in
    `gathered` (by `every_block_gatherer`, during the analysis) are used where they hold a block's methods."""

    def __init__(self, model, blocks: list[list[int]], methods: list[str], samples, config,
                 gathered: dict[tuple, RepairStatistics] | None = None):
        self.model, self.samples = model, samples
        self.gather = {"layer_path": config.layer_path, "batch_size": config.batch_size, "seed": config.seed,
                       "progress": not config.quiet}
        # an iterative fit (cosine's Adam steps) shows its progress too
        self.fit_options = {method: {"progress": True} for method in methods
                            if not config.quiet and REPAIRS.get(method).iterative}
        self.refused, self.usable = usable_repairs(model, blocks, methods, config.layer_path)
        self.fits: dict[tuple, dict[str, RepairFit]] = {block: {} for block in self.usable}
        self.allow_unknown_config = config.allow_unknown_config
        blocks_usable = one_block_only(self.usable)  # a scattered cut's gaps are fitted one by one (`fit_gaps`)
        rows = min(MAX_ROWS, samples.calibration.num_tokens)
        with_rows = [block for block, usable in blocks_usable.items() if set(usable) & set(ROWS_KEPT_BY)]
        width = text_config(model).hidden_size
        self.rows_shared = 3 * rows * width * 4 * len(with_rows) <= SHARED_ROWS_BYTES
        sums = {block: [m for m in usable if m not in ROWS_KEPT_BY] for block, usable in blocks_usable.items()}
        self.statistics = {block: gathered[block] for block in sums
                           if block in (gathered or {}) and set(sums[block]) <= set(gathered[block].methods)}
        # the rest in a pass of its own, with the token rows where they all fit (none needed then: the rows
        # of blocks whose sums came from the analysis are gathered later, for the blocks that need them)
        rows_too = self.rows_shared and not self.statistics
        wanted = {block: usable if rows_too else sums[block] for block, usable in blocks_usable.items()
                  if block not in self.statistics}
        wanted = {block: methods for block, methods in wanted.items() if methods}
        if wanted:
            self.statistics.update(block_statistics(model, samples.calibration, wanted, **self.gather))
        # a linear map's error needs M^T M; a scale's, the three sums magnitude gathers
        judging = {block: sorted({"lstsq" if REPAIRS.get(m).linear else "magnitude" for m in usable})
                   for block, usable in blocks_usable.items() if usable}
        self.judged = block_statistics(model, samples.heldout, judging, **self.gather) if judging else {}

    def get(self, layers: list[int], method: str) -> RepairFit:
        """The fit of `method` for cutting `layers`; `DepthcutError` where the method refuses this cut."""
        return get_fit(self, layers, method)

    def fit_gaps(self, layers: list[int], method: str) -> list[RepairFit]:
        """One fit per gap of the scattered cut `layers`, each on the stream the earlier ones give."""
        return fit_gaps(self.model, layers, method, self.samples.calibration, self.samples.heldout,
                        layer_path=self.gather["layer_path"], batch_size=self.gather["batch_size"],
                        seed=self.gather["seed"], allow_unknown_config=self.allow_unknown_config,
                        **self.fit_options.get(method, {}))

    def gather_rows(self, blocks: list[list[int]]) -> None:
        """One more pass, for the `blocks` (of those asked for) that lack the token rows their methods need."""
        missing = missing_rows(self, blocks)
        if missing:
            log.info("shrink: gathering token rows for %d block(s) ...", len(missing))
            self.statistics.update(block_statistics(self.model, self.samples.calibration, missing, **self.gather))


def get_fit(fits, layers: list[int], method: str) -> RepairFit:
    """The fit of `method` for cutting `layers` from `fits` (a `BlockFits`, or the streamed one), made on
    first use from its statistics (gathering token rows first where they are missing)."""
    block = tuple(layers)
    if method in fits.refused[block]:
        raise fits.refused[block][method]
    if method not in fits.fits[block] and not contiguous(list(layers)):
        fits.fits[block][method] = fits.fit_gaps(list(layers), method)
    if method not in fits.fits[block]:
        statistics = fits.statistics.get(block)
        if statistics is None or method not in statistics.methods:
            fits.gather_rows([layers])
            statistics = fits.statistics[block]
        fits.fits[block][method] = fit_judged(method, statistics, fits.judged[block],
                                              **fits.fit_options.get(method, {}))
    return fits.fits[block][method]


def usable_repairs(model, blocks: list[list[int]], methods: list[str], layer_path: str | None
                   ) -> tuple[dict[tuple, dict[str, DepthcutError]], dict[tuple, list[str]]]:
    """({block: {method: why it refuses the block}}, {block: the methods that do not}); a scattered cut is
    repaired gap by gap (`repair.gaps`), where every gap allows the method."""
    refused, usable = {}, {}
    for layers in blocks:
        block = tuple(layers)
        refused[block], usable[block] = {}, []
        for method in methods:
            try:
                (check_repair if contiguous(list(layers)) else check_gaps)(model, layers, method, layer_path)
                usable[block].append(method)
            except DepthcutError as error:
                refused[block][method] = error
    return refused, usable


def missing_rows(fits, blocks: list[list[int]]) -> dict[tuple, list[str]]:
    """{block: its methods} for the `blocks` whose gathered sums lack some of their methods (the token rows)."""
    missing = {}
    for layers in blocks:
        if not contiguous(list(layers)):  # fitted gap by gap, each fit gathering what it needs
            continue
        block, usable = tuple(layers), fits.usable[tuple(layers)]
        gathered = fits.statistics[block].methods if block in fits.statistics else ()
        if set(usable) - set(gathered):
            missing[block] = usable
    return missing


def one_block_only(usable: dict[tuple, list[str]]) -> dict[tuple, list[str]]:
    """The entries of `usable` whose cut is one contiguous block (the others are repaired gap by gap)."""
    return {block: methods for block, methods in usable.items() if contiguous(list(block))}


def fits_of(fit) -> tuple:
    """An option's repair as a tuple of fits: none, one (a block), or one per gap (a scattered cut)."""
    if fit is None:
        return ()
    return tuple(fit) if isinstance(fit, (list, tuple)) else (fit,)


@contextmanager
def folded(model, fit, layer_path: str | None = None):
    """`model` with an option's repair (`fits_of`) folded in, as it was after: no copy."""
    with gaps_folded(model, fits_of(fit), layer_path):
        yield model


def fold(model, fit, layer_path: str | None = None) -> None:
    """Fold an option's repair (`fits_of`) into `model` for good, in order."""
    apply_gaps(model, fits_of(fit), layer_path)


def changed_from(model, fit, layer_path: str | None = None) -> int | None:
    """The first layer an option's repair changes (`repair.reach`); None for no repair."""
    fits = fits_of(fit)
    return min(first_changed_layer(model, one, layer_path) for one in fits) if fits else None
