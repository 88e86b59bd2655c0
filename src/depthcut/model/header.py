"""A model's decoder layer count read from its files alone, in milliseconds and without torch: the
config.json of a folder (or of a hub model already in the local cache), the metadata of a GGUF file
(`<arch>.block_count`). The checks that need no weights (`--drop 40` on a 30-layer model) run on it
before the model loads. None wherever the files do not say plainly: the load that follows decides."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.gguf_checks import SCALAR_FORMATS, STRING, header, metadata
from depthcut.model.source import ModelSource

# The keys that hold a decoder's layer count in config.json (transformers maps the older names onto
# num_hidden_layers: n_layer for GPT-2 and BLOOM, n_layers for MPT).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers")


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
    to that key (a few kilobytes; the vocabulary arrays usually come after it), or None where the file
    does not tell (`depthcut.io.gguf_checks`' reader: every length bounded by the file)."""
    try:
        with open(path, "rb") as file:
            opened = header(path, file)
            if opened is None:
                return None
            reader, _, entries = opened
            architecture = None
            for key, kind in metadata(reader, entries):
                if key == "general.architecture" and kind == STRING:
                    architecture = reader.string(key)
                elif architecture is not None and key == f"{architecture}.block_count" and kind in SCALAR_FORMATS:
                    count = reader.scalar(kind)
                    return count if isinstance(count, int) and count > 0 else None
    except (OSError, DepthcutError, struct.error):
        return None
    return None

