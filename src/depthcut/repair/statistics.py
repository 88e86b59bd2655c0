"""One forward pass of the original model that gathers what every repair method needs.

With x = x_l the residual stream entering the first removed layer l, m = m_{l-1} the output of
layer l-1's MLP (what its residual add adds), y = x_{l+n} the stream entering the first kept
layer after the cut (the output of the last layer when the cut reaches the end), and the
regression target r = y - x + m, it accumulates in float64 over every non-padding token:

- always: sum |x|, sum |y|, sum |x|^2, sum |y|^2, sum x.y (magnitude, and the plain-pruning error);
- for lstsq/cosine: M^T M and M^T R (d x d each) and sum |r|^2, so no activation is kept;
- for cosine: a uniformly random subset of at most `max_rows` token rows (x - m, m, y), in float32
  on the CPU (3 * max_rows * d * 4 bytes: 3 GiB for d = 4096 at the default 65536 rows).

The forward pass stops at the cut: nothing after layer l+n is computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from depthcut.analysis.calibration import CalibrationSet
from depthcut.analysis.capture import StopForward
from depthcut.errors import DepthcutError
from depthcut.model.layers import LayerStack, find_layer_stack, first_tensor, output_tensor
from depthcut.model.surgery import validate_layers
from depthcut.repair import REPAIRS
from depthcut.repair.architectures import architecture_of, submodule

# Token rows upcast to float64 at a time while accumulating.
CHUNK_ROWS = 4096
MAX_ROWS = 65536


@dataclass
class RepairStatistics:
    """Float64 sums over the calibration tokens for the block [first, stop) of a `num_layers` model."""

    first: int
    stop: int
    num_layers: int
    methods: tuple[str, ...]
    architecture: str
    tokens: int = 0
    x_norm: float = 0.0  # sum over tokens of |x_l|
    y_norm: float = 0.0  # sum over tokens of |x_{l+n}|
    x_sq: float = 0.0
    y_sq: float = 0.0
    xy: float = 0.0
    mtm: torch.Tensor | None = None  # (d, d) M^T M
    mtr: torch.Tensor | None = None  # (d, d) M^T R, R = Y - X + M
    r_sq: float = 0.0
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # "base", "m", "target": (K, d) float32
    calibration: dict = field(default_factory=dict)

    def check_finite(self) -> None:
        """Refuse sums that are not finite: no repair is fitted on a NaN or an infinity (a weight of
        the model up to the cut that is not finite, or activations that overflowed its dtype)."""
        sums = [self.x_norm, self.y_norm, self.x_sq, self.y_sq, self.xy, self.r_sq]
        tensors = [t for t in (self.mtm, self.mtr, *self.rows.values()) if t is not None]
        if not all(map(math.isfinite, sums)) or not all(bool(t.isfinite().all()) for t in tensors):
            raise DepthcutError(f"the repair statistics of layers {self.first}-{self.stop - 1} hold NaN or infinite "
                                f"values: the activations entering layer {self.first} or leaving layer "
                                f"{self.stop - 1} are not finite (is a weight of the model before it?); no repair "
                                "is fitted on them")

    @property
    def block(self) -> tuple[int, int]:
        return (self.first, self.stop)

    @property
    def error_before(self) -> float:
        """|x_l - x_{l+n}|^2 / |x_{l+n}|^2 summed over tokens: the error of plain pruning at the cut."""
        return (self.x_sq - 2 * self.xy + self.y_sq) / self.y_sq


def contiguous_block(block: Iterable[int], num_layers: int) -> tuple[int, int]:
    """`block` (layer indices, e.g. ``range(3, 6)``) as a half-open (first, stop), refusing gaps."""

    layers = validate_layers(block, num_layers)
    first, stop = layers[0], layers[-1] + 1
    if layers != list(range(first, stop)):
        raise DepthcutError(
            f"repair needs one contiguous block of layers, got {layers}: the cut must be a single place "
            "in the residual stream. Repair and prune each block separately."
        )
    return first, stop


class Accumulator:
    def __init__(self, stats: RepairStatistics, linear: bool, max_rows: int, seed: int):
        self.stats = stats
        self.linear = linear
        self.max_rows = max_rows if "cosine" in stats.methods else 0
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
        self.valid: torch.Tensor | None = None
        self.x: torch.Tensor | None = None
        self.m: torch.Tensor | None = None

    def add(self, y: torch.Tensor) -> None:
        """Sum the tokens of one batch: (B, T, d) states -> (K, d) non-padding rows, in chunks."""
        valid = self.valid.to(y.device)
        width = y.shape[-1]
        x = self.x.to(y.device).reshape(-1, width)[valid]  # (K, d)
        y = y.reshape(-1, width)[valid]
        m = self.m.to(y.device).reshape(-1, width)[valid] if self.linear else None
        s = self.stats
        for start in range(0, x.shape[0], CHUNK_ROWS):
            xc = x[start : start + CHUNK_ROWS].double()
            yc = y[start : start + CHUNK_ROWS].double()
            s.tokens += xc.shape[0]
            s.x_norm += float(torch.linalg.vector_norm(xc, dim=-1).sum())
            s.y_norm += float(torch.linalg.vector_norm(yc, dim=-1).sum())
            s.x_sq += float((xc * xc).sum())
            s.y_sq += float((yc * yc).sum())
            s.xy += float((xc * yc).sum())
            if m is None:
                continue
            mc = m[start : start + CHUNK_ROWS].double()
            rc = yc - xc + mc
            if s.mtm is None:
                width = mc.shape[1]
                s.mtm = torch.zeros(width, width, dtype=torch.float64, device=mc.device)
                s.mtr = torch.zeros(width, width, dtype=torch.float64, device=mc.device)
            s.mtm += mc.T @ mc
            s.mtr += mc.T @ rc
            s.r_sq += float((rc * rc).sum())
            if self.max_rows:
                self._sample(xc - mc, mc, yc)
        # this batch's captures, let go at once: a pass gathering for every block would otherwise hold two
        # (B, T, d) tensors per block after it, and the passes that follow ran 1.5x slower for it
        self.x = self.m = None

    def _sample(self, base: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the rows with the `max_rows` smallest random keys seen so far: a uniform subset."""
        keys = torch.rand(base.shape[0], generator=self.generator)
        rows = self.stats.rows
        if len(self.keys) >= self.max_rows:
            fresh = keys < self.keys.max()
            if not fresh.any():
                return
            keys, base, m, y = keys[fresh], base[fresh.to(base.device)], m[fresh.to(m.device)], y[fresh.to(y.device)]
        new = {"base": base, "m": m, "target": y}
        for name, value in new.items():
            value = value.float().cpu()
            rows[name] = torch.cat([rows[name], value]) if name in rows else value
        self.keys = torch.cat([self.keys, keys])
        if len(self.keys) > self.max_rows:
            keep = torch.topk(self.keys, self.max_rows, largest=False).indices
            self.keys = self.keys[keep]
            for name in rows:
                rows[name] = rows[name][keep]

    def hooks(self, stack: LayerStack, mlp: torch.nn.Module | None):
        """Capture x and m, and sum at the target; the pass is stopped by `stop_after` (once every
        accumulator of a shared pass has summed)."""
        first, stop = self.stats.first, self.stats.stop

        def entering(module, args, kwargs):
            self.x = first_tensor(args, kwargs).detach().clone()

        def mlp_out(module, args, output):
            # Cloned: Falcon adds the attention output into this tensor in place afterwards.
            self.m = output_tensor(output).detach().clone()

        def target_in(module, args, kwargs):
            self.add(first_tensor(args, kwargs))

        def target_out(module, args, kwargs, output):
            self.add(output_tensor(output))

        layers = stack.layers
        handles = [layers[first].register_forward_pre_hook(entering, with_kwargs=True)]
        if mlp is not None:
            handles.append(mlp.register_forward_hook(mlp_out))
        if stop < len(layers):
            handles.append(layers[stop].register_forward_pre_hook(target_in, with_kwargs=True))
        else:
            handles.append(layers[-1].register_forward_hook(target_out, with_kwargs=True))
        return handles


