"""`analyze_to`: what `depthcut analyze` writes, from Python: the analysis of a model on calibration
text, in memory or one layer at a time, saved with its heatmap and provenance; with `--search`, also
the order in which a greedy (or beam) search on the model's output removes layers (`depthcut.selection.search`),
each step's KL beside the KL of the best block by angular distance of that size."""

from __future__ import annotations

import logging
from pathlib import Path

from depthcut.analysis.checkpoint import is_safetensors_folder, would_not_fit
from depthcut.analysis.heatmap import plot_heatmap
from depthcut.analysis.passes import analyze_streamed
from depthcut.errors import DepthcutError
from depthcut.io.atomic import atomic_output_dir
from depthcut.io.claims import claimed_for_writing
from depthcut.io.data import load_texts, split_documents
from depthcut.io.output_checks import check_no_overlap
from depthcut.io.provenance import environment
from depthcut.model.distributed import is_main_process
from depthcut.model.layers import find_layer_stack
from depthcut.model.loading import resolve_device, resolve_dtype, resolve_model
from depthcut.model.precision import DtypeChoice, announce
from depthcut.pipeline.common import (
    check_data_options,
    load,
    run_analysis,
)
from depthcut.pipeline.configs import AnalyzeConfig
from depthcut.pipeline.options import make_config
from depthcut.pipeline.prune_repair import HELDOUT_FRACTION
from depthcut.pipeline.search_choice import search_width
from depthcut.pipeline.validation import scores_after_cut, validation_sets
from depthcut.selection.search import aggregated, search_order, search_references

log = logging.getLogger(__name__)


def should_stream(config: AnalyzeConfig, source) -> bool:
    """--stream, or a local safetensors model bigger than the memory it would be loaded into."""

    if config.spill_dir is not None and not Path(config.spill_dir).is_dir():
        raise DepthcutError(f"the spill folder {config.spill_dir} does not exist")
    if config.stream and source.gguf_file:
        if config.device_map:
            raise DepthcutError("--stream and --device-map exclude each other: streaming holds one layer at a time")
        return True  # a GGUF file: dequantized one layer's tensors at a time
    if config.stream:
        if not is_safetensors_folder(source.location):
            raise DepthcutError(f"--stream needs a local folder of safetensors weights with its config.json; "
                                f"{config.model} is not one (for a hub model, download it first: "
                                f"huggingface-cli download {config.model} --local-dir DIR)")
        if config.device_map:
            raise DepthcutError("--stream and --device-map exclude each other: streaming holds one layer at a time")
        return True
    if config.device_map or not is_safetensors_folder(source.location):
        return False

    device = resolve_device(config.device)
    verdict = would_not_fit(source.location, resolve_dtype(config.dtype, device), device)
    if verdict:
        log.info("%s: analyzing it one layer at a time (--stream)", verdict)
    return bool(verdict)


def _analyze_streamed(config: AnalyzeConfig, source):

    location = Path(source.location) / source.gguf_file if source.gguf_file else source.location
    analysis = analyze_streamed(location, data=config.data, layer_path=config.layer_path, dtype=config.dtype,
                                device=config.device, spill_dir=config.spill_dir,
                                trust_remote_code=config.trust_remote_code, progress=not config.quiet,
                                **config.analysis_options())
    source.dtype = DtypeChoice.from_dict(analysis.metadata["dtype_choice"])
    announce(source.dtype)
    return analysis, source


def analyze_to(config: AnalyzeConfig | None = None, /, **fields):
    """Analyze a model and write `out/analysis.json` and `out/heatmap.png`, as `depthcut analyze` does.

    Takes an `AnalyzeConfig`, or its fields: `analyze_to(model="smollm2-135m", data="c4", out="runs/a")`.
    Streams the model one layer at a time when asked or when it would not fit. Returns the `Analysis`.
    In a data-parallel launch every process returns it and the first one writes it.
    """
    config = make_config(AnalyzeConfig, config, fields)
    check_no_overlap([config.model, config.data, *config.validate], config.out)
    check_data_options(config)
    if config.search_drop is not None and not search_width(config.search):
        raise DepthcutError("--search-drop sets how deep --search goes: give --search greedy or beam:K with it")
    if config.search_drop is not None and config.search_drop < 1:
        raise DepthcutError(f"--search-drop must be at least 1, got {config.search_drop}")
    with claimed_for_writing(config.out, config.force, writer=is_main_process()):
        return _analyze(config)


