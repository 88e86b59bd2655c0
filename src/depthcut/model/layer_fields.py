"""What each config field means for the decoder layers, and how removing layers rewrites it.

Hugging Face configs describe their layers in many ways, and each needs its own rule:

- per-layer sequences (`layer_types`, `layers_block_type`, `no_rope_layers`, a per-layer
  `intermediate_size` list, `hybrid_override_pattern` with one character per layer): sliced;
- lists of layer indices (`mlp_only_layers`, `moe_layers`, `attn_layer_indices`): renumbered onto
  the kept layers, removed ones left out;
- leading counts (`first_k_dense_replace`: layers below it are dense) and last indices
  (`moe_layer_end_index`): recounted over the kept layers;
- periods, steps and offsets (`decoder_sparse_step`, `attn_layer_period`, ...): rewritten as the
  explicit per-layer field where the config class has one (`decoder_sparse_step` becomes
  `mlp_only_layers`); otherwise kept, and the cut is allowed only when every kept layer keeps its
  kind at its new position, which `depthcut.model.layer_kinds` checks on the rebuilt model;
- layers after the stack (`num_nextn_predict_layers`, multi-token prediction): transformers never
  loads them, so an in-memory prune drops them and says so; a shard-by-shard prune carries them.

A field that is in none of these tables and could name layer positions (an int whose name says it
counts or indexes layers, a list or string with one entry per layer) stops the cut: exit 0 must
mean the model is right. `allow` names fields the user knows to be harmless.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from depthcut.errors import DepthcutError

# One entry per layer: sliced like the layer list.
PER_LAYER = frozenset({
    "layer_types", "layers_block_type", "hybrid_override_pattern", "no_rope_layers", "sliding_window_pattern_list",
    "swa_layers", "activation_sparsity_pattern", "mlp_layer_types", "layers_num_experts", "block_types",
    "attention_types", "layer_block_types", "layer_configs", "moe_layer_types", "ffn_layer_types",
    "layers_block_types", "use_sliding_window_layers", "intermediate_size", "num_key_value_heads",
    "num_attention_heads", "head_dim", "n_heads_in_group", "rope_layers", "attn_window_size_layers",
    "attention_layers", "layer_rope_theta", "num_attention_heads_per_layer", "num_key_value_heads_per_layer",
    "intermediate_size_per_layer", "head_dim_per_layer", "sliding_window_per_layer",
})
# Lists of layer indices: renumbered onto the kept layers.
INDEX_LISTS = frozenset({
    "mlp_only_layers", "moe_layers", "attn_layer_indices", "global_attn_layers", "full_attention_layers",
    "full_attn_idxs", "cross_attention_layers", "dense_layers", "sparse_layers", "linear_attn_layers",
    "swa_layer_indices", "attention_layer_indices", "mamba_layer_indices", "no_rope_layer_indices",
    "global_attention_layers", "sliding_attention_layers", "dense_layer_indices",
})
# Layers below this index are of one kind: recounted as the number of kept layers below it.
LEADING_COUNTS = frozenset({
    "first_k_dense_replace", "moe_layer_start_index", "max_window_layers", "first_k_dense", "num_dense_layers",
    "n_dense_layers", "dense_replace", "first_dense_layers", "num_first_dense_layers",
})
# Layers up to and including this index are of one kind: recounted.
LAST_INDICES = frozenset({"moe_layer_end_index"})
# Kinds derived from the index by a period, a step or an offset. They stay as they are; the cut is
# allowed only where every kept layer keeps its kind (checked on the rebuilt model).
PERIODS = frozenset({
    "decoder_sparse_step", "interleave_moe_layer_step", "attn_layer_period", "attn_layer_offset",
    "expert_layer_period", "expert_layer_offset", "moe_layer_interval", "moe_layer_freq", "no_rope_layer_interval",
    "sliding_window_pattern", "full_attention_interval", "global_attn_every_n_layers", "moe_every_n_layers",
    "layer_group_size", "hybrid_layer_period", "full_attn_interval", "attention_layer_period",
    "attention_layer_offset", "mamba_layer_period", "mamba_layer_offset", "sliding_window_period",
    "prefix_dense_sliding_window_pattern",
})
# Layers after the stack (multi-token prediction heads): never part of the loaded model.
TRAILING_LAYERS = frozenset({"num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers"})
# Layers that reuse the KV cache of earlier layers (Gemma 3n's last N): which layer each reads from
# moves with a cut, so a cut is refused while any layer shares.
KV_SHARING = frozenset({"num_kv_shared_layers"})
# The layer count under its names (a causal LM made of an encoder-decoder's decoder counts `decoder_layers`).
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
# Names that look as if they counted or indexed layers, and do not.
HARMLESS = frozenset({
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "layer_norm_eps", "layer_norm_epsilon",
    "layernorm_epsilon", "layer_norm_type", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
    "mtp_layers_block_type", "block_size", "chunk_size", "mamba_chunk_size",
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "cls_token_id",
    "mask_token_id", "unk_token_id", "image_token_id", "image_token_index", "video_token_id", "video_token_index",
    "audio_token_id", "audio_token_index", "boi_token_index", "eoi_token_index", "vision_start_token_id",
    "vision_end_token_id", "vision_token_id", "altup_active_idx", "attention_chunk_size", "time_step_floor",
    "max_position_embeddings", "num_logits_to_keep", "initializer_range", "layerdrop", "scale_embedding",
    "hidden_act", "use_cache", "num_random_blocks", "decoder_layers", "encoder_layers", "num_decoder_layers",
})

# A name that suggests the value counts, indexes or patterns layers; and names of other things
# (the SSM's time step, token ids, head and expert sizes) that share those words.
_LAYERISH = re.compile(r"layer|(?<!random_)block(?!_size)|step|period|interval|offset|pattern|every|freq|first_k"
                       r"|replace|_idx$|_idxs$|_index$|_indices$")
_NOT_LAYERS = re.compile(r"^time_step|token|_dim$|_heads$|_rank$|topk|_size$|multiple_of")


@dataclass
class ConfigRewrite:
    """What a cut changed in a (text) config: field -> (before, after), the fields taken on trust."""

    changed: dict[str, tuple[object, object]] = field(default_factory=dict)
    allowed: list[str] = field(default_factory=list)  # unknown fields the user vouched for
    notes: list[str] = field(default_factory=list)  # what a user should know (dropped MTP layers, ...)

    def as_dict(self) -> dict:
        return {"changed": {name: {"before": before, "after": after} for name, (before, after) in self.changed.items()},
                "allowed_unknown": self.allowed, "notes": self.notes}


def _stored_fields(cfg) -> dict:
    """The config's own fields (not properties or class constants), as `to_dict` writes them."""
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def could_name_layers(name: str, value, num_layers: int) -> bool:
    """Whether a field not in the tables might describe layer positions."""
    if value is None or isinstance(value, (bool, float, dict)):
        return False
    layerish = bool(_LAYERISH.search(name.lower())) and not _NOT_LAYERS.search(name.lower())
    if isinstance(value, str):  # a per-layer pattern, one character per layer, in a field named as one
        return len(value) == num_layers and layerish
    if isinstance(value, (list, tuple)) and len(value) == num_layers and num_layers > 1:
        return True
    if isinstance(value, (list, tuple)) and (not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in value)):
        return False  # empty, or not indices (floats, strings)
    return layerish


