"""ReplaceMe's cosine variant (arXiv 2505.02819): T minimising the mean cosine distance.

Starts from the least-squares T and takes `steps` Adam steps on T alone, minimising the mean over
tokens of 1 - cos((x_l - m) + m T, x_{l+n}). The tokens are the uniform random subset (at most
`max_rows`, 65536 by default) that `repair_statistics` keeps; folded like lstsq.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from depthcut.errors import DepthcutError
from depthcut.repair.architectures import mlp_output_projection
from depthcut.repair.fold import fold_transform
from depthcut.repair.lstsq import refuse_unless_linear, solve
from depthcut.repair.methods import RepairFit, RepairMethod, register_repair
from depthcut.repair.statistics import relative_error


def mean_cosine_distance(rows: dict, transform: torch.Tensor, chunk: int = 8192) -> float:
    total = 0.0
    for start in range(0, len(rows["m"]), chunk):
        pred = rows["base"][start : start + chunk] + rows["m"][start : start + chunk] @ transform
        total += float((1 - torch.cosine_similarity(pred, rows["target"][start : start + chunk], dim=-1)).sum())
    return total / len(rows["m"])


@register_repair
class Cosine(RepairMethod):
    name = "cosine"
    linear = True
    refines = "lstsq"
    iterative = True

    def check(self, model, stack, arch, first, stop):
        refuse_unless_linear(self.name, model, stack, arch, first, stop)

    def fit(self, statistics, ridge: float = 0.0, steps: int = 300, lr: float = 1e-4, batch_rows: int = 8192,
            seed: int = 0, device=None, progress: bool = False) -> RepairFit:
        if not statistics.rows:
            raise DepthcutError("no token rows were kept for the cosine repair (max_rows=0?)")
        start = solve(statistics, ridge)
        device = torch.device(device) if device is not None else statistics.mtm.device
        rows = {name: value.to(device) for name, value in statistics.rows.items()}
        transform = start.float().to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([transform], lr=lr)
        generator = torch.Generator().manual_seed(seed)
        count = len(rows["m"])
        with torch.enable_grad():
            # minutes on a wide model: a bar with the time left (`progress`)
            for _ in tqdm(range(steps), desc="cosine fit", unit="step", disable=not progress, leave=False):
                pick = torch.randperm(count, generator=generator)[:batch_rows].to(device) if count > batch_rows else slice(None)
                pred = rows["base"][pick] + rows["m"][pick] @ transform  # (K, d)
                loss = (1 - torch.cosine_similarity(pred, rows["target"][pick], dim=-1)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        transform = transform.detach()
        before = mean_cosine_distance(rows, start.float().to(device))
        after = mean_cosine_distance(rows, transform)
        transform = transform.double().cpu()
        return RepairFit(
            method=self.name, first=statistics.first, stop=statistics.stop, num_layers=statistics.num_layers,
            tokens=statistics.tokens, error_before=statistics.error_before,
            error_after=relative_error(statistics, transform), ridge=ridge, transform=transform,
            details={"steps": steps, "lr": lr, "rows": count, "cosine_distance_lstsq": before,
                     "cosine_distance_after": after},
        )

    def modules(self, model, stack, arch, fit):
        return [mlp_output_projection(stack, arch, fit.first - 1)]

    def fold(self, module, fit):
        fold_transform(module, fit.transform)
