"""Hooks that capture the residual stream at every layer boundary, one batch at a time.

Position p < L is the hidden state entering layer p (a forward pre-hook on that layer);
position L is the output of the last layer, before the final norm (a forward hook). Only what
the metrics need is kept, in the model's own dtype: one (B, L+1, H) slab for the last tokens,
plus a (K, L+1, H) slab of sampled tokens when a metric reads every token (at most
`TOKEN_POSITIONS` evenly spaced non-pad tokens per sequence: all of them in sequences no longer
than that). Cosines are taken from them in float32 once the batch has passed; cos(x_l, x_l+1),
which Block Influence reads, is taken of every non-pad token as each state arrives. The forward
pass stops after the last layer, so the final norm and the LM head are never computed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from depthcut.errors import DepthcutError
from depthcut.metrics import TOKEN_POSITIONS
from depthcut.model.layers import LayerStack, first_tensor, output_tensor


def _store_unit(slot: torch.Tensor, hidden: torch.Tensor) -> None:
    """Write hidden / |hidden| into the float32 view `slot`, in place.

    The state is upcast before its norm is taken (the squared norm of a bf16/fp16 state can
    overflow its own dtype); `copy_` also moves it across devices when a model is split.
    """
    slot.copy_(hidden)
    slot.div_(torch.linalg.vector_norm(slot, dim=-1, keepdim=True).clamp_min_(1e-12))


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the position of each row's last non-padding token."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=1)


class StopForward(Exception):
    """Raised by the last layer's hook: nothing after the decoder stack is needed."""




def sampled_tokens(attention_mask: torch.Tensor, per_sequence: int | None = TOKEN_POSITIONS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the (B*T) tokens, the row of each) of the tokens an all-token metric reads:
    every non-pad token of a row, or `per_sequence` of them evenly spaced (the first and the last
    included) where a row has more; `per_sequence` None or 0: every non-pad token."""
    batch, length = attention_mask.shape
    chosen = []
    for row in range(batch):
        valid = attention_mask[row].nonzero()[:, 0]
        if per_sequence and len(valid) > per_sequence:
            valid = valid[torch.linspace(0, len(valid) - 1, per_sequence).round().long()]
        chosen.append(valid + row * length)
    flat = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(batch), torch.tensor([len(c) for c in chosen], dtype=torch.long))
    return flat, rows


# Float32 working memory for one chunk of all-token states when their cosines are taken.
CHUNK_BYTES = 32 * 2**20


def unit_rows(states: torch.Tensor) -> torch.Tensor:
    """(N, H) states in any dtype -> (N, H) float32 unit vectors (upcast, then divided by the norm)."""
    units = states.float()
    return units.div_(torch.linalg.vector_norm(units, dim=-1, keepdim=True).clamp_min_(1e-12))


def unit_cosines(states: torch.Tensor) -> torch.Tensor:
    """(M, P, H) states in any dtype -> (M, P, P) float32 cosines between the P positions of each row.

    The arithmetic is `_store_unit`'s (upcast, divide by the norm) followed by one batched product.
    """
    units = states.float()
    units.div_(torch.linalg.vector_norm(units, dim=-1, keepdim=True).clamp_min_(1e-12))
    return units @ units.transpose(1, 2)


def check_finite(states: torch.Tensor, first_position: int = 0) -> None:
    """`states` (B, P, H): position p (from `first_position`) is the stream entering layer p (the last:
    leaving the last layer). Raises naming the first position where a state is NaN or infinite: the
    embeddings at 0, else layer p-1's output. One reduction per batch (one host sync), not one per layer."""
    finite = torch.isfinite(states).all(dim=-1).all(dim=0)  # (P,)
    if bool(finite.all()):
        return
    position = first_position + int((~finite).nonzero()[0, 0])
    where = "the embeddings" if position == 0 else f"decoder layer {position - 1}'s output"
    raise DepthcutError(f"{where} holds NaN or infinite values on the calibration text: the model's weights there "
                        "are not finite (or overflow in this dtype: try --dtype float32); nothing can be measured "
                        "or cut from it")