def unknown_layer_fields(cfg, num_layers: int) -> list[str]:
    """Fields of the text config that might name layers and that no rule covers."""
    known = PER_LAYER | INDEX_LISTS | LEADING_COUNTS | LAST_INDICES | PERIODS | TRAILING_LAYERS | KV_SHARING | HARMLESS
    return sorted(name for name, value in _stored_fields(cfg).items()
                  if name not in known and could_name_layers(name, value, num_layers))


def _is_per_layer(value, num_layers: int) -> bool:
    return isinstance(value, (list, tuple, str)) and len(value) == num_layers


def rewrite_layer_fields(cfg, kept: list[int], num_layers: int, allow: Iterable[str] = (),
                         carries_trailing: bool = False) -> ConfigRewrite:
    """Rewrite the text config `cfg` in place for a model that keeps layers `kept` of `num_layers`.

    Raises `DepthcutError` for a field that might name layers and is not understood (unless in
    `allow`) and for a per-layer field of the wrong length. `carries_trailing`: the layers after
    the stack (multi-token prediction) are written too (shard by shard), so their count stays.
    """
    allow = set(allow)
    unknown = [name for name in unknown_layer_fields(cfg, num_layers) if name not in allow]
    if unknown:
        shown = ", ".join(f"{name}={_stored_fields(cfg)[name]!r}"[:80] for name in unknown)
        raise DepthcutError(
            f"the config field(s) {shown} might describe layer positions and depthcut does not know how removing "
            f"layers changes them; if you know a field is unrelated to layer positions, pass "
            f"--allow-unknown-config {unknown[0]} (Python: allow_unknown_config=[...])")
    for name in KV_SHARING:
        shared = getattr(cfg, name, None)
        if isinstance(shared, int) and shared > 0:
            raise DepthcutError(f"this model's last {shared} layers reuse the KV cache of earlier layers ({name}); "
                                "depthcut cannot remove layers from it exactly")
    result = ConfigRewrite(allowed=sorted(allow & set(_stored_fields(cfg))))
    position = {old: new for new, old in enumerate(kept)}
    fields = _stored_fields(cfg)

    def change(name: str, value) -> None:
        result.changed[name] = (fields[name], value)
        setattr(cfg, name, value)

    _rewrite_sparse_step(cfg, kept, fields, change)
    _rewrite_attention_types(cfg, kept, num_layers, fields, change)
    for name, value in fields.items():
        if value is None or name in result.changed:
            continue
        if name in PER_LAYER and isinstance(value, (list, tuple, str)):
            if not _is_per_layer(value, num_layers):
                if name in ("intermediate_size", "num_key_value_heads", "num_attention_heads", "head_dim"):
                    raise DepthcutError(f"the config field {name!r} has {len(value)} entries for {num_layers} layers")
                if isinstance(value, str) or len(value) > 0:
                    raise DepthcutError(f"the per-layer config field {name!r} has {len(value)} entries for "
                                        f"{num_layers} layers; depthcut cannot tell which entry is which layer's")
                continue
            sliced = "".join(value[i] for i in kept) if isinstance(value, str) else type(value)(value[i] for i in kept)
            change(name, sliced)
        elif name in INDEX_LISTS and isinstance(value, (list, tuple)):
            if any(not isinstance(i, int) or isinstance(i, bool) for i in value):
                raise DepthcutError(f"the config field {name!r} = {value!r} is not a list of layer indices")
            change(name, type(value)(position[i] for i in value if i in position))
        elif name in LEADING_COUNTS and isinstance(value, int) and not isinstance(value, bool):
            change(name, sum(1 for i in kept if i < value))
        elif name in LAST_INDICES and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            change(name, sum(1 for i in kept if i <= value) - 1)
        elif name in TRAILING_LAYERS and isinstance(value, int) and value > 0 and not carries_trailing:
            change(name, 0)
            result.notes.append(f"{name}: the {value} multi-token-prediction layer(s) after the stack are not loaded "
                                "by transformers, so they are not written; set to 0")
    for name in [n for n in LAYER_COUNTS if n in fields]:
        if isinstance(fields[name], int) and fields[name] == num_layers:
            change(name, len(kept))
    cfg.num_hidden_layers = len(kept)  # attribute maps (GPT-2's n_layer) follow
    _rewrite_per_layer_overrides(cfg, position, result)
    return result


