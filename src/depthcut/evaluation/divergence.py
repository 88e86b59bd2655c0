"""How far a pruned model's predictions moved from the unpruned model's, window by window.

`reference_predictions` runs the unpruned model once over validation windows and keeps its
next-token probabilities (float16 on the CPU, scaled by 2^15 so that the long tail of small ones
stays out of float16's coarse subnormal range: a window of T tokens over a vocabulary of V costs
2·T·V bytes), with each token's sums of p·log p and of p, taken once from the stored values;
`window_scores` then scores any candidate against them: per window, the mean KL(unpruned ||
candidate) over its predicted tokens, and the candidate's mean next-token loss. Per token,
KL = (Σ p log p - Σ p l) / Σ p - log Σ p + logsumexp(l), with p the stored probabilities and l the
candidate's logits less their maximum (every term small), summed in float32 (pairwise: a relative
error about 1e-7): within 2e-6 nats of a float64 computation on a 49k vocabulary, where float16
log-probabilities were 2e-4 off.
Means and standard errors are taken over windows, so two candidates scored on the same windows can
be compared pair by pair (`paired_difference`).

A cut model computes exactly what the unpruned one does before its first changed layer, so the
reference pass can also keep the residual stream *entering* chosen layers (`entering`); a candidate
stripped of the layers before one of them then starts there (`window_scores(..., entering=...)`),
which saves the shared prefix of every candidate's forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from depthcut.analysis.calibration import CalibrationSet
from depthcut.evaluation.metrics import mean_stderr
from depthcut.evaluation.reference_store import DiskProbabilities, MemoryProbabilities
from depthcut.model.layers import find_layer_stack, first_tensor, replace_first_tensor

# float16 holds 11 significant bits only from 6.1e-5 up: scaled, probabilities down to 1.9e-9 keep them
# (unscaled, the tail of a 49k vocabulary moved the KL by 1e-4 nats)
PROBABILITY_SCALE = 2.0**15
# the most bytes a (tokens, V) float32 temporary of the scoring takes (`_token_chunks`)
CHUNK_BYTES = 2**22


@dataclass
class ReferencePredictions:
    windows: CalibrationSet
    # per window: (T-1, V) float16, the unpruned model's next-token probabilities times PROBABILITY_SCALE, in
    # memory or on disk (`reference_store`)
    probabilities: MemoryProbabilities | DiskProbabilities
    negentropy: list[torch.Tensor]  # per window: (T-1,) float64, the sum of p log p of the stored p
    mass: list[torch.Tensor]  # per window: (T-1,) float64, the sum of the stored p (1 up to rounding)
    # layer index -> (N, T, d) the residual stream entering that layer, on the CPU (padding columns zero)
    entering: dict[int, torch.Tensor] = field(default_factory=dict)
    # per window: the unpruned model's own mean next-token loss (nan for a window with no predicted token)
    loss: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.probabilities)

    def subset(self, start: int, stop: int) -> ReferencePredictions:
        """Windows [start, stop): scored apart and concatenated, they give the scores of all of them."""
        w = self.windows
        windows = CalibrationSet(w.input_ids[start:stop], w.attention_mask[start:stop], w.description, w.mode, w.seed)
        return ReferencePredictions(windows, self.probabilities.subset(start, stop), self.negentropy[start:stop],
                                    self.mass[start:stop],
                                    {layer: states[start:stop] for layer, states in self.entering.items()},
                                    self.loss[start:stop])


@dataclass
class WindowScores:
    """Per validation window: KL(unpruned || candidate) and the candidate's loss (nats per token)."""

    kl: list[float]
    loss: list[float]

    def __add__(self, other: WindowScores) -> WindowScores:
        return WindowScores(self.kl + other.kl, self.loss + other.loss)

    def summary(self) -> dict:
        return {"kl": sum(self.kl) / len(self.kl), "kl_stderr": mean_stderr(self.kl),
                "loss": sum(self.loss) / len(self.loss), "loss_stderr": mean_stderr(self.loss),
                "windows": len(self.kl)}


