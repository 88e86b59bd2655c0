"""Naive references that the fast code is checked against."""

from __future__ import annotations

import torch

from depthcut.model.layers import first_tensor


def bypass_layers(model, stack, removed):
    """Forward hooks that make the given layers return their input unchanged (a reference pruning)."""
    handles = []

    def identity(module, args, kwargs, output):
        hidden = first_tensor(args, kwargs)
        if isinstance(output, (tuple, list)):  # OpenAI GPT's layers return a list
            return type(output)([hidden, *output[1:]])
        return hidden

    for index in removed:
        handles.append(stack.layers[index].register_forward_hook(identity, with_kwargs=True))
    return handles


@torch.no_grad()
def residual_states(model, stack, input_ids) -> list[torch.Tensor]:
    """All L+1 residual states of one unpadded sequence, in float64: the model's own
    `output_hidden_states` for the inputs of layers 0..L-1 (entry L of that tuple is after the final
    norm, so it is not used), and a plain hook for the output of the last layer."""
    leaving_last = []

    def last(module, args, kwargs, output):
        leaving_last.append((output[0] if isinstance(output, tuple) else output)[0].double())

    handle = stack.layers[-1].register_forward_hook(last, with_kwargs=True)
    try:
        out = model(input_ids=input_ids[None], use_cache=False, output_hidden_states=True)
    finally:
        handle.remove()
    entering = [h[0].double() for h in out.hidden_states[: len(stack)]]
    return entering + leaving_last  # L+1 tensors of shape (T, H)


def naive_metrics(model, stack, sequences: list[torch.Tensor]) -> dict:
    """Angular distances (last token, all tokens) and block influence, sample by sample, float64."""
    size = len(stack)
    last_sum = torch.zeros(size + 1, size + 1, dtype=torch.float64)
    token_sum = torch.zeros(size + 1, size + 1, dtype=torch.float64)
    influence = torch.zeros(size, dtype=torch.float64)
    tokens = 0
    for ids in sequences:
        states = residual_states(model, stack, ids)
        for i in range(size + 1):
            for j in range(size + 1):
                cos = torch.nn.functional.cosine_similarity(states[i], states[j], dim=-1).clamp(-1, 1)
                angle = torch.arccos(cos) / torch.pi
                last_sum[i, j] += angle[-1]
                token_sum[i, j] += angle.sum()
                if j == i + 1:
                    influence[i] += (1 - cos).sum()
        tokens += ids.shape[0]

    def matrix(total, count):
        mean = total / count
        return [[float(mean[f, f + n]) if f + n <= size else None for f in range(size)] for n in range(1, size + 1)]

    return {
        "angular_last_token": matrix(last_sum, len(sequences)),
        "angular_all_tokens": matrix(token_sum, tokens),
        "block_influence": (influence / tokens).tolist(),
    }
