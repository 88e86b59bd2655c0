"""ReplaceMe (Shopkhoev et al., 2025, arXiv 2505.02819): a linear map fitted by least squares.

Fit T (d x d) so that (x_l - m) + m T ~ x_{l+n}, with m the MLP output of layer l-1, i.e.
m T ~ r = x_{l+n} - x_l + m: T = (M^T M + ridge I)^-1 M^T R in float64, from sums over tokens.
Folded into layer l-1's MLP output projection, so that layer writes m T instead of m.
"""

from __future__ import annotations

import torch

from depthcut.errors import DepthcutError
from depthcut.repair.architectures import mlp_output_projection, refuse_post_norm
from depthcut.repair.fold import fold_transform
from depthcut.repair.methods import RepairFit, RepairMethod, register_repair
from depthcut.repair.statistics import relative_error


def solve(statistics, ridge: float) -> torch.Tensor:
    """(M^T M + ridge I)^-1 M^T R in float64 on the CPU; min-norm least squares when singular."""
    gram = statistics.mtm.cpu().double()
    rhs = statistics.mtr.cpu().double()
    if ridge < 0:
        raise DepthcutError(f"ridge must be >= 0, got {ridge}")
    if ridge:
        gram = gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(gram, rhs, driver="gelsd").solution


RIDGE_PATH = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # times the mean diagonal of M^T M


def choose_ridge(statistics, heldout) -> tuple[float, list[dict]]:
    """The ridge of the map that does best on held-out text: T(lambda) solved on `statistics` for each
    lambda of a path scaled to the data (RIDGE_PATH x mean diagonal of M^T M), judged by its relative
    error on the held-out sums `heldout` (closed form: a path costs a few solves, no pass over the
    model). Returns (the chosen ridge, the path with each ridge's held-out error)."""
    scale = float(statistics.mtm.diagonal().double().mean().clamp_min(1e-30))
    path = []
    for factor in RIDGE_PATH:
        ridge = factor * scale
        path.append({"ridge": ridge, "heldout_error": relative_error(heldout, solve(statistics, ridge))})
    best = min(path, key=lambda step: step["heldout_error"])
    return best["ridge"], path


def refuse_unless_linear(name, model, stack, arch, first, stop) -> None:
    if first == 0:
        raise DepthcutError(
            f"{name} repair refused: the block starts at layer 0, so there is no layer l-1 whose MLP output "
            "projection could carry the fitted map (use the magnitude repair, or cut later)"
        )
    refuse_post_norm(stack, arch, first - 1, name)
    mlp_output_projection(stack, arch, first - 1)


@register_repair
class LeastSquares(RepairMethod):
    name = "lstsq"
    linear = True

    def check(self, model, stack, arch, first, stop):
        refuse_unless_linear(self.name, model, stack, arch, first, stop)

    def fit(self, statistics, ridge: float = 0.0) -> RepairFit:
        transform = solve(statistics, ridge)
        return RepairFit(
            method=self.name, first=statistics.first, stop=statistics.stop, num_layers=statistics.num_layers,
            tokens=statistics.tokens, error_before=statistics.error_before,
            error_after=relative_error(statistics, transform), ridge=ridge, transform=transform,
        )

    def modules(self, model, stack, arch, fit):
        return [mlp_output_projection(stack, arch, fit.first - 1)]

    def fold(self, module, fit):
        fold_transform(module, fit.transform)
