"""Training-free repair of a model that is never loaded: statistics gathered while the model is
streamed one decoder layer at a time (`depthcut.analysis.streamed`), the fit folded into just the tensors
it changes, read from the checkpoint one module at a time.

The streamed pass keeps, per calibration batch, the state entering the first removed layer l and
the MLP output m_{l-1} of layer l-1, from the moment batch b leaves layer l-1 until it leaves
layer l+n-1; then the batch's sums are added (`statistics.Accumulator`, the in-memory path's own
arithmetic) and both are freed. That is at most two copies of the hidden states the stream already
holds, whatever the depth of the cut; no layer after the cut is read or computed.

Rows of the calibration set from `heldout_from` on are held out: their sums go to statistics of
their own, which judge the fit on text it never saw, in the same pass.

    fit, tensors = streamed_repair(folder, calibration, range(l, l + n), "lstsq")
    # tensors: {checkpoint tensor name: new value}; write them in place of the originals while
    # the kept tensors are copied (depthcut.model.shards.prune_shards(..., replaced=tensors))

A cut of several gaps gets one fit per gap (`streamed_fit_gaps`), one stream each: gap k's stream passes
through the earlier gaps' layers unchanged and has their fits folded in (`depthcut.repair.gaps_streamed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from depthcut.analysis.calibration import CalibrationSet
from depthcut.analysis.checkpoint import load_parameters, open_checkpoint, parameter_keys
from depthcut.analysis.streamed import stream_states
from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack, output_tensor
from depthcut.repair import REPAIRS
from depthcut.repair.architectures import architecture_of, submodule
from depthcut.repair.gaps import check_gaps, gap_runs
from depthcut.repair.gaps_streamed import CutAndRepaired
from depthcut.repair.methods import RepairFit
from depthcut.repair.run import fit_judged
from depthcut.repair.statistics import MAX_ROWS, Accumulator, RepairStatistics, contiguous_block


class _RepairObserver:
    """Feeds the repair sums while the stream runs (see `depthcut.analysis.streamed.stream_states`)."""

    def __init__(self, statistics: RepairStatistics, heldout: RepairStatistics | None, heldout_from: int,
                 linear: bool, max_rows: int, seed: int):
        self.fitting = Accumulator(statistics, linear, max_rows, seed)
        self.judging = Accumulator(heldout, linear, 0, seed) if heldout is not None else None
        self.heldout_from, self.linear = heldout_from, linear
        self.entering: dict[int, torch.Tensor] = {}  # batch -> x_l, waiting for the batch to reach the cut's end
        self.mlp_outputs: dict[int, torch.Tensor] = {}
        self.last_mlp: torch.Tensor | None = None
        self.handle = None

    def begin(self, model, stack, batches: list) -> None:
        self.batches = batches
        self.row_starts = [0]
        for _, mask in batches:
            self.row_starts.append(self.row_starts[-1] + mask.shape[0])
        first = self.fitting.stats.first
        if self.linear:
            mlp = submodule(stack.layers[first - 1], architecture_of(model).mlp, "MLP", first - 1)

            def keep(module, args, output):
                # Cloned (Falcon adds the attention output into this tensor in place afterwards), as a
                # plain tensor: the stream computes in inference mode, the cosine fit takes gradients.
                with torch.inference_mode(False):
                    self.last_mlp = output_tensor(output).detach().clone()

            self.handle = mlp.register_forward_hook(keep)

    def after_layer(self, index: int, b: int, hidden: torch.Tensor) -> None:
        first, stop = self.fitting.stats.first, self.fitting.stats.stop
        # The stream computes in inference mode; what is kept must be plain tensors (the cosine fit
        # takes gradients through the rows kept for it).
        with torch.inference_mode(False):
            if index == first - 1:
                self.entering[b] = hidden.detach().clone()
                if self.linear:
                    self.mlp_outputs[b], self.last_mlp = self.last_mlp, None
            if index == stop - 1:
                self._add(b, hidden)

    def _add(self, b: int, target: torch.Tensor) -> None:
        """Batch b's tokens into the fitted sums, its held-out rows into the judging ones."""
        mask = self.batches[b][1]
        x, m = self.entering.pop(b), self.mlp_outputs.pop(b, None)
        split = min(max(self.heldout_from - self.row_starts[b], 0), mask.shape[0])
        for accumulator, rows in ((self.fitting, slice(0, split)), (self.judging, slice(split, None))):
            if accumulator is None or not mask[rows].numel():
                continue
            accumulator.valid = mask[rows].reshape(-1).bool()
            accumulator.x = x[rows]
            accumulator.m = m[rows] if m is not None else None
            accumulator.add(target[rows])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def streamed_repair_statistics(source: str | Path, calibration: CalibrationSet, block, methods,
                               *, heldout_from: int | None = None, dtype: torch.dtype | None = None,
                               device: torch.device | str = "cpu", batch_size: int = 8, layer_path: str | None = None,
                               max_rows: int = MAX_ROWS, seed: int = 0, trust_remote_code: bool = False,
                               progress: bool = False, earlier: Sequence[RepairFit] = (),
                               ) -> tuple[RepairStatistics, RepairStatistics | None]:
    """`repair_statistics` for the checkpoint `source` (safetensors folder or .gguf), streamed one
    layer at a time: (the statistics of rows [0, heldout_from), those of the rows after; None
    without `heldout_from`). The methods are checked before anything is computed. `earlier`: fits of
    gaps before `block` (the checkpoint's numbering), cut and repaired in the stream first."""

    if batch_size < 1:
        raise DepthcutError("batch size must be at least 1")
    device = torch.device(device)
    skeleton, _, _ = open_checkpoint(source, trust_remote_code=trust_remote_code)
    stack = find_layer_stack(skeleton, layer_path)
    first, stop = contiguous_block(block, len(stack))
    arch = architecture_of(skeleton)
    chosen = [REPAIRS.get(name) for name in methods]
    for method in chosen:
        method.check(skeleton, stack, arch, first, stop)
    linear = any(method.linear for method in chosen)
    heldout_from = len(calibration) if heldout_from is None else heldout_from
    if not 0 < heldout_from <= len(calibration):
        raise DepthcutError(f"the held-out rows must start within the {len(calibration)} calibration samples")
    name = type(skeleton).__name__
    statistics = RepairStatistics(first, stop, len(stack), tuple(methods), name, calibration=calibration.as_dict())
    judged_methods = ("lstsq",) if linear else ("magnitude",)
    heldout = (RepairStatistics(first, stop, len(stack), judged_methods, name)
               if heldout_from < len(calibration) else None)
    observer = _RepairObserver(statistics, heldout, heldout_from, linear, max_rows if "cosine" in methods else 0, seed)
    if earlier:
        observer = CutAndRepaired(earlier, observer)
    del skeleton
    try:
        stream_states(source, calibration, [], batch_size=batch_size, dtype=dtype, device=device,
                      layer_path=layer_path, trust_remote_code=trust_remote_code, observer=observer,
                      last_layer=stop - 1, progress=progress)
    finally:
        observer.close()
    for stats in filter(None, (statistics, heldout)):
        if stats.tokens == 0 or stats.y_sq == 0:
            raise DepthcutError("the calibration data gave no tokens to fit a repair on")
    return statistics, heldout


