"""The stream of a partly cut and repaired model, while the unpruned checkpoint is streamed one layer at a
time (`depthcut.analysis.streamed.stream_states`): what the later gaps of a cut are fitted on when the
model is never loaded (`depthcut.repair.streamed.streamed_fit_gaps`).

The stream still runs every layer of the checkpoint (it cannot skip one), so the earlier gaps are cut by
making each of their layers give back the state it was given, and repaired by folding each earlier fit
into the modules it changes as soon as they hold their weights (their first call after loading): the
state after an earlier gap is then exactly that of the model with the gap removed and its fit folded in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from depthcut.errors import DepthcutError
from depthcut.model.layers import first_tensor
from depthcut.repair import REPAIRS
from depthcut.repair.architectures import architecture_of
from depthcut.repair.methods import RepairFit


class CutAndRepaired:
    """A stream observer that turns the stream into that of the model with `fits`' gaps cut and repaired,
    then passes every layer's output on to `inner` (the observer that gathers the next gap's sums)."""

    def __init__(self, fits: Sequence[RepairFit], inner):
        self.fits, self.inner = list(fits), inner
        self.removed = {index for fit in self.fits for index in range(fit.first, fit.stop)}
        self.entered: torch.Tensor | None = None  # the state the removed layer now computing was given
        self.handles: list = []

    def begin(self, model, stack, batches: list) -> None:
        if any(fit.num_layers != len(stack) for fit in self.fits):
            raise DepthcutError(f"these repairs were fitted on a model of {self.fits[0].num_layers} layers, "
                                f"the checkpoint has {len(stack)}")
        arch = architecture_of(model)
        touched: dict[int, tuple[torch.nn.Module, list[RepairFit]]] = {}
        for fit in self.fits:
            for module in REPAIRS.get(fit.method).modules(model, stack, arch, fit):
                touched.setdefault(id(module), (module, []))[1].append(fit)
        for module, fits in touched.values():
            self.handles.append(module.register_forward_pre_hook(self._folding(fits)))
        for index in sorted(self.removed):
            self.handles.append(stack.layers[index].register_forward_pre_hook(self._entering, with_kwargs=True))
        self.inner.begin(model, stack, batches)

    @staticmethod
    def _folding(fits: list[RepairFit]):
        """A pre-hook that folds `fits`, in order, into its module on the module's first call: each module is
        loaded once per stream, and called once per batch."""
        folded = []

        def fold(module, args):
            if not folded:
                with torch.no_grad():
                    for fit in fits:
                        REPAIRS.get(fit.method).fold(module, fit)
                folded.append(True)

        return fold

    def _entering(self, module, args, kwargs):
        self.entered = first_tensor(args, kwargs).detach().clone()

    def after_layer(self, index: int, b: int, hidden: torch.Tensor) -> None:
        if index in self.removed:
            hidden.copy_(self.entered)  # the layer is cut: what leaves it is what entered it
            self.entered = None
        self.inner.after_layer(index, b, hidden)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.inner.close()
