"""A repair method's base (`RepairMethod`), its fit (`RepairFit`), and fitting and folding by name."""


from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from depthcut.errors import DepthcutError
from depthcut.model.layers import LayerStack, find_layer_stack
from depthcut.repair import REPAIRS
from depthcut.repair.architectures import Architecture, architecture_of
from depthcut.repair.statistics import RepairStatistics, contiguous_block, relative_error


@dataclass
class RepairFit:
    """A fitted repair for the block [first, stop) of a `num_layers`-layer model.

    `error_before` / `error_after`: relative squared error sum |pred - x_{l+n}|^2 / sum |x_{l+n}|^2
    over the calibration tokens, with pred = x_l (plain pruning) and pred = the repaired stream.
    """

    method: str
    first: int
    stop: int
    num_layers: int
    tokens: int
    error_before: float
    error_after: float
    ridge: float | None = None
    transform: torch.Tensor | None = None  # (d, d) float64 T, lstsq/cosine
    alpha: float | None = None  # magnitude
    details: dict = field(default_factory=dict)

    @property
    def block(self) -> tuple[int, int]:
        return (self.first, self.stop)

    def error_on(self, statistics: RepairStatistics) -> float:
        """The relative squared error at the cut of this repair on other statistics of the same block
        (held-out text): exact from the sums, as on the calibration data."""
        if statistics.block != self.block:
            raise DepthcutError(f"statistics of block {statistics.block} cannot judge a fit of block {self.block}")
        if self.transform is not None:
            if statistics.mtm is None:
                raise DepthcutError("judging a linear repair needs statistics gathered for lstsq")

            return relative_error(statistics, self.transform)
        alpha = self.alpha
        squared = alpha * alpha * statistics.x_sq - 2 * alpha * statistics.xy + statistics.y_sq
        return max(squared, 0.0) / statistics.y_sq

    def as_dict(self) -> dict:
        result = {
            "method": self.method,
            "block": [self.first, self.stop],
            "layers": list(range(self.first, self.stop)),
            "tokens": self.tokens,
            "ridge": self.ridge,
            "relative_error_before": self.error_before,
            "relative_error_after": self.error_after,
        }
        if self.alpha is not None:
            result["alpha"] = self.alpha
        return {**result, **self.details}


class RepairMethod:
    """Base class: `check` refuses before any work, `fit` reads statistics, `apply` folds the fit
    into `modules` (the only ones whose weights change) one at a time with `fold`, so that a
    layer-streamed model can load, fold and write just those (`depthcut.repair.streamed`)."""

    name: str = ""
    linear: bool = False  # needs M^T M, M^T R (and an MLP at layer l-1)
    refines: str | None = None  # the method whose fit this one starts from and refines
    iterative: bool = False  # fitted by steps of an optimizer: `fit` takes progress=True for a bar with the time left

    def check(self, model: nn.Module, stack: LayerStack, arch: Architecture, first: int, stop: int) -> None:
        raise NotImplementedError

    def fit(self, statistics: RepairStatistics, **options) -> RepairFit:
        raise NotImplementedError

    def modules(self, model: nn.Module, stack: LayerStack, arch: Architecture, fit: RepairFit) -> list[nn.Module]:
        """The modules whose weights `fold` changes."""
        raise NotImplementedError

    def fold(self, module: nn.Module, fit: RepairFit) -> None:
        """Fold `fit` into one of `modules`' weights, in place."""
        raise NotImplementedError

    def apply(self, model: nn.Module, stack: LayerStack, arch: Architecture, fit: RepairFit) -> None:
        for module in self.modules(model, stack, arch, fit):
            self.fold(module, fit)


def register_repair(cls: type[RepairMethod]) -> type[RepairMethod]:
    REPAIRS.register(cls.name)(cls())
    return cls


def check_repair(model: nn.Module, block, method: str, layer_path: str | None = None) -> None:
    """Raise the refusal `method` would give for removing `block` from `model`, without computing."""
    stack = find_layer_stack(model, layer_path)
    first, stop = contiguous_block(block, len(stack))
    REPAIRS.get(method).check(model, stack, architecture_of(model), first, stop)


def fit_repair(method: str, statistics: RepairStatistics, **options) -> RepairFit:
    """Fit `method` on `statistics` (which must have been gathered for it); `options` go to the method
    (lstsq: ridge; cosine: ridge, steps, lr, batch_rows, seed)."""
    chosen = REPAIRS.get(method)
    if method not in statistics.methods:
        raise DepthcutError(
            f"these statistics were gathered for {', '.join(statistics.methods)}, not {method!r}; "
            f"pass methods=[..., {method!r}] to repair_statistics"
        )
    return chosen.fit(statistics, **options)


@torch.no_grad()
def apply_repair(model: nn.Module, fit: RepairFit, layer_path: str | None = None) -> nn.Module:
    """Fold `fit` into the weights of the UNPRUNED `model`, in place; prune the block afterwards."""
    stack = find_layer_stack(model, layer_path)
    if len(stack) != fit.num_layers:
        raise DepthcutError(
            f"this repair was fitted on a model of {fit.num_layers} layers, this one has {len(stack)}: "
            "apply it to the original model, before pruning"
        )
    method = REPAIRS.get(fit.method)
    arch = architecture_of(model)
    method.check(model, stack, arch, fit.first, fit.stop)
    method.apply(model, stack, arch, fit)
    return model


@contextmanager
def repair_folded(model: nn.Module, fit: RepairFit, layer_path: str | None = None) -> Iterator[nn.Module]:
    """`model` with `fit` folded in (`apply_repair`) inside the block, and its weights as they were after:
    only the modules the fold changes are saved (one projection for a linear map), not the model."""
    stack = find_layer_stack(model, layer_path)
    method = REPAIRS.get(fit.method)
    modules = method.modules(model, stack, architecture_of(model), fit)
    saved = [(parameter, parameter.detach().clone()) for module in modules for parameter in module.parameters()]
    apply_repair(model, fit, layer_path)
    try:
        yield model
    finally:
        with torch.no_grad():
            for parameter, value in saved:
                parameter.copy_(value)
