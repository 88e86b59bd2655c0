"""Log-likelihood of continuation tokens given context tokens, batched, each shared context computed once.

The input is already tokenized, as lm-evaluation-harness hands it to `_loglikelihood_tokens`
(`DepthcutLM` encodes the strings exactly as lm-eval's `HFLM` does). Every result is
``(sum of log P(continuation token | everything before it), whether each of those tokens is the
argmax)``, lm-eval's ``(logprob, is_greedy)``. Three ways to score, the same up to float rounding:

- ``packed`` (default): each distinct context and all its continuations (less their last token)
  form one row, ``context + c1 + c2 + ...``, with a 4D attention mask that lets every
  continuation see the context and itself but not its siblings, and position ids that restart
  each continuation right after the context. Every token runs exactly once and rows hold no
  padding between continuations, so a task like HellaSwag (four long endings per context) costs
  about half of what one sequence per choice costs. Used where it is exact: models that take
  position ids and a custom additive mask (``sdpa`` or ``eager`` attention, no ALiBi), and rows
  that fit inside the model's sliding window, if it has one; other batches fall back to ``shared``.
- ``shared``: the distinct contexts of a batch run once, left-padded, keeping their KV cache and
  only the last position's logits (the first continuation token). Continuations of more than one
  token then run on top of the cache, repeated per continuation. MMLU's and BoolQ's one-token
  answers need no second pass at all.
- ``full``: every (context, continuation) pair runs as one left-padded sequence, as lm-eval does.

Either way the LM head only runs on positions whose logits are used (`logits_to_keep`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthcut.model.layers import text_config

Score = tuple[float, bool]  # (log-likelihood, every continuation token is the greedy choice)


@dataclass
class _Group:
    """One distinct context and the requests (by index) that continue it."""

    context: list[int]
    members: list[tuple[int, list[int]]]  # (request index, continuation tokens)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _picked(logprobs: torch.Tensor, targets: Sequence[int]) -> Score:
    """Sum of `logprobs` (T, V) at `targets` (T tokens) in float64, and whether each is the argmax."""
    index = torch.tensor(targets, device=logprobs.device)[:, None]
    value = float(logprobs.gather(-1, index).double().sum())
    return value, bool((logprobs.argmax(-1) == index[:, 0]).all())


def _row(group: _Group) -> int:
    """The tokens of `group`'s row when its continuations are packed after its context."""
    return len(group.context) + sum(len(c) for _, c in group.members)


def _cut_to(groups, positions: int) -> list[_Group]:
    """`groups`, each one whose row would pass `positions` cut into several with the same context
    (WikiText-2's rolling windows all start from the same token: one group of every document)."""
    cut = []
    for group in groups:
        part = _Group(group.context, [])
        for member in group.members:
            if part.members and _row(part) + len(member[1]) > positions:
                cut.append(part)
                part = _Group(group.context, [])
            part.members.append(member)
        cut.append(part)
    return cut


