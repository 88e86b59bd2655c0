"""A model's decoder layer count read from its files alone, in milliseconds and without torch: the
config.json of a folder (or of a hub model already in the local cache), the metadata of a GGUF file
(`<arch>.block_count`). The checks that need no weights (`--drop 40` on a 30-layer model) run on it
before the model loads. None wherever the files do not say plainly: the load that follows decides."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

from depthcut.model.source import ModelSource

# The keys that hold a decoder's layer count in config.json (transformers maps the older names onto
# num_hidden_layers: n_layer for GPT-2 and BLOOM, n_layers for MPT).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers")

GGUF_MAGIC = b"GGUF"
GGUF_STRING, GGUF_ARRAY = 8, 9
# struct formats of GGUF's scalar value types (the metadata is little-endian in files of version 2 and 3)
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}
LONGEST_GGUF_STRING = 1 << 24  # a longer length means the file is not what its name says: give up


def layer_count(source: ModelSource, layer_path: str | None = None) -> int | None:
    """The number of decoder layers `source` has by its config or GGUF header, or None where they do
    not tell (no such file, an unknown layout, or a `layer_path` that names the stack itself)."""
    if layer_path:
        return None  # the stack a --layer-path names need not be the one the config counts
    if source.gguf_file:
        return gguf_block_count(Path(source.location) / source.gguf_file)
    config = Path(source.location) / "config.json"
    if not config.is_file() and source.is_hub_id:
        config = cached_hub_file(source.spec, "config.json")
    return configured_layer_count(config) if config is not None else None


def configured_layer_count(config_file: Path) -> int | None:
    """The decoder layer count a config.json gives (that of its text config, for a multimodal model)."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    facts = text if isinstance(text, dict) else config
    count = next((facts[key] for key in LAYER_COUNT_KEYS if key in facts), None)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """`filename` of hub model `repo_id` in the local Hugging Face cache, or None (never downloads)."""
    # deferred: huggingface_hub is needed only for a hub id, and the command line starts without it
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def hub_model_cached(repo_id: str) -> bool:
    """Whether hub model `repo_id` has a config.json in the local cache (what loading it offline needs first)."""
    return cached_hub_file(repo_id, "config.json") is not None


def gguf_block_count(path: Path) -> int | None:
    """`<general.architecture>.block_count` from a GGUF file's metadata, reading only the metadata up
    to that key (a few kilobytes; the vocabulary arrays usually come after it)."""
    try:
        with open(path, "rb") as file:
            if file.read(4) != GGUF_MAGIC or _read(file, "<I") not in (2, 3):
                return None
            _read(file, "<Q")  # tensor count
            architecture = None
            for _ in range(_read(file, "<Q")):
                key = _read_string(file)
                kind = _read(file, "<I")
                if key == "general.architecture" and kind == GGUF_STRING:
                    architecture = _read_string(file)
                elif architecture is not None and key == f"{architecture}.block_count" and kind in GGUF_SCALARS:
                    count = _read(file, GGUF_SCALARS[kind])
                    return count if isinstance(count, int) and count > 0 else None
                else:
                    _skip_value(file, kind)
    except (OSError, ValueError, struct.error):
        return None
    return None


def _read(file: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = file.read(size)
    if len(data) != size:
        raise ValueError("the GGUF metadata ends early")
    return struct.unpack(fmt, data)[0]


def _read_string(file: BinaryIO) -> str:
    length = _read(file, "<Q")
    if length > LONGEST_GGUF_STRING:
        raise ValueError("not a GGUF string")
    return file.read(length).decode("utf-8", errors="replace")


def _skip_value(file: BinaryIO, kind: int) -> None:
    if kind in GGUF_SCALARS:
        file.seek(struct.calcsize(GGUF_SCALARS[kind]), 1)
    elif kind == GGUF_STRING:
        file.seek(_skip_length(file), 1)
    elif kind == GGUF_ARRAY:
        item, count = _read(file, "<I"), _read(file, "<Q")
        if item in GGUF_SCALARS:
            file.seek(struct.calcsize(GGUF_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(file, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def _skip_length(file: BinaryIO) -> int:
    length = _read(file, "<Q")
    if length > LONGEST_GGUF_STRING:
        raise ValueError("not a GGUF string")
    return length