def _rewrite_per_layer_overrides(cfg, position: dict[int, int], result: ConfigRewrite) -> None:
    """transformers' heterogeneous configs (`per_layer_config`: layer index -> the settings in which
    that layer differs): the kept layers' entries, renumbered. Set after the layer count, which the
    setter checks the indices against."""
    spec = vars(cfg).get("_heterogeneity_spec")
    if spec is None:
        return
    overrides = spec.per_layer_overrides
    renumbered = {position[i]: copy.deepcopy(o) for i, o in sorted(overrides.items()) if i in position}
    cfg.per_layer_config = renumbered
    result.changed["per_layer_config"] = (sorted(overrides), sorted(renumbered))


def _rewrite_attention_types(cfg, kept: list[int], num_layers: int, fields: dict, change) -> None:
    """GPT-Neo's `attention_types` ([[["global", "local"], 4]]: a pattern repeated) is what its
    config expands into `attention_layers` when loaded: written out as the kept layers' list, once."""
    types = fields.get("attention_types")
    layers = fields.get("attention_layers")
    if not (isinstance(layers, list) and len(layers) == num_layers and isinstance(types, list) and types
            and all(isinstance(t, (list, tuple)) and len(t) == 2 for t in types)):
        return
    change("attention_types", [[[layers[i] for i in kept], 1]])


def _rewrite_sparse_step(cfg, kept: list[int], fields: dict, change) -> None:
    """Qwen2-MoE's rule, layer i sparse when `(i + 1) % decoder_sparse_step == 0` and i is not in
    `mlp_only_layers`, written as the explicit list with a step of 1."""
    step = fields.get("decoder_sparse_step")
    if not isinstance(step, int) or step <= 1 or "mlp_only_layers" not in fields:
        return
    dense = set(fields.get("mlp_only_layers") or [])
    sparse = [i not in dense and (i + 1) % step == 0 for i in kept]
    change("decoder_sparse_step", 1)
    change("mlp_only_layers", [new for new, is_sparse in enumerate(sparse) if not is_sparse])
