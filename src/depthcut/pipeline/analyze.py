"""`analyze_to`: what `depthcut analyze` writes, from Python: the analysis of a model on calibration
text, in memory or one layer at a time, saved with its heatmap and provenance."""

from __future__ import annotations

import logging
from pathlib import Path

from depthcut.analysis.checkpoint import is_safetensors_folder, would_not_fit
from depthcut.analysis.heatmap import plot_heatmap
from depthcut.analysis.passes import analyze_streamed
from depthcut.errors import DepthcutError
from depthcut.io.atomic import atomic_output_dir
from depthcut.io.claims import claimed_for_writing
from depthcut.io.output_checks import check_no_overlap
from depthcut.io.provenance import environment
from depthcut.model.distributed import is_main_process
from depthcut.model.loading import resolve_device, resolve_dtype, resolve_model
from depthcut.model.precision import DtypeChoice, announce
from depthcut.pipeline.common import (
    check_data_options,
    load,
    run_analysis,
)
from depthcut.pipeline.configs import AnalyzeConfig
from depthcut.pipeline.options import make_config

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
    check_no_overlap([config.model, config.data], config.out)
    check_data_options(config)
    with claimed_for_writing(config.out, config.force, writer=is_main_process()):
        return _analyze(config)


def _analyze(config: AnalyzeConfig):

    source = resolve_model(config.model)  # a bad MODEL fails here, before the heavy imports
    if should_stream(config, source):
        analysis, source = _analyze_streamed(config, source)
    else:
        model, tokenizer, source = load(config, quiet=config.quiet)
        analysis = run_analysis(model, tokenizer, config, config.layer_path, progress=not config.quiet)
    analysis.metadata["model"] = source.as_dict()
    analysis.metadata["environment"] = environment()
    if is_main_process():
        with atomic_output_dir(config.out, config.force) as staging:
            analysis.save(staging / "analysis.json")
            plot_heatmap(analysis, staging / "heatmap.png")
    return analysis


def analysis_summary(analysis, out: str | Path) -> list[str]:
    """The lines `depthcut analyze` prints: where the files are and the best block of each size."""
    out = Path(out)
    lines = [f"analysis: {out / 'analysis.json'}", f"heatmap:  {out / 'heatmap.png'}",
             "most redundant block per size n (0-based, half-open [l, l+n)):"]
    for n, (first, stop) in list(analysis.best_blocks().items())[: min(8, analysis.num_layers - 1)]:
        lines.append(f"  n={n:>2}: [{first}, {stop})  d={analysis.distance(first, int(n)):.4f}")
    return lines
