"""What `depthcut shrink --stream` does in place of the in-memory steps, for a checkpoint never loaded
whole (a safetensors folder, or a .gguf file dequantized a tensor at a time): the repairs of every
candidate block from one layer-by-layer pass (`StreamedBlockFits`), every option scored in one walk
over the layers per phase (`StreamedScorer`, `evaluation.streamed_scores`: the references ride on
it), and the winner written shard by shard or tensor by tensor, its repair folded into just the
tensors it changes, as fitted and scored (`streamed_writer`)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.evaluation.streamed_scores import Trial, stream_scores
from depthcut.model.layers import find_layer_stack, text_config
from depthcut.pipeline.configs import ShrinkConfig
from depthcut.pipeline.prune import gguf_output
from depthcut.pipeline.prune_backends import backend_for
from depthcut.repair import REPAIRS
from depthcut.repair.statistics import MAX_ROWS
from depthcut.repair.streamed import folded_tensors, streamed_fit_gaps
from depthcut.repair.streamed_blocks import streamed_block_statistics
from depthcut.selection.fits import (
    ROWS_KEPT_BY,
    SHARED_ROWS_BYTES,
    fits_of,
    get_fit,
    missing_rows,
    one_block_only,
    usable_repairs,
)

log = logging.getLogger(__name__)


def check_streamable(config: ShrinkConfig, source) -> None:
    """What the layer-major shrink does not do, refused before any work with what to do instead."""
    if config.device_map:
        raise DepthcutError("--stream and --device-map exclude each other: streaming holds one layer at a time")
    if config.heal_steps:
        raise DepthcutError("--heal-steps trains the winner in memory, which --stream avoids: shrink with --stream, "
                            "then heal the written model (`depthcut heal`) where it fits")
    if config.search != "none":
        raise DepthcutError(f"--search {config.search} is not layer-major yet (each step would walk the layers "
                            "again): leave it out with --stream")
    if config.tasks:
        raise DepthcutError("--tasks loads both models whole: shrink with --stream, then run `depthcut eval` on "
                            "what it wrote")
    if source.gguf_file and not gguf_output(config.out):
        raise DepthcutError(f"a streamed shrink of {source.gguf_file} writes a .gguf file, tensor by tensor: give a "
                            f"--out ending in .gguf (or shrink without --stream to a folder)")


def checkpoint_location(source) -> Path:
    return Path(source.location) / source.gguf_file if source.gguf_file else Path(source.location)


class StreamedBlockFits:
    """`fits.BlockFits` for a checkpoint never loaded: the sums of every candidate block (and their
    token rows, for cosine) from one layer-by-layer pass over the fitted and the held-out samples."""

    def __init__(self, location, skeleton, blocks: list[list[int]], methods: list[str], samples, config: ShrinkConfig,
                 dtype, device):
        self.refused, self.usable = usable_repairs(skeleton, blocks, methods, config.layer_path)
        self.fits: dict[tuple, dict] = {block: {} for block in self.usable}
        self.fit_options = {method: {"progress": True} for method in methods
                            if not config.quiet and REPAIRS.get(method).iterative}
        self.location, self.skeleton, self.samples, self.config = location, skeleton, samples, config
        self.dtype, self.device = dtype, device
        self.statistics, self.judged = {}, {}
        # the token rows of cosine (3 x rows x d floats a block) in the first pass only where every block's fit
        # in SHARED_ROWS_BYTES together; else later, for the blocks that need them (`gather_rows`)
        rows = min(MAX_ROWS, samples.calibration.num_tokens)
        width = text_config(skeleton).hidden_size
        blocks_usable = one_block_only(self.usable)  # a scattered cut's gaps are fitted one by one (`fit_gaps`)
        with_rows = [block for block, usable in blocks_usable.items() if set(usable) & set(ROWS_KEPT_BY)]
        shared = 3 * rows * width * 4 * len(with_rows) <= SHARED_ROWS_BYTES
        wanted = {block: [m for m in usable if shared or m not in ROWS_KEPT_BY] for block, usable in blocks_usable.items()}
        self._gather({block: methods for block, methods in wanted.items() if methods})

    def _gather(self, wanted: dict[tuple, list[str]]) -> None:
        """One layer-by-layer pass for the sums (fitted and judging) of `wanted` ({block: methods})."""
        if not wanted:
            return
        log.info("shrink: gathering the repair sums of %d block(s), one layer at a time ...", len(wanted))
        samples, config = self.samples, self.config
        statistics, judged = streamed_block_statistics(
            self.location, samples.calibration.joined(samples.heldout), len(samples.calibration), wanted,
            len(find_layer_stack(self.skeleton, config.layer_path)), type(self.skeleton).__name__,
            dtype=self.dtype, device=self.device, batch_size=config.batch_size, layer_path=config.layer_path,
            seed=config.seed, trust_remote_code=config.trust_remote_code, progress=not config.quiet)
        for block in statistics.values():
            block.calibration = samples.calibration.as_dict()
        self.statistics.update(statistics)
        self.judged.update(judged)

    def get(self, layers: list[int], method: str):
        return get_fit(self, layers, method)

    def fit_gaps(self, layers: list[int], method: str) -> list:
        """One fit per gap of the scattered cut `layers`, one layer-by-layer pass a gap (`streamed_fit_gaps`)."""
        samples, config = self.samples, self.config
        return streamed_fit_gaps(self.location, samples.calibration.joined(samples.heldout), layers, method,
                                 heldout_from=len(samples.calibration), layer_path=config.layer_path,
                                 trust_remote_code=config.trust_remote_code, dtype=self.dtype, device=self.device,
                                 batch_size=config.batch_size, seed=config.seed, progress=not config.quiet)

    def gather_rows(self, blocks: list[list[int]]) -> None:
        """One more pass, for the `blocks` (of those asked for) whose sums lack the token rows their methods need."""
        self._gather(missing_rows(self, blocks))


class StreamedScorer:
    """`decision.MemoryScorer` for a checkpoint never loaded: every option of a phase scored in one
    walk over the layers, the unpruned model's predictions on the same windows computed on the way."""

    def __init__(self, location, sets: dict, config: ShrinkConfig, dtype, device):
        self.location, self.sets, self.config, self.dtype, self.device = location, sets, config, dtype, device
        self.losses = {name: [math.nan] * len(windows) for name, windows in sets.items()}
        self.walks = 0

    def windows(self) -> int:
        return min(len(windows) for windows in self.sets.values())

    def score(self, options: list, fits, part: tuple[int, int] | None, phase: str) -> None:
        live = []
        for option in options:
            if option.refused:
                continue
            try:
                option.fit = None if option.repair == "none" else fits.get(option.layers, option.repair)
            except DepthcutError as error:
                option.refused, option.fit = str(error), None
                continue
            live.append(option)
        if not live:
            return
        start, stop = part if part is not None else (0, None)
        sets = {name: windows.subset(start, stop) for name, windows in self.sets.items()}
        log.info("shrink: %s: %d option(s) at once, one walk over the layers ...", phase, len(live))
        started = time.perf_counter()
        references, scores = stream_scores(
            self.location, sets, [Trial(tuple(o.layers), fits_of(o.fit)) for o in live],
            batch_size=self.config.batch_size, dtype=self.dtype, device=self.device,
            layer_path=self.config.layer_path, trust_remote_code=self.config.trust_remote_code,
            spill_dir=self.config.spill_dir, progress=not self.config.quiet, description=phase)
        self.walks += 1
        for name, reference in references.items():
            self.losses[name][start : start + len(reference)] = reference.loss
        share = (time.perf_counter() - started) / len(live)
        for option, scored in zip(live, scores, strict=True):
            option.scores = {name: option.scores[name] + value if name in option.scores else value
                             for name, value in scored.items()}
            option.seconds += share

    def unpruned_losses(self) -> dict[str, list[float]]:
        return {name: [value for value in losses if not math.isnan(value)] for name, losses in self.losses.items()}


def streamed_writer(prune, source, fit, record: dict | None):
    """The backend that writes the winner without loading the model (shard by shard, or tensor by tensor
    into a GGUF), its repair `fit` (None: the plain cut) folded into the tensors it changes, as scored:
    not fitted again. `record`: what provenance records of the repair."""
    backend = backend_for(prune, source, None, gguf_output(prune.out), streamable=True)
    if fits_of(fit):
        changed = folded_tensors(checkpoint_location(source), list(fits_of(fit)), prune.layer_path,
                                 prune.trust_remote_code)
        record = {**record, "streamed": True, "changed_tensors": sorted(changed)}
        backend.fitted = (record, changed)
    return backend
