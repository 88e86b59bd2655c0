"""Folding a d x d matrix or a scalar into the weights that write into the residual stream.

Arithmetic is done in float64 and the result cast back to the weight's own dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def _set(parameter: nn.Parameter, value: torch.Tensor) -> None:
    parameter.copy_(value.to(parameter.dtype))


@torch.no_grad()
def fold_transform(projection: nn.Module, transform: torch.Tensor) -> None:
    """Make `projection`'s output y become y T.

    nn.Linear (weight (d, k), y = h W^T + b): W' = T^T W, b' = b T.
    Conv1D (weight (k, d), y = h W + b): W' = W T, b' = b T.
    """

    weight = projection.weight
    t = transform.to(weight.device, torch.float64)  # (d, d)
    if isinstance(projection, Conv1D):
        _set(weight, weight.double() @ t)
    else:
        _set(weight, t.T @ weight.double())
    if getattr(projection, "bias", None) is not None:
        _set(projection.bias, projection.bias.double() @ t)


@torch.no_grad()
def scale(module: nn.Module, factor: float) -> None:
    """Multiply a module's weight and bias (when it has one) by `factor`: its output scales with it."""
    for name in ("weight", "bias"):
        parameter = getattr(module, name, None)
        if parameter is not None:
            _set(parameter, parameter.double() * factor)
