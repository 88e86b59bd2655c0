"""`prune_to`: what `depthcut prune` writes, from Python: the chosen layers removed, saved as a
standard Hugging Face folder (in memory or shard by shard) or a GGUF file, with a model card and
provenance. The checks run first, then one backend (`depthcut.pipeline.prune_backends`) takes the
same three steps whichever it is: layers, repair, write."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from depthcut.analysis.result import Analysis
from depthcut.errors import DepthcutError
from depthcut.io.claims import claimed_for_writing
from depthcut.io.output_checks import check_free_space, check_no_overlap
from depthcut.io.provenance import check_prune_record, prune_record
from depthcut.model.distributed import is_main_process
from depthcut.model.layers import text_config
from depthcut.model.loading import resolve_model
from depthcut.model.shards import INDEX_FILE
from depthcut.model.surgery import parse_layer_spec
from depthcut.pipeline.common import check_data_options
from depthcut.pipeline.configs import PruneConfig
from depthcut.pipeline.options import make_config
from depthcut.pipeline.preflight import check_before_loading
from depthcut.pipeline.prune_backends import PruneBackend, backend_for
from depthcut.pipeline.prune_choice import needs_analysis
from depthcut.pipeline.prune_repair import repair_lines
from depthcut.repair import REPAIRS
from depthcut.strategies import STRATEGIES, check_drop

# --out names a folder (a Hugging Face model) or a .gguf file; these endings are neither
NOT_AN_OUTPUT = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".ggml", ".json", ".onnx")


def gguf_output(out: str) -> bool:
    """Whether `--out` asks for a GGUF file (the output's format follows its name)."""
    return str(out).lower().endswith(".gguf")


@dataclass
class PruneResult:
    """What `prune_to` did: the layers removed and the provenance written beside the model."""

    out: Path
    removed: list[int]
    strategy: str
    num_layers: int
    provenance: dict  # as written to depthcut.json, and nothing more
    # `depthcut shrink --tasks`: the winner evaluated against the unpruned model, as written to OUT/eval.json
    evaluation: dict | None = None

    def summary(self) -> list[str]:
        """The lines `depthcut prune` prints."""
        after = self.num_layers - len(self.removed)
        record, output = self.provenance, self.provenance["output"]
        size = f"{record['parameters_before']:,} -> {record['parameters_after']:,} parameters"
        if record["backend"] == "gguf":
            size += f", {output['file_bytes_after']:,} bytes written (GGUF, quantization kept)"
            sliced = [key for key in record["config_rewrite"]["changed"] if not key.endswith(".block_count")]
            if sliced:
                size += f"; per-layer metadata sliced: {', '.join(sliced)}"
        elif record["backend"] == "shard_by_shard":
            size += f", {output['tensor_bytes']:,} bytes of tensors written shard by shard"
        return [f"removed layers {self.removed} ({self.strategy}); {self.num_layers} -> {after} layers, {size}",
                *repair_lines(self.provenance.get("repair")), f"pruned model: {self.out}"]


def load_analysis(path: str):
    try:
        return Analysis.load(path)
    except UnicodeDecodeError as error:
        raise DepthcutError(f"cannot read analysis file {path}: not UTF-8 text (byte {error.start}); "
                            "is it an analysis.json?") from None


def configured_layers(config: PruneConfig, source) -> int | None:
    """The decoder layer count a local model's config gives (None when it cannot tell cheaply)."""
    if source.gguf_file or not (Path(source.location) / "config.json").is_file() or config.layer_path:
        return None
    try:

        count = text_config(AutoConfig.from_pretrained(source.location,
                                                       trust_remote_code=config.trust_remote_code)).num_hidden_layers
    except Exception:  # noqa: BLE001 (the model load that follows reports what is wrong with it)
        return None
    return count if isinstance(count, int) and count > 0 else None


def _check_choice(config: PruneConfig, analysis) -> None:
    """Everything about what to remove that can be checked without the model."""

    if (config.layers is None) == (config.drop is None):
        raise DepthcutError("give either --drop N (with a --strategy) or --layers")
    if config.layers is not None and config.analysis:
        raise DepthcutError("--layers names the layers itself; it takes no --analysis")
    if config.layers is None:
        STRATEGIES.get(config.strategy)
    if config.repair != "none":
        REPAIRS.get(config.repair)
    if str(config.out).lower().endswith(NOT_AN_OUTPUT):
        raise DepthcutError(f"--out {config.out}: depthcut writes a pruned model as a folder (a Hugging Face model) "
                            "or as one .gguf file; give a folder name or a name ending in .gguf")
    if gguf_output(config.out) and config.stream:
        raise DepthcutError("--stream is for safetensors folders; a .gguf output is always written tensor by tensor")
    check_data_options(config)
    if analysis is not None and config.drop is not None:
        check_drop(config.drop, analysis.num_layers)


def _check_against_config(config: PruneConfig, num_layers: int | None) -> None:
    """--drop and --layers checked against the configured layer count before the model loads
    (impossible values fail in a second, not after minutes of loading)."""

    if config.drop is not None:
        if num_layers is not None:
            check_drop(config.drop, num_layers)
        elif config.drop < 1:
            raise DepthcutError(f"--drop must be at least 1, got {config.drop}")
    if config.layers is not None:
        try:
            parse_layer_spec(config.layers, num_layers or sys.maxsize)
        except DepthcutError as error:
            if num_layers is not None or "out of range" not in str(error):
                raise


def _check_space(config: PruneConfig, source, num_layers: int | None) -> None:
    """A local model pruned in its stored dtype needs at least its kept layers' share of its weights."""

    folder = Path(source.location)
    if config.dtype != "checkpoint" or num_layers is None or source.gguf_file or not folder.is_dir():
        return
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    removed = config.drop if config.drop is not None else len(parse_layer_spec(config.layers, num_layers))
    check_free_space(config.out, weights * (num_layers - removed) // num_layers, "the pruned model")


def _streamable(config: PruneConfig, source, analysis) -> bool:
    """Shard-by-shard surgery needs a local safetensors folder, the stored dtype, and no analysis to run."""

    local = source.gguf_file is None and Path(source.location).is_dir()
    # With a repair, --dtype is the dtype its statistics are computed in; the weights stay as stored.
    possible = (local and (config.dtype == "checkpoint" or config.repair != "none")
                and not needs_analysis(config, analysis))
    if config.stream and not possible:
        raise DepthcutError("--stream needs a local safetensors folder, --dtype auto or checkpoint (or any with "
                            "--repair), and --layers, a strategy without analysis, or --analysis FILE")
    # A repair streams only when asked: in memory its model is loaded once for statistics and surgery alike.
    return possible and (config.stream or (config.repair == "none" and (Path(source.location) / INDEX_FILE).is_file()))


def _as_written(config: PruneConfig, analysis) -> PruneConfig:
    """`config` as prune writes it: where nothing is computed, --dtype auto keeps the weights as stored
    (the hardware has no say)."""
    if config.dtype == "auto" and not needs_analysis(config, analysis) and config.repair == "none":
        return dataclasses.replace(config, dtype="checkpoint")
    return config


def prune_to(config: PruneConfig | None = None, /, **fields) -> PruneResult:
    """Remove layers from a model and save it, as `depthcut prune` does.

    Takes a `PruneConfig`, or its fields: `prune_to(model="smollm2-135m", drop=8, strategy="deepest",
    out="pruned")`. Layers come from `layers` ("21:29", "3,7,12") or `drop` with a `strategy`, which
    reads `analysis` (a file) or analyzes `data`. A local safetensors folder is rewritten shard by
    shard without loading the model when nothing has to be computed (`stream`, automatic for sharded
    folders); a `.gguf` out is written from a GGUF model tensor by tensor.
    """
    config = make_config(PruneConfig, config, fields)
    check_before_loading(config)  # the checks that need no weights (the layer count from the config or GGUF header)
    analysis = load_analysis(config.analysis) if config.analysis else None
    _check_choice(config, analysis)
    resolve_model(config.model)  # a MODEL that is no model says so, before what --out overlaps
    check_no_overlap([config.model, config.analysis, config.data], config.out)
    kind = "file" if gguf_output(config.out) else "dir"
    with claimed_for_writing(config.out, config.force, kind=kind, writer=is_main_process()):
        return prune_with(config, analysis)


def prune_with(config: PruneConfig, analysis, *, selection: dict | None = None,
               strategy: str | None = None, backend: PruneBackend | None = None) -> PruneResult:
    """`prune_to`'s work once `--out` is claimed: for a caller that chose the layers itself (`depthcut
    shrink`), `selection` records how (provenance key `selection`) and `strategy` names it; `backend`,
    a model it already cut (`Prepared`)."""
    if backend is not None:
        return _written(backend, config, strategy, selection)
    _check_choice(config, analysis)
    source = resolve_model(config.model)
    streamable = False
    if not gguf_output(config.out):
        configured = configured_layers(config, source)
        _check_against_config(config, configured)
        config = _as_written(config, analysis)
        _check_space(config, source, configured)
        streamable = _streamable(config, source, analysis)
    return _written(backend_for(config, source, analysis, gguf_output(config.out), streamable), config, strategy,
                    selection)


def _written(backend: PruneBackend, config: PruneConfig, strategy: str | None, selection: dict | None) -> PruneResult:
    removed, chosen_by, analysis = backend.layers()
    fit = backend.repair(removed)
    strategy = strategy or chosen_by
    record = prune_record(backend.name, backend.source.as_dict(), strategy, removed, backend.num_layers, analysis,
                          fit, selection)
    record = backend.write(removed, record)
    check_prune_record(record)
    return PruneResult(Path(config.out), removed, strategy, backend.num_layers, record)