def stop_after(stack: LayerStack, stop: int):
    """A hook that ends the pass where the last target is summed (registered after the summing hooks, so
    it runs after them)."""

    def stop_in(module, args, kwargs):
        raise StopForward

    def stop_out(module, args, kwargs, output):
        raise StopForward

    if stop < len(stack.layers):
        return stack.layers[stop].register_forward_pre_hook(stop_in, with_kwargs=True)
    return stack.layers[-1].register_forward_hook(stop_out, with_kwargs=True)


def repair_statistics(
    model,
    calibration: CalibrationSet,
    block: Iterable[int],
    methods: Sequence[str],
    layer_path: str | None = None,
    *,
    batch_size: int = 8,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
    progress: bool = False,
) -> RepairStatistics:
    """Run the ORIGINAL model once over `calibration` and gather the sums the `methods` need.

    `block` holds the indices of the layers that will be removed (one contiguous run, e.g.
    ``range(3, 6)``). Every method is checked against the model before the forward pass, so a
    refusal costs nothing. `max_rows` bounds the token rows kept for ``cosine`` (drawn with `seed`).
    """
    gathered = block_statistics(model, calibration, {tuple(block): methods}, layer_path, batch_size=batch_size,
                                max_rows=max_rows, seed=seed, progress=progress)
    return next(iter(gathered.values()))


