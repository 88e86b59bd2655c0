"""What several commands share: the model, calibration data and output options, their checks,
the claim on an output path, and loading a model with a word to the user."""

from __future__ import annotations

from depthcut.analysis.passes import analyze
from depthcut.errors import DepthcutError
from depthcut.metrics import METRICS
from depthcut.model.loading import load_model_announced
from depthcut.pipeline.configs import DataOptions, ModelOptions


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
        METRICS.get(name)


def load(options: ModelOptions, quiet: bool = False, quantize: str | None = None):
    """`depthcut.model.loading.load_model` with the options, saying what it loads and in which dtype."""

    return load_model_announced(options.model, quiet=quiet, dtype=options.dtype, device=options.device,
                                trust_remote_code=options.trust_remote_code, quantize=quantize,
                                device_map=getattr(options, "device_map", None))


def run_analysis(model, tokenizer, options: DataOptions, layer_path: str | None, progress: bool):
    return analyze(model, tokenizer, options.data, layer_path=layer_path, progress=progress,
                   **options.analysis_options())