def streamed_fit_gaps(source: str | Path, calibration: CalibrationSet, layers, method: str, *,
                      heldout_from: int | None = None, layer_path: str | None = None, trust_remote_code: bool = False,
                      **stream) -> list[RepairFit]:
    """`depthcut.repair.gaps.fit_gaps` for the checkpoint `source`, streamed: one stream per gap (rows from
    `heldout_from` on judge each fit), gap k's on the checkpoint with the gaps before k cut and their fits
    folded in. `stream`: `streamed_repair_statistics`' options (dtype, device, batch_size, seed, progress)."""
    skeleton = open_checkpoint(source, trust_remote_code=trust_remote_code)[0]
    check_gaps(skeleton, layers, method, layer_path)
    runs = gap_runs(layers, len(find_layer_stack(skeleton, layer_path)))
    del skeleton
    fits: list[RepairFit] = []
    for first, stop in runs:
        statistics, judged = streamed_repair_statistics(
            source, calibration, range(first, stop), [method], heldout_from=heldout_from, layer_path=layer_path,
            trust_remote_code=trust_remote_code, earlier=fits, **stream)
        fit = fit_judged(method, statistics, judged)
        if fits:
            fit.details["fitted_after_gaps"] = [[gap.first, gap.stop] for gap in fits]
        fits.append(fit)
    return fits


def check_streamed_repair(source: str | Path, layers, method: str, layer_path: str | None = None,
                          trust_remote_code: bool = False) -> None:
    """The refusal `method` would give for any gap of removing `layers` from the checkpoint `source`, from a
    weightless skeleton (nothing read but the config)."""

    check_gaps(open_checkpoint(source, trust_remote_code=trust_remote_code)[0], layers, method, layer_path)


@torch.no_grad()
def folded_tensors(source: str | Path, fit: RepairFit | Sequence[RepairFit], layer_path: str | None = None,
                   trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint tensors that folding `fit` (or several fits, one per gap, in order) changes, folded:
    {checkpoint name: new value}, in the dtype they are stored in (a GGUF's are dequantized: float32).
    Only the modules the methods fold into are read, one at a time, each once."""

    fits = [fit] if isinstance(fit, RepairFit) else list(fit)
    model, _, reader = open_checkpoint(source, trust_remote_code=trust_remote_code)
    stack = find_layer_stack(model, layer_path)
    arch = architecture_of(model)
    touched: dict[int, tuple[torch.nn.Module, list[RepairFit]]] = {}  # module -> the fits folded into it, in order
    for one in fits:
        if len(stack) != one.num_layers:
            raise DepthcutError(f"this repair was fitted on a model of {one.num_layers} layers, {source} has {len(stack)}")
        method = REPAIRS.get(one.method)
        method.check(model, stack, arch, one.first, one.stop)
        for module in method.modules(model, stack, arch, one):
            touched.setdefault(id(module), (module, []))[1].append(one)
    paths = {id(module): name for name, module in model.named_modules()}
    changed = {}
    for module, folded in touched.values():
        keys = parameter_keys(module, paths[id(module)], reader)
        load_parameters(module, keys, reader, None, torch.device("cpu"))
        for one in folded:
            REPAIRS.get(one.method).fold(module, one)
        parameters = dict(module.named_parameters())
        changed.update({key: parameters[name].detach().clone() for name, key in keys.items()})
        module.to("meta")
    return changed
