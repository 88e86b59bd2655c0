"""What removing decoder layers changes in a GGUF's metadata, decided before anything is written.

llama.cpp describes layers in three ways, and each needs its own treatment:

- Per-layer arrays: a key that is an array with one value per layer (`feed_forward_length`,
  `attention.head_count`, `attention.head_count_kv`, `attention.sliding_window_pattern` as booleans,
  ...; every such key gguf names, and any other array of the model's namespace whose length is the
  block count). They are sliced to the kept layers.
- Counts of leading or trailing layers (`leading_dense_block_count`: the first N layers are dense;
  `nextn_predict_layers`: the last N are multi-token-prediction heads). They are recounted, or the
  layers they name must stay.
- Layer kinds derived from the index: a period (`attention.sliding_window_pattern` as a number,
  `full_attention_interval`, `interleave_moe_layer_step`, or the period llama.cpp hard-codes for the
  architecture, e.g. Gemma 2: every 2nd layer global, Gemma 3: every 6th). Renumbering must leave
  every kept layer of the kind it was (remove whole periods), or the pruned model would run some
  layers with the wrong attention (or fail to load, when tensor shapes differ between the kinds).

Anything else that might describe layers and is not understood stops the prune with a message
naming it: an array of another length, tensors of layers outside `blk.N.` (encoder-decoder models),
architectures whose per-layer data lives in global tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from depthcut.errors import DepthcutError
from depthcut.io.gguf_files import gguf_module

BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
OTHER_BLOCKS = re.compile(r"^(?P<prefix>.+?)\.blk\.\d+\.")  # enc.blk.N., dec.blk.N., v.blk.N. ...

# Metadata outside the model's namespace never describes its decoder layers.
UNRELATED_NAMESPACES = ("general.", "tokenizer.", "split.", "depthcut.", "clip.", "vision.", "audio.", "adapter.",
                        "imatrix.", "quantize.")

# llama.cpp's hard-coded periods: layer i is the special (global attention) kind when i % n == n - 1.
ARCH_PERIODS = {"gemma2": 2, "gemma3": 6, "gemma-embedding": 6, "cohere2": 4, "llama4": 4}

# Architectures whose layers cannot be removed by renaming blk.N tensors, and why.
UNSUPPORTED = {
    "gemma3n": "its per-layer embeddings of every layer are packed together in global tensors (per_layer_token_embd, "
               "per_layer_model_proj) and its last layers share the KV cache of earlier ones",
    "t5": "it is an encoder-decoder model", "t5encoder": "it is an encoder model",
    "wavtokenizer-dec": "it is an audio decoder, not a decoder LLM",
}


def _keys(gguf) -> dict[str, list[str]]:
    """The key templates of each kind, as the installed gguf package names them."""
    def present(*paths: str) -> list[str]:
        found = []
        for path in paths:
            holder = gguf.Keys
            for part in path.split("."):
                holder = getattr(holder, part, None)
            if isinstance(holder, str):
                found.append(holder)
        return found

    return {
        "per_layer": present("LLM.FEED_FORWARD_LENGTH", "Attention.HEAD_COUNT", "Attention.HEAD_COUNT_KV",
                             "Attention.SLIDING_WINDOW_PATTERN", "LLM.ACTIVATION_SPARSITY_SCALE",
                             "LLM.SWIGLU_CLAMP_EXP", "LLM.SWIGLU_CLAMP_SHEXP", "xIELU.ALPHA_P", "xIELU.ALPHA_N",
                             "xIELU.BETA", "xIELU.EPS"),
        "global_arrays": present("Rope.DIMENSION_SECTIONS", "Classifier.OUTPUT_LABELS"),
        # periods whose special layer is the last of each period: i % n == n - 1
        "period_last": present("Attention.SLIDING_WINDOW_PATTERN", "LLM.FULL_ATTENTION_INTERVAL",
                               "LLM.INTERLEAVE_MOE_LAYER_STEP", "LLM.RESCALE_EVERY_N_LAYERS"),
        "period_unknown": present("LLM.MOE_EVERY_N_LAYERS"),  # the phase is not known: keep i % n itself
        "leading_recount": present("LLM.LEADING_DENSE_BLOCK_COUNT"),
        "leading_kept": present("LLM.NUM_DEEPSTACK_LAYERS"),
        "trailing_kept": present("LLM.NEXTN_PREDICT_LAYERS"),
        "encoder_decoder": present("LLM.DECODER_BLOCK_COUNT"),
        "sliding_pattern": present("Attention.SLIDING_WINDOW_PATTERN"),  # a period when a number, else per layer
    }


@dataclass
class LayerPlan:
    """How a GGUF changes when `removed` layers go: new metadata values, tensor names."""

    num_layers: int
    removed: list[int]
    kept: list[int]  # the source indices of the kept layers, in order
    values: dict[str, object] = field(default_factory=dict)  # key -> new value (its type stays the source's)
    sliced: list[str] = field(default_factory=list)  # per-layer arrays sliced (by gguf's name or by their length)
    recounted: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (before, after)
    dropped: list[str] = field(default_factory=list)  # keys not written (a split's)

    def rename(self, name: str) -> str | None:
        """The output name of tensor `name`, or None when it belongs to a removed layer."""
        match = BLOCK.match(name)
        if match is None:
            return name
        new = self._new_index.get(int(match[1]))
        return None if new is None else f"blk.{new}.{match[2]}"

    def __post_init__(self):
        self._new_index = {old: new for new, old in enumerate(self.kept)}


def plan_removal(model, removed: list[int], global_keys=()) -> LayerPlan:
    """The `LayerPlan` for removing `removed` (sorted, valid indices) from the opened GGUF `model`
    (`depthcut.io.gguf_files.GGUFModel`), or a `DepthcutError` saying what stands in the way.
    `global_keys` are array keys the caller knows not to describe layers."""

    gguf = gguf_module()
    arch, count = model.architecture, model.block_count
    if arch in UNSUPPORTED:
        raise DepthcutError(f"cannot remove layers from {model.path} ({arch}): {UNSUPPORTED[arch]}")
    templates = {kind: [t.format(arch=arch) for t in found] for kind, found in _keys(gguf).items()}
    _check_tensor_names(model, count)
    for key in templates["encoder_decoder"]:
        if key in model.fields:
            raise DepthcutError(f"cannot remove layers from {model.path}: it has {key}, an encoder-decoder model "
                                "whose decoder layers block_count does not count")
    kept = [i for i in range(count) if i not in set(removed)]
    plan = LayerPlan(count, list(removed), kept)
    plan.values[f"{arch}.block_count"] = len(kept)
    plan.dropped = [key for key in model.fields if key.startswith("split.")]
    _slice_arrays(model, plan, templates, set(global_keys))
    _check_counts(model, plan, templates)
    _check_periods(model, plan, templates, arch)
    return plan


def _check_tensor_names(model, count: int) -> None:
    others = sorted({m["prefix"] for t in model.tensors if (m := OTHER_BLOCKS.match(t.name))})
    if others:
        example = next(t.name for t in model.tensors if OTHER_BLOCKS.match(t.name))
        raise DepthcutError(f"cannot remove layers from {model.path} ({model.architecture}): it has layer tensors "
                            f"outside blk.N (under {', '.join(o + '.blk' for o in others)}, e.g. {example}); depthcut "
                            f"prunes the decoder layers blk.0 .. blk.{count - 1} of decoder-only models")
    beyond = sorted({int(m[1]) for t in model.tensors if (m := BLOCK.match(t.name)) and int(m[1]) >= count})
    if beyond:
        raise DepthcutError(f"{model.path} has tensors of layers {beyond} but {model.architecture}.block_count is "
                            f"{count}: its layers are not understood")


def _slice_arrays(model, plan: LayerPlan, templates: dict, global_keys: set) -> None:
    per_layer, known_global = set(templates["per_layer"]), set(templates["global_arrays"]) | global_keys
    not_understood = []
    for key in model.fields:
        if not model.is_array(key) or key in known_global:
            continue
        if key.startswith(UNRELATED_NAMESPACES) and key not in per_layer:
            continue
        values = model.value(key)
        if len(values) == plan.num_layers:
            plan.values[key] = [values[i] for i in plan.kept]
            plan.sliced.append(key)
        elif key in per_layer or key.startswith(f"{model.architecture}."):
            not_understood.append(f"{key} ({len(values)} values)")
    if not_understood:
        raise DepthcutError(
            f"cannot remove layers from {model.path} ({model.architecture}, {plan.num_layers} layers): the metadata "
            f"arrays {', '.join(not_understood)} do not hold one value per layer, so depthcut cannot tell how removing "
            "layers changes them (pass global_keys=[...] for arrays known not to describe layers)")


def _count(model, key: str) -> int | None:
    value = model.value(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and not model.is_array(key) else None


def _check_counts(model, plan: LayerPlan, templates: dict) -> None:
    removed = set(plan.removed)
    for key in templates["leading_recount"]:
        if (n := _count(model, key)) is not None:
            after = sum(1 for i in plan.kept if i < n)
            if after != n:
                plan.values[key] = after
                plan.recounted[key] = (n, after)
    for key in templates["leading_kept"]:
        if (n := _count(model, key)) and removed & set(range(n)):
            raise DepthcutError(f"{key} = {n}: layers 0..{n - 1} of {model.path} receive inputs of their own and "
                                f"cannot be removed; asked to remove {sorted(removed & set(range(n)))}")
    for key in templates["trailing_kept"]:
        if (n := _count(model, key)) and removed & set(range(plan.num_layers - n, plan.num_layers)):
            last = range(plan.num_layers - n, plan.num_layers)
            raise DepthcutError(f"{key} = {n}: the last {n} layers of {model.path} ({last.start}..{last.stop - 1}) "
                                "are prediction heads, not decoder layers, and cannot be removed")


def _check_periods(model, plan: LayerPlan, templates: dict, arch: str) -> None:
    periods = []  # (key or why, n, special_is_last)
    for key in templates["period_last"] + templates["period_unknown"]:
        if (n := _count(model, key)) and n > 1:
            periods.append((key, n, key in templates["period_last"]))
    if arch in ARCH_PERIODS and not any(key in templates["sliding_pattern"] for key, _, _ in periods):
        periods.append((f"llama.cpp's {arch} loader", ARCH_PERIODS[arch], True))
    for source, n, last in periods:
        kind = (lambda i, n=n: i % n == n - 1) if last else (lambda i, n=n: i % n)
        changed = [(old, new) for new, old in enumerate(plan.kept) if kind(old) != kind(new)]
        if changed:
            old, new = changed[0]
            what = (f"the last layer of every {n} (index % {n} == {n - 1}) is of another kind (global attention, "
                    "MoE, ...)" if last else f"layers repeat with a period of {n}")
            raise DepthcutError(
                f"removing layers {plan.removed} from {model.path} would change the kind of {len(changed)} kept "
                f"layer(s): by {source}, {what}, and layer {old} would become layer {new}. Remove whole periods "
                f"instead: a multiple of {n} consecutive layers (e.g. {_example(plan, n)})")


def _example(plan: LayerPlan, n: int) -> str:
    """A block of whole periods to remove, about as many layers as asked, before the last layer."""
    size = min(max(n, round(len(plan.removed) / n) * n), plan.num_layers - 1)
    start = max(0, plan.num_layers - 1 - size)
    return f"layers {start}:{start + size}"