def _valid(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is predicted and real: both it and the next are not padding."""
    return (attention_mask[1:] * attention_mask[:-1]).bool()


class ReferenceBuilder:
    """`ReferencePredictions` built a batch of logits at a time (`add`), from any forward pass: the model's
    own (`reference_predictions`) or the layer-major scoring's (`depthcut.evaluation.streamed_scores`)."""

    def __init__(self, windows: CalibrationSet, store=None):
        self.windows = windows
        self.store = store if store is not None else MemoryProbabilities()
        self.negentropy, self.mass, self.loss = [], [], []

    def add(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The next batch of windows (in order): their (rows, T, V) logits, input ids and attention mask."""
        for row in range(input_ids.shape[0]):
            row_negentropy, row_mass = _store_probabilities(logits[row, :-1], self.store)
            self.negentropy.append(row_negentropy)
            valid = _valid(attention_mask[row])
            nll = _next_token_loss(logits[row, :-1], input_ids[row, 1:])
            self.loss.append(float(nll[valid].mean()) if valid.any() else float("nan"))
            self.mass.append(row_mass)

    def finish(self, entering: dict[int, torch.Tensor] | None = None) -> ReferencePredictions:
        return ReferencePredictions(self.windows, self.store, self.negentropy, self.mass, entering or {}, self.loss)


def add_batch_scores(scores: WindowScores, logits: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, reference: ReferencePredictions, first_window: int) -> None:
    """Score a batch of a candidate's (rows, T, V) logits, windows `first_window`.. of `reference`, into
    `scores` (a window with no predicted token is left out, as everywhere)."""
    for row in range(input_ids.shape[0]):
        valid = _valid(attention_mask[row])
        if not valid.any():
            continue
        per_token_kl, nll = _token_scores(logits[row, :-1], input_ids[row, 1:], reference, first_window + row)
        scores.kl.append(float(per_token_kl[valid].mean()))
        scores.loss.append(float(nll[valid].mean()))


@torch.inference_mode()
def reference_predictions(model, windows: CalibrationSet, batch_size: int = 8, entering: Iterable[int] = (),
                          layer_path: str | None = None, store=None, progress: str | None = None
                          ) -> ReferencePredictions:
    """The unpruned model's next-token probabilities on `windows` (as `ReferencePredictions` stores
    them, in `store`: in memory unless a `DiskProbabilities` is given), and the residual stream entering
    each layer of `entering`. `progress`: a bar so named, with the time left."""
    device = next(model.parameters()).device
    built = ReferenceBuilder(windows, store)
    states, handles, unusable, batch = {}, [], set(), [None]
    shape = tuple(windows.input_ids.shape)
    if entering:
        layers = find_layer_stack(model, layer_path).layers
        for index in sorted(set(entering)):
            def keep(module, args, kwargs, index=index):
                hidden = first_tensor(args, kwargs)
                # only a (batch, tokens, d) stream is kept (XLNet's is token-major, DeepSeek-V4's has
                # streams of its own): elsewhere candidates run from the embeddings
                if index in unusable or hidden.dim() != 3 or tuple(hidden.shape[:2]) != batch[0]:
                    unusable.add(index)
                    return
                if index not in states:
                    states[index] = torch.zeros(*shape, hidden.shape[-1], dtype=hidden.dtype)
                rows, width = hidden.shape[:2]
                done = len(built.store)
                states[index][done : done + rows, :width] = hidden.detach().cpu()
            handles.append(layers[index].register_forward_pre_hook(keep, with_kwargs=True))
    try:
        batches = windows.batches(batch_size)
        for input_ids, attention_mask in tqdm(batches, desc=progress, total=-(-len(windows) // batch_size),
                                              unit="batch", disable=progress is None):
            batch[0] = tuple(input_ids.shape)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           use_cache=False).logits
            built.add(logits, input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return built.finish({i: v for i, v in states.items() if i not in unusable})


@torch.inference_mode()
def window_scores(model, reference: ReferencePredictions, batch_size: int = 8, entering: int | None = None,
                  layer_path: str | None = None) -> WindowScores:
    """Score `model` (a candidate) on the reference's windows; per window, the mean KL and loss in float64.

    With `entering`, `model` lacks the unpruned model's layers before layer `entering` (and the
    reference kept the stream entering it): its first layer is fed that stream instead of what its
    embeddings give."""
    device = next(model.parameters()).device
    scores, index = WindowScores([], []), 0
    handle = None
    if entering is not None:
        states = reference.entering[entering]

        def substitute(module, args, kwargs):
            rows, width = first_tensor(args, kwargs).shape[:2]
            return replace_first_tensor(args, kwargs, states[index : index + rows, :width].to(device))

        handle = find_layer_stack(model, layer_path).layers[0].register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        for input_ids, attention_mask in reference.windows.batches(batch_size):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           use_cache=False).logits
            add_batch_scores(scores, logits, input_ids, attention_mask, reference, index)
            index += input_ids.shape[0]
    finally:
        if handle is not None:
            handle.remove()
    return scores


def _token_chunks(tokens: int, vocabulary: int):
    """Slices of at most `CHUNK_BYTES / (4 V)` tokens: the (tokens, V) float32 temporaries of the scoring
    stay in the cache and are reused from the heap instead of mapped afresh (a whole window's, 50 MB at
    V = 49k, made the scoring 5x slower here)."""
    step = max(1, CHUNK_BYTES // (4 * vocabulary))
    return (slice(start, min(tokens, start + step)) for start in range(0, tokens, step))


def _store_probabilities(logits: torch.Tensor, store) -> tuple[torch.Tensor, torch.Tensor]:
    """One window's (T-1, V) logits -> its probabilities written to `store` as stored (float16 on the
    CPU, times PROBABILITY_SCALE), a token slice at a time; returns each token's sums of p log p and
    of p over the stored values (float64)."""
    tokens, vocabulary = logits.shape
    store.begin(tokens, vocabulary)
    negentropy = torch.empty(tokens, dtype=torch.float64)
    mass = torch.empty(tokens, dtype=torch.float64)
    for part in _token_chunks(tokens, vocabulary):
        stored = logits[part].float().softmax(-1).cpu().mul_(PROBABILITY_SCALE).to(torch.float16)
        store.write(part, stored)
        probabilities = stored.float().div_(PROBABILITY_SCALE)  # as scoring will read them
        negentropy[part] = torch.special.xlogy(probabilities, probabilities).sum(-1)
        mass[part] = probabilities.sum(-1)
    return negentropy, mass


def _next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per predicted token, -log softmax(logits)[target] in float64, a token slice at a time."""
    tokens, vocabulary = logits.shape
    nll, targets = torch.empty(tokens, dtype=torch.float64), targets.cpu()
    for part in _token_chunks(tokens, vocabulary):
        values = logits[part].float().cpu()
        nll[part] = torch.logsumexp(values, -1) - values.gather(-1, targets[part, None])[:, 0]
    return nll


