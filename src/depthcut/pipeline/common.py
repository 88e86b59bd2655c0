"""What several commands share: the model, calibration data and output options, their checks,
the claim on an output path, and loading a model with a word to the user."""

from __future__ import annotations

from dataclasses import dataclass

from depthcut.errors import DepthcutError
from depthcut.metrics import DEFAULT_METRICS
from depthcut.pipeline.options import comma_list, option

DTYPE_HELP = ("auto (default: what the device computes natively: bfloat16 on GPUs and on CPUs with AVX512-BF16/AMX, "
              "else float32), checkpoint (the stored dtype), float32, bfloat16 or float16")


@dataclass(kw_only=True)
class ModelOptions:
    model: str = option(positional=True, metavar="MODEL",
                        help="a local HF folder, a hub id, a .gguf file, or the built-in name smollm2-135m")
    dtype: str = option("auto", help=DTYPE_HELP, show_default=False)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N", show_default=False)
    layer_path: str | None = option(None, help="dotted path of the decoder layer list when it cannot be found "
                                               "(e.g. model.layers)")
    trust_remote_code: bool = option(False, help="allow a model's own code to run")


@dataclass(kw_only=True)
class DeviceMapOption:
    device_map: str | None = option(None, metavar="MAP",
                                    help="spread the model over several GPUs with accelerate (auto, balanced, "
                                         "sequential); --device is then ignored")


@dataclass(kw_only=True)
class DataOptions:
    data: str | None = option(None, help="calibration text: .txt/.jsonl/.json/.parquet file or folder, "
                                         "hf:NAME[:CONFIG][:SPLIT], or c4")
    text_field: str = option("text", help="the field holding text in JSON/parquet data")
    samples: int = option(64, help="number of calibration sequences")
    seq_len: int = option(256, help="tokens per sequence")
    batch_size: int = option(8, help="sequences per forward pass")
    sample_mode: str = option("windows", choices=("windows", "documents"),
                              help="fixed-length windows of concatenated text, or one document per sample")
    seed: int = option(0, help="seed of the sample draw")
    metrics: tuple[str, ...] = option(tuple(DEFAULT_METRICS), parse=comma_list,
                                      help="comma-separated metrics (default: all); the all-token ones keep a "
                                           "batch's states at every layer, so drop them to save memory on big models",
                                      show_default=False)

    def analysis_options(self) -> dict:
        """The keyword arguments of `depthcut.analysis.analyze` these options give."""
        return {"samples": self.samples, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "mode": self.sample_mode, "seed": self.seed, "text_field": self.text_field,
                "metrics": list(self.metrics)}


@dataclass(kw_only=True)
class OutputOptions:
    out: str = option(help="output folder (created; must not exist unless --force)")
    force: bool = option(False, help="replace an existing output folder")
    quiet: bool = option(False, help="no progress bars")


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise DepthcutError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_data_options(options: DataOptions) -> None:
    from depthcut.metrics import METRICS

    check_positive(samples=options.samples, seq_len=options.seq_len, batch_size=options.batch_size)
    if not options.metrics:
        raise DepthcutError("--metrics names no metric")
    for name in options.metrics:
        METRICS.get(name)


def load(options: ModelOptions, quiet: bool = False, quantize: str | None = None):
    """`depthcut.models.load_model` with the options, saying what it loads and in which dtype."""
    from depthcut.models import load_model_announced

    return load_model_announced(options.model, quiet=quiet, dtype=options.dtype, device=options.device,
                                trust_remote_code=options.trust_remote_code, quantize=quantize,
                                device_map=getattr(options, "device_map", None))


def run_analysis(model, tokenizer, options: DataOptions, layer_path: str | None, progress: bool):
    from depthcut.analysis import analyze

    return analyze(model, tokenizer, options.data, layer_path=layer_path, progress=progress,
                   **options.analysis_options())
