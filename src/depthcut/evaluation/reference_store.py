"""Where the unpruned model's next-token probabilities wait to be compared with each candidate's: in
memory, or in a file on disk read back one slice of tokens at a time.

The references are what a shrink holds longest, and they grow with the vocabulary, not with the
model: 32 windows of 255 tokens over Qwen's 151,936-token vocabulary are 2.5 GB in float16, per
validation source. `DiskProbabilities` keeps them in an unlinked temporary file (no name on disk, so
nothing is left behind by a crash or a kill) and reads a slice with `os.preadv` into a buffer of its
own: the resident memory is one slice (at most `CHUNK_BYTES` of float32 work, a few MB), whatever
the windows and the vocabulary. The values are the same bytes either way, so the scores are too."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

# Above this many bytes of references (all validation sources together), they go to disk
# (`choose_store`): 2.5 GB per source at a 150k vocabulary is more than a model of 0.5B parameters.
MEMORY_LIMIT = 256 * 2**20
DTYPE = torch.float16
ITEM = 2  # bytes of a float16


class MemoryProbabilities:
    """Per window a (tokens, V) float16 tensor, in memory."""

    def __init__(self, windows: list[torch.Tensor] | None = None):
        self.windows = windows if windows is not None else []

    def begin(self, tokens: int, vocabulary: int) -> None:
        """Start the next window: `write` then fills its token slices in order."""
        self.windows.append(torch.empty(tokens, vocabulary, dtype=DTYPE))

    def write(self, part: slice, values: torch.Tensor) -> None:
        self.windows[-1][part] = values

    def rows(self, window: int, part: slice) -> torch.Tensor:
        return self.windows[window][part]

    def subset(self, start: int, stop: int) -> MemoryProbabilities:
        return MemoryProbabilities(self.windows[start:stop])

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def resident_bytes(self) -> int:
        return sum(w.numel() * ITEM for w in self.windows)


class _File:
    """An unlinked temporary file, closed when the last store that reads it goes."""

    def __init__(self, folder: str | Path | None):
        handle, path = tempfile.mkstemp(prefix="depthcut-references-", suffix=".f16", dir=folder)
        os.unlink(path)  # no name: the space is freed when it is closed, even after a kill
        self.fd, self.size = handle, 0

    def append(self, data: bytes) -> int:
        offset = self.size
        os.pwrite(self.fd, data, offset)
        self.size += len(data)
        return offset

    def __del__(self):
        os.close(self.fd)


class DiskProbabilities:
    """The same values in a temporary file on disk (`folder`, else the system's), read a token slice at a
    time: `rows` costs the bytes of that slice in memory."""

    def __init__(self, folder: str | Path | None = None, file: _File | None = None,
                 windows: list[tuple[int, int, int]] | None = None):
        self.file = file if file is not None else _File(folder)
        self.windows = windows if windows is not None else []  # per window: (offset, tokens, V)

    def begin(self, tokens: int, vocabulary: int) -> None:
        self.windows.append((self.file.size, tokens, vocabulary))

    def write(self, part: slice, values: torch.Tensor) -> None:
        offset, _, vocabulary = self.windows[-1]
        # slices arrive in order, so appending puts each at offset + start * V * ITEM
        written = self.file.append(values.to(DTYPE).contiguous().numpy().tobytes())
        if written != offset + part.start * vocabulary * ITEM:
            raise RuntimeError("reference token slices written out of order")

    def rows(self, window: int, part: slice) -> torch.Tensor:
        offset, tokens, vocabulary = self.windows[window]
        start, stop, _ = part.indices(tokens)
        buffer = bytearray((stop - start) * vocabulary * ITEM)
        read = os.preadv(self.file.fd, [buffer], offset + start * vocabulary * ITEM)
        if read != len(buffer):
            raise OSError(f"the reference file ended early: {read} of {len(buffer)} bytes")
        return torch.frombuffer(buffer, dtype=DTYPE).view(stop - start, vocabulary)

    def subset(self, start: int, stop: int) -> DiskProbabilities:
        return DiskProbabilities(file=self.file, windows=self.windows[start:stop])

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def resident_bytes(self) -> int:
        return 0


def choose_store(total_bytes: int, folder: str | Path | None = None, limit: int = MEMORY_LIMIT):
    """A store for `total_bytes` of references: in memory up to `limit`, else on disk in `folder`."""
    return MemoryProbabilities() if total_bytes <= limit else DiskProbabilities(folder)