def _analyze(config: AnalyzeConfig):

    source = resolve_model(config.model)  # a bad MODEL fails here, before the heavy imports
    if should_stream(config, source):
        if search_width(config.search):
            raise DepthcutError("--search scores every trial cut on the model in memory; it cannot run one layer "
                                "at a time (--stream, or a local model too big for memory)")
        analysis, source = _analyze_streamed(config, source)
    else:
        model, tokenizer, source = load(config, quiet=config.quiet)
        # the search's depth and text checked before the analysis pass, not after it
        searched = _search_inputs(model, tokenizer, config) if search_width(config.search) else None
        analysis = run_analysis(model, tokenizer, config, config.layer_path, progress=not config.quiet)
        if searched is not None:
            analysis.search = search_record(model, analysis, *searched, config)
    analysis.metadata["model"] = source.as_dict()
    analysis.metadata["environment"] = environment()
    if is_main_process():
        with atomic_output_dir(config.out, config.force) as staging:
            analysis.save(staging / "analysis.json")
            plot_heatmap(analysis, staging / "heatmap.png")
    return analysis


def _search_inputs(model, tokenizer, config: AnalyzeConfig) -> tuple[dict, int]:
    """(the validation windows per source: the held-out documents of --data, as `shrink` splits them, and a
    second domain, or --validate; the layers the search removes: --search-drop, default half of them)."""
    num_layers = len(find_layer_stack(model, config.layer_path))
    drop = config.search_drop if config.search_drop is not None else max(1, num_layers // 2)
    if not 1 <= drop < num_layers:
        raise DepthcutError(f"--search-drop must be between 1 and {num_layers - 1} for a model of {num_layers} "
                            f"layers (the final layer stays), got {drop}")
    held_out = None
    if config.data in config.validation_sources():
        held_out = split_documents(load_texts(config.data, config.text_field), HELDOUT_FRACTION, config.seed)[1]
    return validation_sets(config, tokenizer, held_out), drop


def search_record(model, analysis, windows: dict, drop: int, config: AnalyzeConfig) -> dict:
    """`--search` on `windows`: the order of `drop` layers, each step's KL, and beside it the KL of the best
    block by angular distance of each size up to that depth (one trial a size: the contiguous cut `prune
    --strategy angular` would make)."""
    log.info("analyze: --search %s for %d layers on %d validation window(s) per source ...", config.search, drop,
             config.validation_windows)
    predictions = search_references(model, windows, config.batch_size, config.layer_path)
    count = min(len(sets.input_ids) for sets in windows.values())
    path = search_order(model, predictions, drop, config.search, config.batch_size, config.aggregate,
                        config.layer_path, windows=count)
    record = path.as_dict()
    record["aggregate"] = config.aggregate
    record["validation"] = {name: sets.as_dict() for name, sets in windows.items()}
    record["blocks"] = _block_curve(model, analysis, predictions, len(path.order), config)
    return record


def _block_curve(model, analysis, predictions, depth: int, config: AnalyzeConfig) -> list[dict]:
    """Per size n up to `depth`, the block of smallest angular distance that the architecture allows and
    its KL on the search's windows ([] without the angular distance)."""
    if "angular_last_token" not in analysis.metrics:
        return []
    curve = []
    for size in range(1, depth + 1):
        point = {"size": size, "block": None, "kl": None}
        for first, stop in analysis.ranked_blocks(size):
            try:
                scores = scores_after_cut(model, list(range(first, stop)), predictions, config.batch_size,
                                          layer_path=config.layer_path)
            except DepthcutError:  # a block the architecture refuses: the next best by distance
                continue
            means = {name: windows.summary()["kl"] for name, windows in scores.items()}
            point = {"size": size, "block": [first, stop], "kl": aggregated(means, config.aggregate),
                     "per_source": means}
            break
        curve.append(point)
    return curve


def analysis_summary(analysis, out: str | Path) -> list[str]:
    """The lines `depthcut analyze` prints: where the files are, the best block of each size and, after
    a search, its order with the `--layers` of each depth and the command that takes its first k."""
    out = Path(out)
    lines = [f"analysis: {out / 'analysis.json'}", f"heatmap:  {out / 'heatmap.png'}",
             "most redundant block per size n (0-based, half-open [l, l+n)):"]
    for n, (first, stop) in list(analysis.best_blocks().items())[: min(8, analysis.num_layers - 1)]:
        lines.append(f"  n={n:>2}: [{first}, {stop})  d={analysis.distance(first, int(n)):.4f}")
    search = analysis.search
    if search and search.get("order"):
        blocks = {point["size"]: point for point in search.get("blocks", [])}
        lines.append(f"--search {search['method']}: the layers in the order removed, with the KL from the unpruned "
                     f"model ({search.get('aggregate', 'worst')} over sources, {search['windows']} window(s) each) "
                     "and the best block's by angular distance:")
        for k, step in enumerate(search["steps"], start=1):
            block = blocks.get(k) or {}
            beside = (f"  block [{block['block'][0]}, {block['block'][1]}) KL {block['kl']:.4f}"
                      if block.get("kl") is not None else "")
            lines.append(f"  k={k:>2}: --layers {','.join(map(str, sorted(search['order'][:k])))}  "
                         f"KL {step['kl']:.4f}{beside}")
        lines.append(f"remove the first k: depthcut prune MODEL --analysis {out / 'analysis.json'} --strategy search "
                     "--drop k --out DIR")
    return lines
