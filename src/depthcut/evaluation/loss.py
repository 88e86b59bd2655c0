"""Held-out next-token loss over fixed-length windows (the paper's C4 validation loss)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from depthcut.analysis.calibration import CalibrationSet
from depthcut.evaluation.metrics import mean_stderr


@torch.inference_mode()
def heldout_loss(model, windows: CalibrationSet, batch_size: int = 8, progress: bool = False) -> dict:
    """Mean next-token cross-entropy over the non-padding tokens of `windows`, summed in float64.

    Also reports perplexity and the loss divided by log(vocabulary size), the loss of a uniform
    guess, as the paper plots it, and the standard error of the loss over windows (of the per-window
    mean losses; NaN for fewer than 2 windows).
    """
    device = next(model.parameters()).device
    total, count, vocab = 0.0, 0, None
    window_losses = []
    bar = tqdm(total=len(windows), desc="loss", unit="window", disable=not progress)
    for input_ids, attention_mask in windows.batches(batch_size):
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        vocab = logits.shape[-1]
        for row in range(input_ids.shape[0]):
            # A row at a time keeps the float32 copy of the logits to (T, V).
            logprobs = logits[row, :-1].float().log_softmax(-1)
            targets = input_ids[row, 1:]
            valid = (attention_mask[row, 1:] * attention_mask[row, :-1]).bool()
            nll = -logprobs.gather(-1, targets[:, None])[:, 0]
            window_sum, window_count = float(nll[valid].double().sum()), int(valid.sum())
            total += window_sum
            count += window_count
            if window_count:
                window_losses.append(window_sum / window_count)
        bar.update(input_ids.shape[0])
    bar.close()
    mean = total / max(count, 1)
    stderr = mean_stderr(window_losses)
    return {
        "loss": mean,
        "loss_stderr": stderr,
        "perplexity": math.exp(mean),
        "normalized_loss": mean / math.log(vocab),
        "normalized_loss_stderr": stderr / math.log(vocab),
        "tokens": count,  # predicted tokens: every window's first token has no prediction
        "vocab_size": vocab,
        "data": windows.as_dict(),
    }
