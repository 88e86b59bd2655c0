"""The checks that need no weights, run before anything heavy is imported or loaded: that MODEL is a
model (with a suggestion for a misspelled built-in name) and can be reached, that OUT may be
written, that the data named exists, and that `--drop` fits the layer count read from the model's
config.json or GGUF header (`depthcut.model.header`), that a local folder's config.json is readable and
describes its weights' headers (`depthcut.io.config_checks`: an absurd layer count is refused before
a model is built from it), and that `shrink`'s output fits on its disk (prune checks its own). This module imports no torch: the command
line runs it before it imports the pipeline, so that a simple mistake is reported in well under a
second instead of after the 10 s import and the model load; the library functions run it too."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.config_checks import check_config_against_weights
from depthcut.io.data import check_data_exists, hub_offline
from depthcut.io.output_checks import check_for_kind, check_free_space, check_no_overlap
from depthcut.io.safetensors_header import ITEM_SIZES, safetensors_header
from depthcut.metrics import METRICS
from depthcut.model.header import hub_model_cached, layer_count
from depthcut.model.layer_spec import parse_layer_spec
from depthcut.model.source import ModelSource, builtin_suggestion, resolve_model
from depthcut.pipeline.configs import (
    AnalyzeConfig,
    DataOptions,
    EvalConfig,
    GenerateConfig,
    HealConfig,
    PruneConfig,
    ShrinkConfig,
    SweepConfig,
)
from depthcut.strategies import STRATEGIES, check_drop


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise DepthcutError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_data_options(options: DataOptions) -> None:
    check_positive(samples=options.samples, seq_len=options.seq_len, batch_size=options.batch_size)
    if not options.metrics:
        raise DepthcutError("--metrics names no metric")
    if options.token_positions < 0:
        raise DepthcutError(f"--token-positions must be 0 or more (0: every token), got {options.token_positions}")
    for name in options.metrics:
        METRICS.check(name)


def reachable_model(spec: str) -> ModelSource:
    """`resolve_model(spec)`, and for a hub id with the hub off (HF_HUB_OFFLINE), the local cache
    checked for it: a name that is nowhere fails here, not after the imports and a hub error."""
    source = resolve_model(spec)
    offline = hub_offline()
    if source.is_hub_id and offline and not hub_model_cached(spec):
        suggestion = builtin_suggestion(spec)
        hint = f"; did you mean the built-in {suggestion!r}?" if suggestion else ""
        raise DepthcutError(f"model {spec!r} is not a local folder or file and not in the Hugging Face cache, and "
                            f"{offline} is set (no download){hint}")
    return source


def check_before_loading(config) -> None:
    """Every check of `config` (a command's config) that needs neither torch nor the weights; a
    config of another kind is passed over."""
    if isinstance(config, PruneConfig):
        if (config.layers is None) == (config.drop is None):
            raise DepthcutError("give either --drop N (with a --strategy) or --layers")
        if config.layers is None:
            STRATEGIES.get(config.strategy)
    if isinstance(config, ShrinkConfig) and sum(
            value is not None for value in (config.drop, config.fraction, config.params)) != 1:
        raise DepthcutError("give one of --drop N, --fraction F or --params P")
    if isinstance(config, DataOptions):
        check_data_options(config)
    if isinstance(config, HealConfig):
        config.recipe()  # the recipe checks its own values
    if not isinstance(config, (AnalyzeConfig, PruneConfig, ShrinkConfig, EvalConfig, HealConfig, SweepConfig,
                               GenerateConfig)):
        return
    source = reachable_model(config.model)
    for other in (getattr(config, "teacher", None), getattr(config, "baseline", None)):
        if other:
            reachable_model(other)
    _check_output(config)
    for spec in _data_read(config):
        check_data_exists(spec)
    if source.gguf_file is None and Path(source.location).is_dir():
        check_config_against_weights(source.location)
    _check_drop(config, source)
    if isinstance(config, ShrinkConfig):
        _check_shrink_space(config, source)


def _check_output(config) -> None:
    """OUT neither overlaps an input nor exists (unless --force, or a sweep that continues it)."""
    if isinstance(config, GenerateConfig):
        return
    inputs = [config.model, getattr(config, "teacher", None), getattr(config, "baseline", None),
              getattr(config, "analysis", None), getattr(config, "data", None), *getattr(config, "validate", ()),
              getattr(config, "loss", None), getattr(config, "heal_data", None)]
    check_no_overlap(inputs, config.out)
    gguf = str(config.out).lower().endswith(".gguf") and isinstance(config, (PruneConfig, ShrinkConfig))
    kind = "file" if gguf or isinstance(config, EvalConfig) else "dir"
    check_for_kind(Path(config.out), config.force, kind, may_exist=isinstance(config, SweepConfig))


def _data_read(config) -> list[str]:
    """The DATA arguments the command will read (named corpora, files, folders; hf: datasets too)."""
    if isinstance(config, PruneConfig):
        analyzes = config.layers is None and config.analysis is None and STRATEGIES.get(config.strategy).needs_analysis
        named = [config.data or "c4"] if config.data or analyzes or config.repair != "none" else []
    elif isinstance(config, ShrinkConfig):
        named = [config.data, *config.validation_sources()]
    elif isinstance(config, SweepConfig):
        named = [config.data, config.heal_data if config.heal else None]
    elif isinstance(config, AnalyzeConfig) and config.search != "none":  # the search reads validation text too
        named = [config.data, *config.validation_sources()]
    else:
        named = [getattr(config, "data", None)]
    named.append(getattr(config, "loss", None))
    return list(dict.fromkeys(spec for spec in named if spec))


def _check_drop(config, source: ModelSource) -> None:
    """--drop, --layers (prune) and --fraction (shrink) against the layer count of the model's config or
    GGUF header; --layers' syntax even where the count is unknown."""
    if not isinstance(config, (PruneConfig, ShrinkConfig)):
        return
    layers = config.layers if isinstance(config, PruneConfig) else None
    if config.drop is None and layers is None and getattr(config, "fraction", None) is None:
        return
    num_layers = layer_count(source, config.layer_path)
    if layers is not None:
        parse_layer_spec(layers, num_layers or sys.maxsize)  # an unknown count: the syntax alone
    if num_layers is None:
        return
    if config.drop is not None and layers is None:
        check_drop(config.drop, num_layers)
    fraction = getattr(config, "fraction", None)
    if fraction is not None and 0 < fraction < 1 and max(1, round(fraction * num_layers)) >= num_layers:
        raise DepthcutError(f"--fraction {fraction:g} removes all {num_layers} layers of this model; at least one "
                            f"must stay (give at most {(num_layers - 1) / num_layers:.3f})")


# the bytes per element of a --dtype (auto: the narrowest it may choose, 16-bit)
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "auto": 2}