class Scorer:
    """Scores (context tokens, continuation tokens) pairs with a causal LM; see the module docstring."""

    MODES = ("packed", "shared", "full")
    # A packed batch carries a (rows, width, width) mask; wider rows use the KV-cache path.
    PACKED_MAX_WIDTH = 2048
    # The most the float32 logits one forward pass keeps may take: a batch of long rows (WikiText-2's
    # rolling windows: 16 x 8192 positions x 49,152 tokens would be 26 GB) is split to fit.
    LOGITS_BYTES = 2**31

    def __init__(self, model, batch_size: int = 16, max_length: int = 2048, mode: str = "packed", pad_id: int = 0):
        if mode not in self.MODES:
            raise ValueError(f"unknown scoring mode {mode!r}; choose one of {', '.join(self.MODES)}")
        self.model = model
        self.batch_size = batch_size
        self.mode = mode
        self.max_length = max_length
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        parameters = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in parameters
        self.takes_logits_to_keep = "logits_to_keep" in parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.x
        self.packed_window = self._packed_window(text_config(model)) if mode == "packed" else 0

    def _packed_window(self, config) -> float:
        """The longest row a packed batch may hold (0: packing is not exact for this model).

        Packing needs explicit position ids and a mask the attention layers add as given. ALiBi
        models derive their biases from a 2D mask, and flash/flex kernels take no additive mask.
        A sliding window would cut a long row's continuations off from the start of their context,
        so rows must fit inside it."""
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if not self.takes_positions or attention not in ("sdpa", "eager") or getattr(config, "alibi", False) \
                or config.model_type in ("bloom", "mpt"):
            return 0
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) is not False:
            return min(window, self.PACKED_MAX_WIDTH)
        return self.PACKED_MAX_WIDTH

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
    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = False,
              desc: str = "score") -> list[Score]:
        """(log-likelihood, is_greedy) of every (context, continuation) pair, in request order.
        Contexts must not be empty (lm-eval puts the BOS or EOS token there)."""
        groups: dict[tuple[int, ...], _Group] = {}
        for index, (context, continuation) in enumerate(requests):
            context, continuation = self._truncate(list(context), list(continuation))
            key = (index, *context) if self.mode == "full" else tuple(context)
            groups.setdefault(key, _Group(context, [])).members.append((index, continuation))
        positions = max(1, self.LOGITS_BYTES // (self._vocab() * 4))  # whose float32 logits fit the budget
        # Longest first: padding stays small and memory trouble shows at once.
        ordered = sorted(_cut_to(groups.values(), positions),
                         key=lambda g: -(len(g.context) + max(len(c) for _, c in g.members)))
        results: list[Score] = [(0.0, True)] * len(requests)
        bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress)
        for batch in self._batches(ordered, positions):
            score = self._score_full if self.mode == "full" else self._score_shared
            if self.mode == "packed" and self._packed_width(batch) <= self.packed_window:
                score = self._score_packed
            for index, value in score(batch):
                results[index] = value
            bar.update(sum(len(g.members) for g in batch))
        bar.close()
        return results

    def _vocab(self) -> int:
        head = self.model.get_output_embeddings()
        return head.weight.shape[0] if head is not None else text_config(self.model).vocab_size

    def _batches(self, ordered: list[_Group], positions: int):
        """Up to `batch_size` groups at a time, fewer where their rows (context and continuations, a bound
        on the positions any mode keeps logits for) would pass `positions` together."""
        batch, widest = [], 0
        for group in ordered:
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * max(widest, _row(group)) > positions):
                yield batch
                batch, widest = [], 0
            batch.append(group)
            widest = max(widest, _row(group))
        if batch:
            yield batch

    def _score_full(self, batch: list[_Group]):
        rows, targets = [], []
        for group in batch:
            (index, continuation), = group.members
            rows.append((group.context + continuation)[:-1])
            targets.append((index, continuation))
        ids, mask = _left_pad(rows, self.pad_id, self.device)
        keep = max(len(c) for _, c in targets)
        logits = self._forward(ids, mask, use_cache=False, logits_to_keep=keep).logits  # (B, keep, V)
        for row, (index, continuation) in enumerate(targets):
            yield index, _picked(logits[row, keep - len(continuation) :].float().log_softmax(-1), continuation)

    @staticmethod
    def _packed_width(batch: list[_Group]) -> int:
        return max(len(g.context) + sum(len(c) - 1 for _, c in g.members) for g in batch)

    def _score_packed(self, batch: list[_Group]):
        rows = [g.context + [t for _, c in g.members for t in c[:-1]] for g in batch]
        width = len(max(rows, key=len))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
        spans = []  # per row: where its context ends and each continuation's segment starts
        for b, (group, row) in enumerate(zip(batch, rows)):
            offset, length = width - len(row), len(group.context)  # rows are left-padded
            ids[b, offset:] = torch.tensor(row)
            end = offset + length
            positions[b, offset:end] = torch.arange(length)
            allowed[b, offset:end, offset:end] = torch.ones(length, length, dtype=torch.bool).tril()
            start, segments = end, []
            for index, continuation in group.members:
                n = len(continuation) - 1
                if n:
                    positions[b, start : start + n] = torch.arange(length, length + n)
                    allowed[b, start : start + n, offset:end] = True
                    allowed[b, start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
                segments.append((index, start, continuation))
                start += n
            spans.append((end - 1, segments))
        allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        # The LM head runs on the last `keep` positions: from the earliest last-context token on.
        keep = width - min(last for last, _ in spans)
        kwargs = {"logits_to_keep": keep} if self.takes_logits_to_keep else {}
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask[:, None].to(self.device),
                            position_ids=positions.to(self.device), use_cache=False, **kwargs).logits
        base = logits.shape[1] - width  # logits[:, p + base] are the logits at row position p
        for b, (last, segments) in enumerate(spans):
            first = logits[b, last + base].float().log_softmax(-1)  # (V,): every first continuation token
            for index, start, continuation in segments:
                value, greedy = _picked(first[None], continuation[:1])
                if len(continuation) > 1:
                    later = logits[b, start + base : start + base + len(continuation) - 1].float().log_softmax(-1)
                    more, more_greedy = _picked(later, continuation[1:])
                    value, greedy = value + more, greedy and more_greedy
                yield index, (value, greedy)

    def _score_shared(self, batch: list[_Group]):
        ids, mask = _left_pad([g.context for g in batch], self.pad_id, self.device)
        out = self._forward(ids, mask, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): the first continuation token
        rest = []  # (request index, group row, continuation) needing a second pass
        for row, group in enumerate(batch):
            for index, continuation in group.members:
                if len(continuation) == 1:
                    yield index, _picked(first[row][None], continuation)
                else:
                    rest.append((index, row, continuation))
        if not rest:
            return
        cache = getattr(out, "cache", None)
        cache = out.past_key_values if cache is None else cache
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
        kwargs[self.cache_argument] = cache
        logits = self.model(input_ids=cont_ids, attention_mask=full_mask, use_cache=True,
                            **kwargs).logits  # (R, W, V): tokens 2.. of each continuation
        for i, (index, row, continuation) in enumerate(rest):
            value, greedy = _picked(first[row][None], continuation[:1])
            more, more_greedy = _picked(logits[i, : len(continuation) - 1].float().log_softmax(-1), continuation[1:])
            yield index, (value + more, greedy and more_greedy)
