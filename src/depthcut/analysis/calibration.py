"""Turning documents into a fixed, seeded set of token sequences for analysis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from depthcut.errors import DepthcutError
from depthcut.io.data import TextSource, load_texts

SAMPLE_MODES = ("windows", "documents")


@dataclass
class CalibrationSet:
    """`input_ids` and `attention_mask` of shape (N, T); padding is on the right."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: str
    mode: str
    seed: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            mask = self.attention_mask[start : start + batch_size]
            # Trim columns that are padding in every row of this batch.
            width = int(mask.sum(dim=1).max())
            yield self.input_ids[start : start + batch_size, :width], mask[:, :width]

    def subset(self, start: int, stop: int | None = None) -> CalibrationSet:
        """Rows [start, stop)."""
        return CalibrationSet(self.input_ids[start:stop], self.attention_mask[start:stop], self.description,
                              self.mode, self.seed)

    def joined(self, other: CalibrationSet) -> CalibrationSet:
        """These rows, then `other`'s (the shorter padded on the right), described as these."""
        width = max(self.input_ids.shape[1], other.input_ids.shape[1])

        def padded(tensor):
            return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))

        return CalibrationSet(torch.cat([padded(self.input_ids), padded(other.input_ids)]),
                              torch.cat([padded(self.attention_mask), padded(other.attention_mask)]),
                              self.description, self.mode, self.seed)

    def as_dict(self) -> dict:
        return {
            "source": self.description,
            "mode": self.mode,
            "samples": len(self),
            "seq_len": int(self.input_ids.shape[1]),
            "tokens": self.num_tokens,
            "seed": self.seed,
        }


def _special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (a BOS for Llama-style models, none for GPT-2)."""
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def build_calibration(
    tokenizer,
    source: TextSource,
    num_samples: int,
    seq_len: int,
    mode: str = "windows",
    seed: int = 0,
    min_tokens: int = 16,
    allow_fewer: bool = False,
) -> CalibrationSet:
    """Draw `num_samples` sequences of at most `seq_len` tokens.

    - ``windows``: documents in a seeded order are concatenated (EOS between them) and cut into
      full windows of `seq_len` tokens; every sample has the same length.
    - ``documents``: one document per sample, truncated to `seq_len`; documents shorter than
      `min_tokens` are skipped; shorter samples are right-padded and masked.

    With `allow_fewer`, running out of text after at least one sample is not an error.
    """
    if mode not in SAMPLE_MODES:
        raise DepthcutError(f"unknown sample mode {mode!r}; use one of {', '.join(SAMPLE_MODES)}")
    if num_samples < 1:
        raise DepthcutError("the number of samples must be at least 1")
    prefix = _special_prefix(tokenizer)
    body_len = seq_len - len(prefix)
    if body_len < 1:
        raise DepthcutError(f"sequence length {seq_len} is too short for this tokenizer")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    rows: list[list[int]] = []
    buffer: list[int] = []
    seen_documents = 0
    for text in source.iter_shuffled(seed):
        seen_documents += 1
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if mode == "documents":
            if len(tokens) + len(prefix) >= min(min_tokens, seq_len):
                rows.append(prefix + tokens[:body_len])
        else:
            buffer.extend(tokens + eos)
            while len(buffer) >= body_len and len(rows) < num_samples:
                rows.append(prefix + buffer[:body_len])
                buffer = buffer[body_len:]
        if len(rows) >= num_samples:
            break

    if len(rows) < num_samples and not (allow_fewer and rows):
        if mode == "documents":
            need = f"{num_samples} documents of at least {min(min_tokens, seq_len)} tokens"
        else:
            need = f"{num_samples} x {body_len} = {num_samples * body_len} tokens"
        raise DepthcutError(
            f"data {source.description!r} is too short: {seen_documents} documents gave {len(rows)} samples, "
            f"but {need} are needed. Use fewer --samples, a shorter --seq-len, or more text."
        )

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return CalibrationSet(input_ids, attention_mask, source.description, mode, seed)


def as_calibration(data, tokenizer, samples, seq_len, mode, seed, text_field) -> CalibrationSet:
    """`data` as a calibration set: a DATA string, a list of texts, a `TextSource`, or a `CalibrationSet` as it is."""
    if isinstance(data, CalibrationSet):
        return data
    if tokenizer is None:
        raise DepthcutError("a tokenizer is needed to turn text into calibration samples")
    if isinstance(data, str):
        source = load_texts(data, text_field)
    elif isinstance(data, TextSource):
        source = data
    elif isinstance(data, Sequence):
        source = TextSource(description=f"{len(data)} texts given in memory", documents=[t for t in data if t.strip()])
    else:
        raise DepthcutError(f"unsupported calibration data of type {type(data).__name__}")
    return build_calibration(tokenizer, source, samples, seq_len, mode, seed)
