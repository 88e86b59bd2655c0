"""Where the streamed analysis keeps the residual stream between layers: the last-token states on
the device, consecutive positions' cosines as each batch leaves a layer, and the all-token states
spilled to a file (written by a background thread, read back in token chunks) when a metric reads
every token at every position (`depthcut.analysis.streamed`)."""

from __future__ import annotations

import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from depthcut.analysis.capture import TOKEN_POSITIONS, check_finite, last_positions, sampled_tokens, unit_cosines
from depthcut.errors import DepthcutError
from depthcut.io.output_checks import free_bytes
from depthcut.metrics.base import feed

READ_BACK_BYTES = 16 * 2**20  # the spilled states are read back in chunks of about this size (as float32)
SPILL_QUEUE = 2  # batches' spilled states waiting for the writer thread at most


def chunk_tokens(positions: int, width: int) -> int:
    """Tokens per read-back chunk of the all-token cosine pass: (tokens, L+1, H) float32 within budget."""
    return max(1, READ_BACK_BYTES // (positions * width * 4))


class SpilledStates:
    """States of every valid token at every position, in the model's dtype (as the in-memory path
    keeps them), in a file laid out (position, token, hidden): written a position of a batch at a
    time, read back in token chunks."""

    def __init__(self, directory: Path, positions: int, tokens: int, width: int, dtype: torch.dtype):
        self.positions, self.tokens, self.width, self.dtype = positions, tokens, width, dtype
        self.row_bytes = width * dtype.itemsize
        self.path = directory / "states.bin"
        self.file = open(self.path, "w+b")  # noqa: SIM115 (closed by close())
        self.file.truncate(positions * tokens * self.row_bytes)

    @staticmethod
    def bytes_needed(positions: int, tokens: int, width: int, itemsize: int) -> int:
        return positions * tokens * width * itemsize

    def write(self, position: int, first_token: int, states: torch.Tensor, ready=None) -> None:
        """Write the (tokens, width) CPU tensor `states` (once the CUDA event `ready` has passed, if given)."""
        if ready is not None:
            ready.synchronize()
        data = memoryview(states.view(torch.uint8).numpy())
        offset = (position * self.tokens + first_token) * self.row_bytes
        if os.pwrite(self.file.fileno(), data, offset) != data.nbytes:
            raise DepthcutError(f"could not write the spilled states to {self.path} (is the disk full?)")

    def read(self, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """(positions, stop - start, width): the tokens start..stop-1 at every position, read into
        the first columns of `into` ((positions, >= stop - start, width), reused chunk after chunk)."""
        if into is None:
            into = torch.empty(self.positions, stop - start, self.width, dtype=self.dtype)
        raw = into.view(torch.uint8).numpy()
        for position in range(self.positions):
            view = memoryview(raw[position, : stop - start]).cast("B")
            offset = (position * self.tokens + start) * self.row_bytes
            if os.preadv(self.file.fileno(), [view], offset) != view.nbytes:
                raise DepthcutError(f"{self.path} was truncated while the analysis ran")
        return into[:, : stop - start]

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def check_space(root: Path, needed: int) -> None:
    free = free_bytes(root)
    if free is not None and free < needed * 1.05:
        raise DepthcutError(
            f"the all-token metrics spill {needed / 2**30:.2f} GiB of activations to {root}, which has "
            f"{free / 2**30:.2f} GiB free; pass --spill-dir on a bigger disk, fewer --samples or a shorter "
            f"--seq-len, or leave the all-token angular distance out (--metrics angular_last_token,block_influence)")


def spill_folder(spill_dir: str | Path | None, needed: int) -> Path:
    """A fresh folder for `needed` bytes of spilled states under `spill_dir`, or a message why not."""
    root = Path(spill_dir or tempfile.gettempdir())
    if not root.is_dir():
        raise DepthcutError(f"the spill folder {root} does not exist")
    check_space(root, needed)
    return Path(tempfile.mkdtemp(prefix="depthcut-spill-", dir=root))


def reads_consecutive_only(metric) -> bool:
    """Whether an all-token metric reads only the cosines between consecutive positions,
    cos(x_l, x_l+1) (Block Influence): those are taken as each layer runs, nothing is spilled for it."""

    return metric.consecutive_only


def host_buffer(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An empty CPU tensor: page-locked if asked and possible (for copies from and to a GPU that
    do not hold up the host)."""
    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # no more memory can be locked: a plain buffer (copies then wait)
            pass
    return torch.empty(shape, dtype=dtype)


def unit_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(K, H) float32 unit vectors of the flattened tokens `rows` of `hidden` (B, T, H), with
    `unit_cosines`' arithmetic (upcast, then divide by the norm)."""
    units = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).float()
    return units.div_(torch.linalg.vector_norm(units, dim=-1, keepdim=True).clamp_min_(1e-12))


class StateKeeper:
    """What the metrics read of each state as it leaves a layer, and the cosines taken of it at the end.

    Always the state at each sequence's last token ((samples, L+1, hidden), on the device). With
    all-token metrics also either cos(x_l, x_l+1) of every valid token (Block Influence alone reads
    nothing else), or every valid token's state, spilled to `spill` by a background writer.
    """

    def __init__(self, batches: list, positions: int, width: int, dtype: torch.dtype, device: torch.device,
                 spill: SpilledStates | None, consecutive: bool, token_positions: int | None = TOKEN_POSITIONS):
        sizes = [int(mask.shape[0]) for _, mask in batches]
        self.positions, self.width, self.device, self.spill = positions, width, device, spill
        # Per batch, on the device once: the rows and positions of the last tokens, the valid tokens (for
        # cos(x_l, x_l+1)), the sampled tokens (spilled, as the in-memory path samples them).
        self.last_rows = [(torch.arange(size, device=device), last_positions(mask).to(device))
                          for size, (_, mask) in zip(sizes, batches, strict=True)]
        self.valid = [mask.reshape(-1).nonzero()[:, 0].to(device) for _, mask in batches] if consecutive else None
        sampled = [sampled_tokens(mask, token_positions) for _, mask in batches]
        self.sampled = [tokens.to(device) for tokens, _ in sampled]
        # Sampled tokens per sequence, in the spill's order: read-back chunks end where a sequence does.
        self.sequence_lengths = [int(n) for _, rows in sampled for n in torch.bincount(rows)]
        self.token_counts = [len(tokens) for tokens in self.sampled]  # spilled per batch
        self.last_token = torch.empty(sum(sizes), positions, width, dtype=dtype, device=device)
        self.consecutive = [torch.empty(len(valid), positions - 1, dtype=torch.float32, device=device)
                            for valid in self.valid] if consecutive else None
        self.row_starts = np.cumsum([0, *sizes])
        self.token_starts = np.cumsum([0, *self.token_counts])
        # The spilled states of a batch at one position go through a few buffers, reused: a steady
        # memory (no allocation per batch) and at most SPILL_QUEUE writes waiting.
        self.spill_buffers = [host_buffer((max(self.token_counts), width), dtype, pin=device.type == "cuda")
                              for _ in range(SPILL_QUEUE + 1)] if spill is not None else []
        self.writing: deque = deque()  # (write in progress, its buffer), oldest first
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="depthcut-spill") if spill is not None else None

    def capture(self, position: int, b: int, hidden: torch.Tensor, entered: torch.Tensor | None = None) -> None:
        """Keep what the metrics read of the state `hidden` (B, T, H) of batch b at `position`
        (`entered`: the state that entered the layer that gave it)."""
        rows, last = self.last_rows[b]
        kept = self.last_token[self.row_starts[b] : self.row_starts[b + 1], position]
        kept.copy_(hidden[rows, last])
        check_finite(kept[:, None], first_position=position)  # layer by layer here: refused where it starts
        if self.spill is not None:
            self._write_spill(position, b, hidden)
        if self.consecutive is not None and entered is not None:
            before, after = unit_rows(entered, self.valid[b]), unit_rows(hidden, self.valid[b])
            self.consecutive[b][:, position - 1] = (before * after).sum(dim=-1)

    def _write_spill(self, position: int, b: int, hidden: torch.Tensor) -> None:
        if not self.spill_buffers:  # all are being written: wait for the oldest
            done, buffer = self.writing.popleft()
            done.result()
            self.spill_buffers.append(buffer)
        buffer = self.spill_buffers.pop()
        rows, ready = buffer[: self.token_counts[b]], None
        flat = hidden.reshape(-1, self.width)
        if flat.device.type == "cpu":
            torch.index_select(flat, 0, self.sampled[b], out=rows)
        else:  # to pinned memory without waiting; the writer thread waits for the copy
            rows.copy_(flat.index_select(0, self.sampled[b]), non_blocking=True)
            if flat.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(flat.device))
        self.writing.append((self.writer.submit(self.spill.write, position, int(self.token_starts[b]), rows, ready),
                             buffer))

    def finish_writes(self) -> None:
        """Wait for every spilled state to be written (raising a writer's error), and free the buffers."""
        while self.writing:
            self.writing.popleft()[0].result()
        self.spill_buffers.clear()

    def update(self, metrics: list, progress: bool) -> None:
        """Feed `metrics` the cosines of what was kept: (B, P, P) per batch, (K, P, P) per token chunk."""
        all_token_metrics = [m for m in metrics if m.level == "all_tokens"]
        consecutive = [m for m in all_token_metrics if self.consecutive is not None and reads_consecutive_only(m)]
        for b in range(len(self.last_rows)):
            cosines = unit_cosines(self.last_token[self.row_starts[b] : self.row_starts[b + 1]])
            for metric in metrics:
                if metric.level == "last_token":
                    metric.update(cosines)
        if self.consecutive is not None:
            consecutive_cosines(self.consecutive, self.positions, consecutive, self.device)
        if self.spill is not None:
            spilled_cosines(self.spill, [m for m in all_token_metrics if m not in consecutive], self.device, progress,
                            self.sequence_lengths)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.shutdown(wait=True, cancel_futures=True)


