"""How far a pruned model's predictions moved from the unpruned model's, window by window.

`reference_predictions` runs the unpruned model once over validation windows and keeps its
next-token log-probabilities (float16 on the CPU: a window of T tokens over a vocabulary of V costs
2·T·V bytes); `window_scores` then scores any candidate against them: per window, the mean
KL(unpruned || candidate) over its predicted tokens, and the candidate's mean next-token loss.
Means and standard errors are taken over windows, so two candidates scored on the same windows can
be compared pair by pair (`paired_difference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthcut.analysis.calibration import CalibrationSet
from depthcut.evaluation.metrics import mean_stderr


@dataclass
class ReferencePredictions:
    windows: CalibrationSet
    logprobs: list[torch.Tensor]  # per window: (T-1, V) float16, the unpruned model's log-probabilities


@dataclass
class WindowScores:
    """Per validation window: KL(unpruned || candidate) and the candidate's loss (nats per token)."""

    kl: list[float]
    loss: list[float]

    def summary(self) -> dict:
        return {"kl": sum(self.kl) / len(self.kl), "kl_stderr": mean_stderr(self.kl),
                "loss": sum(self.loss) / len(self.loss), "loss_stderr": mean_stderr(self.loss),
                "windows": len(self.kl)}


def _valid(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is predicted and real: both it and the next are not padding."""
    return (attention_mask[1:] * attention_mask[:-1]).bool()


@torch.inference_mode()
def reference_predictions(model, windows: CalibrationSet, batch_size: int = 8) -> ReferencePredictions:
    device = next(model.parameters()).device
    kept = []
    for input_ids, attention_mask in windows.batches(batch_size):
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        for row in range(input_ids.shape[0]):
            kept.append(logits[row, :-1].float().log_softmax(-1).to("cpu", torch.float16))
    return ReferencePredictions(windows, kept)


@torch.inference_mode()
def window_scores(model, reference: ReferencePredictions, batch_size: int = 8) -> WindowScores:
    """Score `model` (a candidate) on the reference's windows; KL and loss summed in float64."""
    device = next(model.parameters()).device
    kl, loss, index = [], [], 0
    for input_ids, attention_mask in reference.windows.batches(batch_size):
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        for row in range(input_ids.shape[0]):
            logprobs = logits[row, :-1].float().log_softmax(-1).cpu()
            base = reference.logprobs[index].float()
            index += 1
            valid = _valid(attention_mask[row])
            if not valid.any():
                continue
            targets = input_ids[row, 1:]
            per_token_kl = (base.exp() * (base - logprobs)).sum(-1)
            nll = -logprobs.gather(-1, targets[:, None])[:, 0]
            kl.append(float(per_token_kl[valid].double().mean()))
            loss.append(float(nll[valid].double().mean()))
    return WindowScores(kl, loss)


def paired_difference(first: list[float], second: list[float]) -> tuple[float, float]:
    """(mean of first - second, its standard error) over windows scored by both: the noise of the
    windows themselves cancels, as it does not when two means' standard errors are combined."""
    differences = [a - b for a, b in zip(first, second, strict=True)]
    return sum(differences) / len(differences), mean_stderr(differences)
