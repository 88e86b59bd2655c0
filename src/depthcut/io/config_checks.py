"""A model folder's config.json checked against its weights before any model is built from it,
without torch and without reading a weight: only the config and the safetensors headers (a few
kilobytes each).

A model is built from its config, not from its weights: `num_hidden_layers: 1000000000` over six
stored layers made transformers build a billion layers (a hang, then memory without bound) before the
loading report that would have said the weights do not match, and a `hidden_size` the weights do not
have made `prune --stream` write a model that cannot be loaded. So, before anything is built:

- config.json must be UTF-8 JSON holding an object, and the sizes that shape the model (the layer
  count, hidden size, vocabulary, heads, ...) positive integers where they are given;
- the layer count may not exceed the numbered layers the weights hold. Some architectures run
  stored layers more than once (HRM's cycles, Dory's recurrent loops: 128 config layers over 16
  stored); their configs say so with a key naming cycles, loops or recurrence, and for them (and
  for remote code, whose conventions depthcut cannot know) only a bound applies: at most
  `REUSE_BOUND` times the stored layers (HRM's is 8). The exact count is checked again once the
  model is built (its loading report, or the streamed prune's layer check); this check is what
  keeps an absurd count from being built at all;
- the hidden size and the vocabulary size must each be a dimension of some stored tensor (the
  embeddings have both): a config that disagrees with every tensor does not describe them.

Each refusal is one line naming config.json and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.safetensors_header import tensor_shapes

# The config keys of a decoder's layer count (transformers maps n_layer, n_layers onto num_hidden_layers).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")
# sizes that shape the model: positive integers where given (None is a documented "not used" in some configs)
SIZE_KEYS = (*LAYER_COUNT_KEYS, *HIDDEN_SIZE_KEYS, "vocab_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "head_dim", "n_head", "n_inner")
# config keys that say stored layers run more than once (HRM's H_cycles, Dory's n_recurrent_loops)
REUSED_LAYERS = re.compile(r"cycle|loop|recurren", re.IGNORECASE)
# the most config layers one stored layer may stand for where layers are reused (HRM: 8)
REUSE_BOUND = 16
# a layer's index in a tensor name: the first number between dots (`model.layers.5.mlp.experts.63.w`: 5)
LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def read_config(folder: Path) -> dict:
    """The config.json of the model folder `folder` as a dict, or a one-line error naming it."""
    path = Path(folder) / "config.json"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DepthcutError(f"{path} is not UTF-8 text (byte {error.start}); it should be the model's JSON "
                            "config") from None
    try:
        config = json.loads(text)
    except ValueError as error:
        raise DepthcutError(f"{path} is not valid JSON ({error}); is it truncated?") from None
    if not isinstance(config, dict):
        raise DepthcutError(f"{path} holds a JSON {type(config).__name__}, not the object of a model config")
    return config


def text_facts(config: dict) -> tuple[dict, str]:
    """The part of a config that describes the decoder (its text_config, for a multimodal model) and
    where it is in config.json ("" or "text_config.")."""
    text = config.get("text_config")
    return (text, "text_config.") if isinstance(text, dict) else (config, "")


def check_config_sizes(path: Path, facts: dict, prefix: str = "") -> None:
    """The sizes `SIZE_KEYS` of `facts` (read from `path`) are positive integers where they are given
    (a list of them, one per layer, where the architecture sizes layers apart: Gemma 3n's
    intermediate_size; never for the layer count, the hidden size or the vocabulary)."""
    for key in SIZE_KEYS:
        value = facts.get(key)
        if value is None:
            continue
        per_layer = isinstance(value, list) and key not in (*LAYER_COUNT_KEYS, *HIDDEN_SIZE_KEYS, "vocab_size")
        if not all(_positive(item) for item in (value if per_layer else [value])):
            raise DepthcutError(f"{path}: {prefix}{key} is {value!r}; it must be a positive whole number"
                                + (" (or a list of them)" if per_layer else ""))


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the folder's safetensors files with its shape, from their headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        shapes.update(tensor_shapes(shard))
    return shapes


def stored_layers(names) -> int | None:
    """How many numbered layers the tensor `names` hold (the highest index plus one), or None where
    no name has a layer index."""
    indices = [int(match.group(1)) for name in names if (match := LAYER_INDEX.search(name))]
    return max(indices) + 1 if indices else None


def reuses_layers(config: dict, facts: dict) -> bool:
    """Whether the config says that stored layers run more than once, or comes with code of its own
    (an auto_map) whose conventions depthcut cannot know."""
    return "auto_map" in config or any(REUSED_LAYERS.search(key) for key in (*config, *facts))


def check_config_against_weights(folder: str | Path) -> None:
    """Refuse a local model folder whose config.json cannot be read or does not describe the weights
    its safetensors headers list (see the module's docstring). A folder without config.json or
    without safetensors weights is left to the load."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        return
    config = read_config(folder)
    facts, prefix = text_facts(config)
    check_config_sizes(path, facts, prefix)
    shapes = stored_shapes(folder)
    if not shapes:
        return
    key = next((key for key in LAYER_COUNT_KEYS if key in facts), None)
    stored = stored_layers(shapes)
    if key is not None and stored is not None:
        count = facts[key]
        reused = reuses_layers(config, facts)
        if count > stored * (REUSE_BOUND if reused else 1):
            bound = f" (even with layers reused, at most {REUSE_BOUND} times as many)" if reused else ""
            raise DepthcutError(f"{path}: {prefix}{key} is {count:,}, but the weights hold {stored:,} numbered "
                                f"layers{bound}; the config does not describe these weights")
    if "auto_map" in config:
        return  # remote code may size its tensors otherwise
    dimensions = {size for shape in shapes.values() for size in shape}
    for key in (next((key for key in HIDDEN_SIZE_KEYS if key in facts), None), "vocab_size"):
        value = facts.get(key) if key else None
        if isinstance(value, int) and value not in dimensions:
            raise DepthcutError(f"{path}: {prefix}{key} is {value:,}, but no tensor of the weights has a dimension "
                                "of that size (the embeddings would); the config does not describe these weights")


def field_holding(facts, value, prefix: str = "") -> str | None:
    """The dotted path of the first field of the JSON `facts` whose value is `value` (a KeyError of
    transformers' names the value it did not know, not the field that held it)."""
    items = facts.items() if isinstance(facts, dict) else enumerate(facts) if isinstance(facts, list) else ()
    for key, item in items:
        path = f"{prefix}{key}"
        if item == value and not isinstance(item, (dict, list)):
            return path
        found = field_holding(item, value, f"{path}.")
        if found:
            return found
    return None


def config_failure(folder: str | Path, error: Exception) -> str:
    """One line for an error transformers raised reading config.json of the model folder `folder` or
    building a model from it: its message with the file named, and for a KeyError (`'nosuch'`) the
    field that holds the value it does not know (`rope_parameters.rope_type`)."""
    path = Path(folder) / "config.json"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    # a strict config's message is "Validation error for field 'x':" with the reason on the next line
    text = " ".join(lines[:2]) if "Validation error" in (lines or [""])[0] else (lines[0] if lines else "")
    if isinstance(error, KeyError) and error.args:
        try:
            field = field_holding(read_config(Path(folder)), error.args[0])
        except (DepthcutError, OSError):
            field = None
        if field is not None:
            return f"{path}: {field} is {error.args[0]!r}, a value transformers does not know for it"
        return f"{path} (or the code of its model) asks for {error.args[0]!r}, which transformers does not have"
    text = text or type(error).__name__
    return text if "config.json" in text else f"{path}: {text}"