def consecutive_cosines(consecutive: list[torch.Tensor], positions: int, metrics: list, device: torch.device) -> None:
    """Feed `metrics` (consecutive-only ones) the cosines cos(x_l, x_l+1) of every batch, (tokens, P-1)."""
    for values in consecutive:
        for metric in metrics:
            metric.update_consecutive(values.to(device))


def sequence_chunks(lengths: list[int], chunk: int) -> list[tuple[int, int]]:
    """(start, stop) token ranges of about `chunk` tokens, each ending where a sequence ends (a sequence
    longer than `chunk` is one range)."""
    ranges, start, stop = [], 0, 0
    for length in lengths:
        if stop > start and stop + length - start > chunk:
            ranges.append((start, stop))
            start = stop
        stop += length
    if stop > start:
        ranges.append((start, stop))
    return ranges


def spilled_cosines(spill: SpilledStates, metrics: list, device: torch.device, progress: bool,
                    sequence_lengths: list[int]) -> None:
    """Feed `metrics` the cosines of every spilled token, read back in chunks of whole sequences (with
    the sequence of each token): the next chunk is read (in another thread) into one of two buffers
    while the other's cosines are taken."""
    cuda = device.type == "cuda"
    ranges = sequence_chunks(sequence_lengths, chunk_tokens(spill.positions, spill.width))
    starts = [start for start, _ in ranges]
    rows = torch.repeat_interleave(torch.arange(len(sequence_lengths)), torch.tensor(sequence_lengths, dtype=torch.long))
    chunk = max((stop - start for start, stop in ranges), default=1)
    buffers = [host_buffer((spill.positions, chunk, spill.width), spill.dtype, pin=cuda) for _ in range(2)]
    copied = [None, None]  # CUDA: the event after which a buffer's copy to the device is done

    def read(i: int, after) -> torch.Tensor:
        if after is not None:
            after.synchronize()  # the buffer's previous chunk has reached the device
        return spill.read(*ranges[i], into=buffers[i % 2])

    with ThreadPoolExecutor(1, thread_name_prefix="depthcut-read-back") as read_back:
        upcoming = read_back.submit(read, 0, None)
        for i in tqdm(range(len(starts)), desc="cosines", unit="chunk", disable=not progress):
            block, upcoming = upcoming.result(), None
            if i + 1 < len(starts):
                upcoming = read_back.submit(read, i + 1, copied[(i + 1) % 2])
            block = block.to(device, non_blocking=True)
            if cuda:
                copied[i % 2] = torch.cuda.Event()
                copied[i % 2].record(torch.cuda.current_stream(device))
            cosines = unit_cosines(block.transpose(0, 1))  # (tokens, P, H) -> (tokens, P, P)
            del block
            for metric in metrics:
                feed(metric, cosines, rows[ranges[i][0] : ranges[i][1]])