def _token_scores(logits: torch.Tensor, targets: torch.Tensor, reference: ReferencePredictions, window: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted token of one window: KL(unpruned || candidate) and the candidate's next-token loss,
    from the candidate's (T-1, V) logits (the formula is in the module's docstring)."""
    tokens, vocabulary = logits.shape
    probabilities, targets = reference.probabilities, targets.cpu()
    log_norm, weighted, picked = (torch.empty(tokens, dtype=torch.float64) for _ in range(3))
    for part in _token_chunks(tokens, vocabulary):
        shifted = logits[part].float().cpu()
        shifted = shifted - shifted.amax(-1, keepdim=True)  # every value <= 0: the sums below stay exact
        log_norm[part] = torch.logsumexp(shifted, -1)
        weighted[part] = probabilities.rows(window, part).float().mul_(shifted).sum(-1)
        picked[part] = shifted.gather(-1, targets[part, None])[:, 0]
    weighted /= PROBABILITY_SCALE
    mass = reference.mass[window]
    per_token_kl = (reference.negentropy[window] - weighted) / mass - mass.log() + log_norm
    return per_token_kl, log_norm - picked


def paired_difference(first: list[float], second: list[float]) -> tuple[float, float]:
    """(mean of first - second, its standard error) over windows scored by both: the noise of the
    windows themselves cancels, as it does not when two means' standard errors are combined."""
    differences = [a - b for a, b in zip(first, second, strict=True)]
    return sum(differences) / len(differences), mean_stderr(differences)
