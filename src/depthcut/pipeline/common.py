"""What several commands share: loading a model with a word to the user, and the analysis pass;
the options' checks live in the torch-free `depthcut.pipeline.preflight` (re-exported here)."""

from __future__ import annotations

from depthcut.analysis.passes import analyze
from depthcut.model.loading import load_model_announced
from depthcut.pipeline.configs import DataOptions, ModelOptions

# re-exported: the option checks are torch-free, in preflight
from depthcut.pipeline.preflight import check_data_options, check_positive  # noqa: F401


def load(options: ModelOptions, quiet: bool = False, quantize: str | None = None):
    """`depthcut.model.loading.load_model` with the options, saying what it loads and in which dtype."""

    return load_model_announced(options.model, quiet=quiet, dtype=options.dtype, device=options.device,
                                trust_remote_code=options.trust_remote_code, quantize=quantize,
                                device_map=getattr(options, "device_map", None))


def run_analysis(model, tokenizer, options: DataOptions, layer_path: str | None, progress: bool):
    return analyze(model, tokenizer, options.data, layer_path=layer_path, progress=progress,
                   **options.analysis_options())