class ResidualCapture:
    """The states of one batch at every position, kept exactly as the model computed them.

    The hooks only copy (a bf16 model's states stay bf16: copying them is exact and half the memory
    of float32); the upcast, the normalisation and the products happen once per batch in
    `cosines`, in float32 chunks of at most `CHUNK_BYTES`, so no layer waits on bookkeeping and
    nothing synchronises with the host.
    """

    def __init__(self, stack: LayerStack, keep_all_tokens: bool, consecutive: bool = False,
                 token_positions: int | None = TOKEN_POSITIONS):
        self.stack = stack
        self.positions = len(stack) + 1
        self.keep_all_tokens = keep_all_tokens
        self.token_positions = token_positions
        # Block Influence reads only cos(x_p, x_p+1): taken of every token as each state arrives from the
        # one before it, so it needs no slab and no sample (as the layer-streamed pass does).
        self.consecutive_tokens = consecutive
        self.previous: torch.Tensor | None = None  # (K, H) float32 units of the non-pad tokens' last state
        self.consecutive: torch.Tensor | None = None  # (K, P-1) float32 cos(x_p, x_p+1)
        self.batch_shape: tuple[int, int] | None = None  # (B, T) of the batch being captured
        self.last_index: torch.Tensor | None = None  # (B,) last non-pad position of each row
        self.valid_tokens: torch.Tensor | None = None  # (K,) flat indices of the non-pad tokens
        self.sampled: torch.Tensor | None = None  # (S,) flat indices of the tokens the slab keeps
        self.sampled_rows: torch.Tensor | None = None  # (S,) the row each of them is in
        self.last_token: torch.Tensor | None = None  # (B, P, H) in the model's dtype
        self.all_tokens: torch.Tensor | None = None  # (S, P, H) in the model's dtype

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        """`attention_mask` is best given on the CPU: the indices are then found without a device sync."""
        self.batch_shape = tuple(attention_mask.shape)  # (B, T): what every captured state must start with
        self.last_index = last_positions(attention_mask)
        self.valid_tokens = attention_mask.reshape(-1).nonzero()[:, 0] if self.consecutive_tokens else None
        self.sampled, self.sampled_rows = (sampled_tokens(attention_mask, self.token_positions)
                                           if self.keep_all_tokens else (None, None))
        self.last_token = None
        self.all_tokens = None
        self.previous = None
        self.consecutive = None

    def _store(self, position: int, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != self.batch_shape:
            # XLNet's (T, B, H), several residual streams per token (hyper-connections): not one state per token
            raise DepthcutError(f"the hidden state entering decoder layer {position} has shape {list(hidden.shape)}, "
                                f"not (batch, tokens, hidden) with (batch, tokens) = {list(self.batch_shape)}: depthcut "
                                "measures a residual stream of one vector per token, which this model does not have")
        batch, length, width = hidden.shape  # (B, T, H)
        if self.last_token is None:
            self.last_index = self.last_index.to(hidden.device, non_blocking=True)
            self.last_token = torch.empty(batch, self.positions, width, dtype=hidden.dtype, device=hidden.device)
            if self.consecutive_tokens:
                self.valid_tokens = self.valid_tokens.to(hidden.device, non_blocking=True)
            if self.keep_all_tokens:
                self.sampled = self.sampled.to(hidden.device, non_blocking=True)
                self.all_tokens = torch.empty(len(self.sampled), self.positions, width, dtype=hidden.dtype,
                                              device=hidden.device)
            if self.consecutive_tokens:
                self.consecutive = torch.empty(len(self.valid_tokens), self.positions - 1, dtype=torch.float32,
                                               device=hidden.device)
        rows = torch.arange(batch, device=hidden.device)
        # `copy_` also moves a state across devices when a model is split over several.
        self.last_token[:, position].copy_(hidden[rows, self.last_index.to(hidden.device)])
        if self.all_tokens is not None:
            self.all_tokens[:, position].copy_(hidden.reshape(batch * length, width)[self.sampled.to(hidden.device)])
        if self.consecutive is not None:
            units = unit_rows(hidden.reshape(batch * length, width)[self.valid_tokens.to(hidden.device)])
            if position > 0:
                self.consecutive[:, position - 1] = (self.previous.to(units.device) * units).sum(dim=-1)
            self.previous = units

    def _pre_hook(self, position: int):
        def hook(module, args, kwargs):
            self._store(position, first_tensor(args, kwargs))

        return hook

    def _last_hook(self, module, args, kwargs, output):
        self._store(self.positions - 1, output_tensor(output))
        raise StopForward

    @contextmanager
    def hooks(self):
        handles = [
            layer.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True)
            for index, layer in enumerate(self.stack.layers)
        ]
        handles.append(self.stack.layers[-1].register_forward_hook(self._last_hook, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def cosines(self, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Cosines between all pairs of positions: (B, P, P) at last tokens, (S, P, P) over the S sampled
        tokens (and "all_token_rows", the row of each); (K, P-1) between consecutive positions of the K
        non-pad tokens, where Block Influence asked for them. A non-finite state is refused, naming the
        first layer that produced one (`check_finite`): a NaN would otherwise turn every distance after it
        into NaN and the choice into whatever is left."""
        check_finite(self.last_token)
        result = {"last_token": unit_cosines(self.last_token)}
        if self.consecutive is not None:
            result["consecutive"] = self.consecutive
        if self.all_tokens is not None:
            sampled, positions, width = self.all_tokens.shape
            step = max(1, CHUNK_BYTES // (positions * width * 4))
            result["all_tokens"] = torch.cat([unit_cosines(self.all_tokens[start : start + step])
                                              for start in range(0, sampled, step)])
            result["all_token_rows"] = self.sampled_rows
        return result