class BlockGatherer:
    """The sums of several blocks, gathered by hooks during forward passes run by someone else: the
    statistics pass below, or the analysis pass of `depthcut shrink` (so that no pass of its own is
    needed). {block (its layers): the methods to gather for it}; every method is checked first."""

    def __init__(self, model, calibration: CalibrationSet, blocks: Mapping[tuple[int, ...], Sequence[str]],
                 layer_path: str | None = None, *, max_rows: int = MAX_ROWS, seed: int = 0):
        self.stack = find_layer_stack(model, layer_path)
        arch = architecture_of(model)
        self.accumulators = {}
        for block, methods in blocks.items():
            if not methods:
                raise DepthcutError("no repair method asked for")
            first, stop = contiguous_block(block, len(self.stack))
            chosen = [REPAIRS.get(name) for name in methods]
            for method in chosen:
                method.check(model, self.stack, arch, first, stop)
            linear = any(method.linear for method in chosen)
            stats = RepairStatistics(first, stop, len(self.stack), tuple(methods), type(model).__name__,
                                     calibration=calibration.as_dict())
            mlp = submodule(self.stack.layers[first - 1], arch.mlp, "MLP", first - 1) if linear else None
            self.accumulators[block] = (Accumulator(stats, linear, max_rows, seed), mlp)

    @property
    def furthest_stop(self) -> int:
        return max(accumulator.stats.stop for accumulator, _ in self.accumulators.values())

    @contextmanager
    def hooks(self):
        handles = [handle for accumulator, mlp in self.accumulators.values()
                   for handle in accumulator.hooks(self.stack, mlp)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        for accumulator, _ in self.accumulators.values():
            accumulator.valid = attention_mask.reshape(-1).bool()
            accumulator.x = accumulator.m = None

    def result(self) -> dict[tuple[int, ...], RepairStatistics]:
        for accumulator, _ in self.accumulators.values():
            if accumulator.stats.tokens == 0 or accumulator.stats.y_sq == 0:
                raise DepthcutError("the calibration data gave no tokens to fit a repair on")
            accumulator.stats.check_finite()
        return {block: accumulator.stats for block, (accumulator, _) in self.accumulators.items()}


@torch.no_grad()
def block_statistics(
    model,
    calibration: CalibrationSet,
    blocks: Mapping[tuple[int, ...], Sequence[str]],
    layer_path: str | None = None,
    *,
    batch_size: int = 8,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
    progress: bool = False,
) -> dict[tuple[int, ...], RepairStatistics]:
    """`repair_statistics` for several blocks from ONE pass over `calibration`: {block (its layers, as
    given): the methods to gather for it} -> {block: its statistics}. Each block's sums are exactly
    those a pass of its own gives; the pass stops after the furthest block."""

    if batch_size < 1:
        raise DepthcutError("batch size must be at least 1")
    gatherer = BlockGatherer(model, calibration, blocks, layer_path, max_rows=max_rows, seed=seed)
    if not gatherer.accumulators:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(calibration), desc="repair statistics", unit="sample", disable=not progress)
    stopper = None
    try:
        with gatherer.hooks():
            stopper = stop_after(gatherer.stack, gatherer.furthest_stop)  # after the sums' hooks: runs after them
            for input_ids, attention_mask in calibration.batches(batch_size):
                gatherer.start_batch(attention_mask)
                try:
                    model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
                except StopForward:
                    pass
                else:
                    raise RuntimeError("the forward pass never reached the cut; is the layer path right?")
                bar.update(input_ids.shape[0])
    finally:
        bar.close()
        if stopper is not None:
            stopper.remove()
        model.train(was_training)
    return gatherer.result()


def relative_error(statistics, transform: torch.Tensor) -> float:
    """sum |(x - m) + m T - y|^2 / sum |y|^2 = (tr(T^T A T) - 2 tr(T^T B) + sum |r|^2) / sum |y|^2."""
    gram, rhs = statistics.mtm.cpu().double(), statistics.mtr.cpu().double()
    t = transform.double()
    squared = (t * (gram @ t)).sum() - 2 * (t * rhs).sum() + statistics.r_sq
    return float(squared.clamp_min(0)) / statistics.y_sq
