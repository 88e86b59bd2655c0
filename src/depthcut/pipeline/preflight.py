"""The checks that need no weights, run before anything heavy is imported or loaded: that MODEL is a
model (with a suggestion for a misspelled built-in name) and can be reached, that OUT may be
written, that the data named exists, and that `--drop` fits the layer count read from the model's
config.json or GGUF header (`depthcut.model.header`). This module imports no torch: the command
line runs it before it imports the pipeline, so that a simple mistake is reported in well under a
second instead of after the 10 s import and the model load; the library functions run it too."""

from __future__ import annotations

import sys
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.data import check_data_exists, hub_offline
from depthcut.io.output_checks import check_for_kind, check_no_overlap
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
    if isinstance(config, ShrinkConfig):
        if sum(value is not None for value in (config.drop, config.fraction, config.params)) != 1:
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
    _check_drop(config, source)


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
