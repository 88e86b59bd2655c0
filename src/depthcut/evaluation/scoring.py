"""Log-likelihood of continuations given contexts, batched, each shared context computed once.

Tokenization follows lm-evaluation-harness (`HFLM._encode_pair`): trailing spaces of the context
move to the continuation, the pair is encoded as one string, and the continuation's tokens are
what follows the context's own encoding. No special tokens are added; an empty context becomes
the BOS (or EOS) token.

Two ways to score, with the same result up to float rounding:

- ``shared`` (default): the distinct contexts of a batch run once, left-padded, keeping their
  KV cache and only the last position's logits (the first continuation token). Continuations of
  more than one token then run on top of the cache, repeated per continuation. MMLU's and BoolQ's
  one-token answers need no second pass at all.
- ``full``: every (context, continuation) pair runs as one left-padded sequence, as lm-eval does.

Either way the LM head only runs on positions whose logits are used (`logits_to_keep`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class _Group:
    """One distinct context and the requests (by index) that continue it."""

    context: list[int]
    members: list[tuple[int, list[int]]]  # (request index, continuation tokens)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if not context_ids:  # nothing to condition on: the first continuation token needs a position
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return context_ids, whole[len(context_ids) :]


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


class Scorer:
    """Scores (context, continuation) pairs with a causal LM; see the module docstring."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None, mode: str = "shared"):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.mode = mode
        self.device = next(model.parameters()).device
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.max_length = max_length or getattr(config, "max_position_embeddings", None) or 2048
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last max_length + 1 tokens of context + continuation (as lm-eval does); a
        continuation longer than that is scored on its last max_length tokens."""
        if len(context) + len(continuation) <= self.max_length + 1:
            return context, continuation
        if len(continuation) > self.max_length:
            return continuation[-self.max_length - 1 : -self.max_length], continuation[-self.max_length :]
        return context[len(context) + len(continuation) - self.max_length - 1 :], continuation

    def _forward(self, ids, mask, **kwargs):
        if self.takes_positions:
            kwargs["position_ids"] = kwargs.get("position_ids", (mask.cumsum(-1) - 1).clamp(min=0))
        return self.model(input_ids=ids, attention_mask=mask, **kwargs)

    @torch.inference_mode()
    def loglikelihoods(self, requests: Sequence[tuple[str, str]], progress: bool = False, desc: str = "score") -> list[float]:
        """Sum of log P(continuation tokens | context) for each pair, in float64."""
        encoded = [encode_pair(self.tokenizer, c, x) for c, x in requests]
        groups: dict[tuple[int, ...], _Group] = {}
        for index, (context, continuation) in enumerate(encoded):
            context, continuation = self._truncate(context, continuation)
            key = tuple(context) if self.mode == "shared" else (index, *context)
            groups.setdefault(key, _Group(context, [])).members.append((index, continuation))
        # Longest first: padding stays small and memory trouble shows at once.
        ordered = sorted(groups.values(), key=lambda g: -(len(g.context) + max(len(c) for _, c in g.members)))
        results = [0.0] * len(requests)
        bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress)
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            score = self._score_shared if self.mode == "shared" else self._score_full
            for index, value in score(batch):
                results[index] = value
            bar.update(sum(len(g.members) for g in batch))
        bar.close()
        return results

    def _score_full(self, batch: list[_Group]):
        rows, targets = [], []
        for group in batch:
            (index, continuation), = group.members
            rows.append((group.context + continuation)[:-1])
            targets.append((index, continuation))
        ids, mask = _left_pad(rows, self.pad_id, self.device)
        keep = max(len(c) for _, c in targets)
        logprobs = self._forward(ids, mask, use_cache=False, logits_to_keep=keep).logits.float().log_softmax(-1)
        for row, (index, continuation) in enumerate(targets):
            picked = logprobs[row, keep - len(continuation) :].gather(-1, torch.tensor(continuation, device=self.device)[:, None])
            yield index, float(picked.double().sum())

    def _score_shared(self, batch: list[_Group]):
        ids, mask = _left_pad([g.context for g in batch], self.pad_id, self.device)
        out = self._forward(ids, mask, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): the first continuation token
        rest = []  # (request index, group row, continuation) needing a second pass
        for row, group in enumerate(batch):
            for index, continuation in group.members:
                if len(continuation) == 1:
                    yield index, float(first[row, continuation[0]].double())
                else:
                    rest.append((index, row, continuation))
        if not rest:
            return
        cache = out.past_key_values
        rows = torch.tensor([row for _, row, _ in rest], device=self.device)
        cache.reorder_cache(rows)  # one copy of the context cache per continuation
        inputs = [c[:-1] for _, _, c in rest]
        width = max(len(x) for x in inputs)
        cont_ids = torch.full((len(rest), width), self.pad_id, dtype=torch.long, device=self.device)
        cont_mask = torch.zeros((len(rest), width), dtype=torch.long, device=self.device)
        for i, x in enumerate(inputs):
            cont_ids[i, : len(x)] = torch.tensor(x)
            cont_mask[i, : len(x)] = 1
        context_mask = mask[rows]
        positions = context_mask.sum(-1, keepdim=True) + torch.arange(width, device=self.device)
        full_mask = torch.cat([context_mask, cont_mask], dim=1)
        kwargs = {"position_ids": positions} if self.takes_positions else {}
        logits = self.model(input_ids=cont_ids, attention_mask=full_mask, past_key_values=cache, use_cache=True,
                            **kwargs).logits
        later = logits.float().log_softmax(-1)  # (R, W, V): tokens 2.. of each continuation
        for i, (index, row, continuation) in enumerate(rest):
            targets = torch.tensor(continuation[1:], device=self.device)[:, None]
            tail = later[i, : len(continuation) - 1].gather(-1, targets).double().sum()
            yield index, float(first[row, continuation[0]].double() + tail)