def _check_shrink_space(config: ShrinkConfig, source: ModelSource) -> None:
    """`shrink` writes its winner after a selection of many minutes: the disk that holds OUT must have
    room for the smallest output the size asked for can give (the kept share of the stored weights,
    in the dtype written), checked before the selection, as prune checks before its work."""
    num_layers = layer_count(source, config.layer_path)
    if num_layers is None:
        return
    elements, stored = _stored_weights(source)
    if not stored:
        return
    per_element = stored / elements  # a GGUF's tensors are copied in their own quantization
    if not source.gguf_file and config.dtype != "checkpoint":
        wanted = DTYPE_BYTES.get(str(config.dtype).removeprefix("torch."), per_element)
        per_element = min(wanted, per_element) if config.dtype == "auto" else wanted
    if config.params is not None:
        most = _count(config.params)
        if most is None or source.gguf_file:  # a GGUF's element count is not summed here
            return
        # the fewest layers that reach P are removed: at least P less one layer's share is kept
        kept = max(0.0, min(most, elements) - elements / num_layers)
    else:
        removed = config.drop if config.drop is not None else max(1, round(config.fraction * num_layers))
        kept = elements * max(0, num_layers - removed) / num_layers
    check_free_space(config.out, int(kept * per_element), "the smaller model")


def _stored_weights(source: ModelSource) -> tuple[int, int]:
    """(elements, bytes) of a local model's stored weights: from the safetensors headers, or for a
    GGUF (1, the file's size): its quantized tensors counted as one unit, of which the kept share is
    copied; (0, 0) where it cannot tell."""
    location = Path(source.location)
    if source.gguf_file:
        path = location / source.gguf_file
        return (0, 0) if not path.is_file() else (1, path.stat().st_size)
    if not location.is_dir():
        return 0, 0
    elements = stored = 0
    for shard in sorted(location.glob("*.safetensors")):
        header, _ = safetensors_header(shard)
        for name, entry in header.items():
            if name != "__metadata__":
                elements += math.prod(entry["shape"])
                stored += math.prod(entry["shape"]) * ITEM_SIZES.get(entry["dtype"], 2)
    return elements, stored


def _count(text: str) -> int | None:
    """--params' "100M", "1.5B", "95000000" as a count; None where it is not one (shrink says so)."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    text = str(text).strip().upper().replace("_", "")
    try:
        value = float(text[:-1]) * scale[text[-1]] if text and text[-1] in scale else float(text)
    except ValueError:
        return None
    return int(value) if value > 0 and math.isfinite(value) else None
